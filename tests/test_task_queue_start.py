"""task-queue-start (overlay 69): the CPU backend's TaskQueue sets its flags before its worker starts.

Upstream's constructor starts the worker thread, then stores ``sync_flag``/``exit_flag``; a worker
that runs first reads ``exit_flag`` as whatever the memory held and, if that is non-zero, returns
from its loop holding the queue's mutex: the next ``enqueue`` (every CPU-experts call) blocks for
ever. The harness below makes that order certain instead of rare: the TaskQueue is built in memory
filled with 0x01 bytes (a reused heap block) and ``pthread_create`` is wrapped so that its caller
waits until the new thread has started and then either finished or had 2 s to run. The pristine
sdist's task_queue.cpp hangs under it (the harness can fail); the patched one runs a task and
shuts down cleanly.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ktlegacy.core.arch import get_arch
from ktlegacy.core.overlay import patch_tree

QUEUE = "ktransformers/ktransformers_ext/cpu_backend/task_queue.cpp"
HARNESS = r"""
#include "task_queue.h"
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <new>
#include <pthread.h>
#include <thread>

static std::atomic<int> started{0}, finished{0};
struct Start { void *(*fn)(void *); void *arg; };

static void *trampoline(void *p) {
    Start s = *static_cast<Start *>(p);
    delete static_cast<Start *>(p);
    started = 1;
    void *r = s.fn(s.arg);
    finished = 1;
    return r;
}

// std::thread's pthread_create, resolved here first: the creator goes on only once the new thread
// has run (finished, or 2 s of running: blocked in its wait)
extern "C" int pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg) {
    using real_t = int (*)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    static real_t real = reinterpret_cast<real_t>(dlsym(RTLD_NEXT, "pthread_create"));
    int rc = real(t, a, trampoline, new Start{fn, arg});
    while (!started) std::this_thread::yield();
    for (int i = 0; i < 200 && !finished; i++) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return rc;
}

int main() {
    alignas(TaskQueue) static unsigned char raw[sizeof(TaskQueue)];
    std::memset(raw, 1, sizeof raw);               // what a reused heap block can hold
    TaskQueue *queue = new (raw) TaskQueue();
    int done = 0;
    queue->enqueue([&] { done = 1; });
    queue->sync();
    queue->~TaskQueue();
    std::printf("task ran: %d\n", done);
    return done == 1 ? 0 : 1;
}
"""


def _build(tree: Path, out: Path) -> Path:
    src = tree / QUEUE
    (out / "harness.cpp").write_text(HARNESS)
    exe = out / "harness"
    subprocess.run(["g++", "-std=c++17", "-O1", "-pthread", "-I", str(src.parent), str(out / "harness.cpp"), str(src),
                    "-o", str(exe), "-ldl"], check=True, capture_output=True, text=True, timeout=300)
    return exe


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_worker_cannot_read_the_flags_unset(pristine_tree, tmp_path):
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    before = _build(pristine_tree, tmp_path / "before")
    with pytest.raises(subprocess.TimeoutExpired):  # upstream: the worker left holding the mutex
        subprocess.run([str(before)], capture_output=True, text=True, timeout=15)
    patch_tree(pristine_tree, get_arch("sm75"), out=lambda line: None)
    text = (pristine_tree / QUEUE).read_text()
    assert text.index("exit_flag.store(false") < text.index("worker = std::thread(")
    after = _build(pristine_tree, tmp_path / "after")
    run = subprocess.run([str(after)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "task ran: 1", (run.stdout, run.stderr)


def test_drift_and_a_missing_file_are_refused_leaving_the_tree_untouched(pristine_tree):
    import sys
    repo = Path(__file__).resolve().parent.parent
    queue = pristine_tree / QUEUE

    def patch():
        before = {p: p.read_bytes() for p in pristine_tree.rglob("*") if p.is_file()}
        run = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(pristine_tree), "--arch", "sm75",
                              "--ref", "0.2.1.post1"], cwd=repo, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0
        assert {p: p.read_bytes() for p in pristine_tree.rglob("*") if p.is_file()} == before
        return run.stderr

    queue.write_text(queue.read_text().replace("    worker = std::thread(&TaskQueue::processTasks, this);\n",
                                               "    worker = std::thread([this] { processTasks(); });\n"))
    err = patch()
    assert "overlay task-queue-start: ktransformers/ktransformers_ext/cpu_backend/task_queue.cpp: expected 1 occurrence" in err
    queue.unlink()
    err = patch()
    assert "overlay task-queue-start:" in err and "expected exactly one cpu_backend/task_queue.cpp" in err
