"""server-api: the HTTP API works with real OpenAI and Ollama clients and Open WebUI, hardened (0.2.1.post1's server).

Upstream's routes trip the ``openai`` and ``ollama`` client packages (a bare-list
``/v1/models``, ``/api/chat`` and non-streamed ``/api/generate`` not implemented, unparsable
``/api/tags`` timestamps, no ``usage``) and ignore the requests' ``max_tokens``, ``temperature``,
``top_p`` and ``stop``. Upstream also answers any web page (CORS ``*`` with credentials), has no
authentication, no body limit, mounts an unauthenticated assistants API, and loads the model
before it listens, so nothing tells how far a 300 GB GGUF has got.

The overlay ships ``ktransformers/server/api/ktlegacy_api.py`` (our code, see its docstring) and:
mounts it from ``main.py`` before upstream's router; takes upstream's chat, completion,
model-list, Ollama and web (``/system-info``, which only raised) routers out, and mounts the
assistants/threads/runs router only when ``KTLEGACY_ASSISTANTS_API=1`` (behind the key); drops
upstream's CORS middleware; loads the model on a thread after the server listens (``/health``);
makes ``args.py``'s ``type=bool`` flags real booleans (``--web_cross_domain False`` parsed as
True); has ``GGUFLoader.get_mmap_tensor`` report each tensor for the load progress; gives
``TransformersInterface.logits_to_token`` (which ``KTransformersInterface`` inherits) a
per-request sampler hook. Written against 0.2.1.post1's server; the git refs reworked the server
(balance_serve, new backends) and are not covered yet.
"""

from pathlib import Path

from ktlegacy.core.facts import REFS
from ktlegacy.core.overlay import Overlay

SOURCE = Path(__file__).resolve().parent / "server_api" / "ktlegacy_api.py"
TARGET = "ktransformers/server/api/ktlegacy_api.py"
MARK = "# ktlegacy: served by server/api/ktlegacy_api.py"

# file -> [(anchor, replacement)]: upstream routers taken out (kept as comments with the marker)
UNMOUNT = {
    "ktransformers/server/api/__init__.py": ["router.include_router(ollama_router)\n",
                                            "router.include_router(web_router)\n"],
    "ktransformers/server/api/openai/__init__.py": ["router.include_router(chat_router)\n",
                                                     "router.include_router(legacy_router)\n"],
}
ASSISTANTS = "ktransformers/server/api/openai/__init__.py"
ASSISTANTS_ANCHOR = "router.include_router(assistants_router)\n"
ASSISTANTS_EDIT = ("from ktransformers.server.api import ktlegacy_api as _ktlegacy_api  # ktlegacy: off by default\n"
                   "if _ktlegacy_api.assistants_enabled():  # KTLEGACY_ASSISTANTS_API=1; behind the API key\n"
                   "    router.include_router(assistants_router)\n")
MAIN = "ktransformers/server/main.py"
CORS_ANCHOR = ("    if Config().web_cross_domain:\n"
               "        app.add_middleware(\n"
               "            CORSMiddleware,\n"
               "            allow_origins=[\"*\"],\n"
               "            allow_credentials=True,\n"
               "            allow_methods=[\"*\"],\n"
               "            allow_headers=[\"*\"],\n"
               "        )\n")
CORS_EDIT = ("    # ktlegacy: no CORS for any origin with credentials; ktlegacy_api allows KTLEGACY_CORS_ORIGINS only\n"
             "    if Config().web_cross_domain:\n"
             "        from ktransformers.server.api import ktlegacy_api\n"
             "        ktlegacy_api.note_web_cross_domain()\n")
LOAD_ANCHOR = "    create_interface(config=cfg, default_args=cfg)\n    run_api(\n"
LOAD_EDIT = ("    from ktransformers.server.api import ktlegacy_api  # ktlegacy: listen now, load behind /health\n"
             "    ktlegacy_api.load_in_background(lambda: create_interface(config=cfg, default_args=cfg))\n"
             "    run_api(\n")
ARGS = "ktransformers/server/args.py"
ARGS_ANCHOR = "import argparse\n"
ARGS_EDIT = ("import argparse\n\n\n"
             "def _ktlegacy_bool(text):  # ktlegacy: type=bool made any non-empty text True (\"False\" too)\n"
             "    value = str(text).strip().lower()\n"
             "    if value in (\"1\", \"true\", \"yes\", \"on\"):\n"
             "        return True\n"
             "    if value in (\"0\", \"false\", \"no\", \"off\"):\n"
             "        return False\n"
             "    raise argparse.ArgumentTypeError(f\"expected True or False, got {text!r}\")\n")
