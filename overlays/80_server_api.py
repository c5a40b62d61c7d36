"""server-api: the HTTP API works with real OpenAI and Ollama clients (0.2.1.post1's server).

Upstream's routes trip the ``openai`` and ``ollama`` client packages (a bare-list
``/v1/models``, ``/api/chat`` and non-streamed ``/api/generate`` not implemented, unparsable
``/api/tags`` timestamps, no ``usage``) and ignore the requests' ``max_tokens``, ``temperature``,
``top_p`` and ``stop``: every request samples at the start-up temperature, so ``temperature=0``
is not greedy. The overlay ships ``ktransformers/server/api/ktlegacy_api.py`` (our code, see its
docstring), mounts it from ``main.py`` before upstream's router, takes upstream's chat,
completion, model-list and Ollama routers out of that router (the assistants API stays), and
gives ``TransformersInterface.logits_to_token`` (which ``KTransformersInterface`` inherits) a
per-request sampler hook. Written against 0.2.1.post1's server; the git refs reworked the
server (balance_serve, new backends) and are not covered yet.
"""

from pathlib import Path

from ktlegacy.overlay import Overlay

SOURCE = Path(__file__).resolve().parent / "server_api" / "ktlegacy_api.py"
TARGET = "ktransformers/server/api/ktlegacy_api.py"
MARK = "# ktlegacy: served by server/api/ktlegacy_api.py"

# file -> [(anchor, replacement)]: upstream routers taken out (kept as comments with the marker)
UNMOUNT = {
    "ktransformers/server/api/__init__.py": ["router.include_router(ollama_router)\n"],
    "ktransformers/server/api/openai/__init__.py": ["router.include_router(chat_router)\n",
                                                     "router.include_router(legacy_router)\n"],
}
MAIN = "ktransformers/server/main.py"
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
    summary = "OpenAI/Ollama API that real clients parse; per-request sampling, usage, errors (0.2.1.post1)"
    refs = ("0.2.1.post1",)
    not_applicable = {ref: "not ported yet: this ref's server (new backends, balance_serve, its own sampling "
                           "arguments) is not 0.2.1.post1's and has not been driven with the openai/ollama clients"
                      for ref in ("v0.2.4post1", "v0.3.1", "v0.3.2", "v0.4.1", "v0.7.0")}

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
        tree.replace(MAIN, MAIN_ANCHOR, MAIN_EDIT, what="mount ktlegacy_api before upstream's router")
        tree.replace(SAMPLER, SAMPLER_ANCHOR, SAMPLER_EDIT, what="logits_to_token asks the request's sampler first")


OVERLAY = ServerApiOverlay()
