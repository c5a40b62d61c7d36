"""task-queue-start: the CPU backend's task queue sets its flags before its worker thread starts.

``TaskQueue::TaskQueue`` (``cpu_backend/task_queue.cpp``, identical at every supported ref) starts
the worker thread first and stores ``sync_flag = true`` / ``exit_flag = false`` after it. The
worker's first act is ``cv.wait(..., [] { return !tasks.empty() || exit_flag; })`` and then
``if (exit_flag && tasks.empty()) return;``: it can read ``exit_flag`` before the constructor
stored it, i.e. whatever the heap held there (``std::atomic<bool>`` is not initialised by its
default constructor before C++20), and exit for good. Every later ``CPUInfer.sync()`` then spins
forever (``while (!sync_flag) ;``): the engine hangs on its first CPU-experts call. Seen here as a
rare hang of tests/test_moe_partial_block.py's probe (CPUInfer(2), one submit + sync) with the
worker gone. The edit stores both flags before the thread is created.
"""

from ktlegacy.core.overlay import Overlay

CANDIDATES = ("ktransformers/ktransformers_ext/cpu_backend/task_queue.cpp",  # 0.2.1.post1 (sdist)
              "csrc/ktransformers_ext/cpu_backend/task_queue.cpp")           # the git tags
START = ("TaskQueue::TaskQueue() {\n"
         "    worker = std::thread(&TaskQueue::processTasks, this);\n"
         "    sync_flag.store(true, std::memory_order_seq_cst);\n"
         "    exit_flag.store(false, std::memory_order_seq_cst);\n"
         "}\n")
START_NEW = ("TaskQueue::TaskQueue() {\n"
             "    // ktlegacy: the flags before the worker, which reads exit_flag at once (unset, it could exit for good)\n"
             "    sync_flag.store(true, std::memory_order_seq_cst);\n"
             "    exit_flag.store(false, std::memory_order_seq_cst);\n"
             "    worker = std::thread(&TaskQueue::processTasks, this);\n"
             "}\n")


class TaskQueueStartOverlay(Overlay):
    name = "task-queue-start"
    summary = "cpu_backend TaskQueue: sync_flag/exit_flag set before the worker thread starts (it could read them unset and exit)"

    def apply(self, tree, ctx):
        queue = tree.one_of(CANDIDATES, "cpu_backend/task_queue.cpp")
        tree.replace(queue, START, START_NEW, what="TaskQueue(): flags stored before the worker thread starts")


OVERLAY = TaskQueueStartOverlay()