BOOL_FLAGS = 18  # the type=bool flags of 0.2.1.post1's args.py
GGUF = "ktransformers/util/custom_gguf.py"
GGUF_ANCHOR = "    def get_mmap_tensor(self, name):\n"
GGUF_EDIT = (GGUF_ANCHOR +
             "        hook = getattr(GGUFLoader, \"ktlegacy_on_tensor\", None)  # ktlegacy: load progress (/health)\n"
             "        if hook is not None:\n"
             "            hook(self, name)\n")
MAIN_ANCHOR = "    mount_app.include_router(router)\n"
MAIN_EDIT = ("    from ktransformers.server.api import ktlegacy_api  # ktlegacy: OpenAI/Ollama API, error handlers\n"
             "    ktlegacy_api.install(mount_app)\n"
             "    mount_app.include_router(router)\n")
SAMPLER = "ktransformers/server/backend/interfaces/transformers.py"
SAMPLER_ANCHOR = "    def logits_to_token(self, logits: torch.Tensor):\n"
SAMPLER_EDIT = (SAMPLER_ANCHOR +
                "        sampler = getattr(self, \"ktlegacy_sampler\", None)  # ktlegacy: the request's own sampling\n"
                "        if sampler is not None:\n"
                "            return sampler(logits)\n")


class ServerApiOverlay(Overlay):
    name = "server-api"
    summary = ("OpenAI/Ollama API that real clients parse; per-request sampling, usage, errors; keys, no foreign "
               "origins, bounded requests, /health with load progress, /metrics, tool calls (0.2.1.post1)")
    # every ref after the sdist, a new one included (REFS runs oldest to newest)
    not_applicable = {ref: "not ported yet: this ref's server (new backends, balance_serve, its own sampling "
                           "arguments) is not 0.2.1.post1's and has not been driven with the openai/ollama clients"
                      for ref in REFS if ref != "0.2.1.post1"}

    def shipped_files(self):
        return [SOURCE]

    def apply(self, tree, ctx):
        # the interface the shipped module drives must be upstream's 0.2.1.post1 one
        backend = tree.read("ktransformers/server/backend/interfaces/ktransformers.py")
        for needed in ("def prefill(self, input_ids: torch.Tensor, is_new: bool):", "def decode_one_tokens(self):"):
            if needed not in backend:
                raise tree.drift("ktransformers/server/backend/interfaces/ktransformers.py", repr(needed))
        tree.read("ktransformers/server/api/__init__.py")
        text = SOURCE.read_text(encoding="utf-8")
        tree.write(TARGET, text, f"OpenAI/Ollama API module ({len(text.splitlines())} lines)")
        for rel, anchors in UNMOUNT.items():
            for anchor in anchors:
                tree.replace(rel, anchor, f"{MARK}\n# {anchor}",
                             what=f"unmounted upstream's {anchor.split('(')[1].rstrip(')' + chr(10))}")
        tree.replace(ASSISTANTS, ASSISTANTS_ANCHOR, ASSISTANTS_EDIT,
                     what="assistants/threads/runs routes only with KTLEGACY_ASSISTANTS_API=1")
        tree.replace(MAIN, MAIN_ANCHOR, MAIN_EDIT, what="mount ktlegacy_api before upstream's router")
        tree.replace(MAIN, CORS_ANCHOR, CORS_EDIT, what="no CORS middleware for every origin with credentials")
        tree.replace(MAIN, LOAD_ANCHOR, LOAD_EDIT, what="listen at once, load the model on a thread (/health)")
        tree.replace(ARGS, ARGS_ANCHOR, ARGS_EDIT, what="a boolean parser for the type=bool flags")
        tree.replace(ARGS, "type=bool,", "type=_ktlegacy_bool,", count=BOOL_FLAGS,
                     what=f"{BOOL_FLAGS} flags parse True/False")
        tree.replace(GGUF, GGUF_ANCHOR, GGUF_EDIT, what="GGUFLoader reports each tensor (load progress)")
        tree.replace(SAMPLER, SAMPLER_ANCHOR, SAMPLER_EDIT, what="logits_to_token asks the request's sampler first")


OVERLAY = ServerApiOverlay()
