"""serve-backend-guard: below sm80 the server refuses, in one line, what only runs on sm80+.

From v0.2.4post1 the server has a second backend, ``--backend_type balance_serve`` (the
``*-serve*.yaml`` rules): its attention is flashinfer's batch MLA kernels and its scheduler a C++
extension (``sched_ext``), neither built for sm<80 by ktlegacy; below sm80 it fails somewhere
inside the model load. And v0.3.x-v0.7.0 add models that only that backend serves
(Qwen3-MoE, and from v0.4.1 GLM-4-MoE, SmallThinker, Qwen3-Next: no entry in the
``ktransformers`` backend's model table, only ``*-serve.yaml`` rules). ``create_interface``
(``server/utils/create_interface.py``), which every server start goes through before it builds
the backend, now first asks ``ktlegacy_runtime.check_server_backend``: below sm80 it stops with
one line naming the model (its ``config.json`` architecture) and why; on sm80+ nothing changes.

0.2.1.post1 has only the ``ktransformers`` backend and the models it serves, so the overlay is
not for it.
"""

from ktlegacy.core.overlay import Overlay

CREATE = "ktransformers/server/utils/create_interface.py"
IMPORT_LINE = "from ktransformers import ktlegacy_runtime  # ktlegacy"
CHECK = ("    ktlegacy_runtime.check_server_backend(config.backend_type, getattr(default_args, \"model_dir\", None)"
         " or getattr(default_args, \"model_path\", None))  # ktlegacy: sm80-only backends/models refused")


class ServeBackendGuardOverlay(Overlay):
    name = "serve-backend-guard"
    summary = "server start below sm80: balance_serve backend and balance_serve-only models refused in one line"
    not_applicable = {"0.2.1.post1": "no balance_serve backend: every model it serves has an sm<80 path"}

    def apply(self, tree, ctx):
        text = tree.read(CREATE)
        if "    if config.backend_type=='transformers':\n" not in text or \
                "    elif config.backend_type == 'balance_serve':\n" not in text:
            raise tree.drift(CREATE, "create_interface choosing the backend from config.backend_type, balance_serve among them")
        tree.insert_line(CREATE, IMPORT_LINE, after=r"^from ktransformers\.server\.config\.config import Config$",
                         what="import ktlegacy_runtime")
        tree.insert_line(CREATE, CHECK, after=r"^def create_interface\(config: Config, default_args: ConfigArgs\b.*\):$",
                         what="check_server_backend before the backend is built")


OVERLAY = ServeBackendGuardOverlay()
