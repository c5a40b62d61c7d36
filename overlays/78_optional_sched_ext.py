"""optional-sched-ext: the model caches import without the balance_serve extension (v0.7.0).

``models/custom_cache.py`` holds the ``StaticCache`` that local_chat and the ``ktransformers``
server backend use. Up to v0.4.1 it imported balance_serve's C++ scheduler module only if it
was there (``try: from ...balance_serve.settings import sched_ext / except: print("no
balance_serve")``); from v0.5.0 the import is bare (upstream commit 1e695633, NPU cache work),
so without ``sched_ext`` nothing that touches the cache imports. ktlegacy builds no balance_serve
below sm80 (flashinfer, and at v0.7.0 its submodules are gone from the tag), so the overlay puts
the guard back. In that file ``sched_ext`` only appears in two string annotations of the batch
caches (``load(self, inference_context: "sched_ext.InferenceContext")``), which balance_serve
alone calls, and which the serve-backend-guard overlay keeps from starting below sm80.
"""

from ktlegacy.core.overlay import Overlay

CACHE = "ktransformers/models/custom_cache.py"
BARE = ("from transformers.models.llama.modeling_llama import LlamaDecoderLayer\n"
        "from ktransformers.server.balance_serve.settings import sched_ext\n")
GUARDED = ("from transformers.models.llama.modeling_llama import LlamaDecoderLayer\n"
           "try:  # ktlegacy: optional, as up to v0.4.1 (balance_serve is not built below sm80)\n"
           "    from ktransformers.server.balance_serve.settings import sched_ext\n"
           "except ImportError:\n"
           "    sched_ext = None\n")


class OptionalSchedExtOverlay(Overlay):
    name = "optional-sched-ext"
    summary = "custom_cache.py imports without balance_serve's sched_ext (bare import since v0.5.0)"
    not_applicable = {ref: "custom_cache.py imports sched_ext only if it is there (try/except) or not at all"
                      for ref in ("0.2.1.post1", "v0.2.4post1", "v0.3.1", "v0.3.2", "v0.4.1")}

    def apply(self, tree, ctx):
        text = tree.read(CACHE)
        if text.count("sched_ext") != 3 + (GUARDED in text):
            raise tree.drift(CACHE, "sched_ext in the import and two string annotations only")
        tree.replace(CACHE, BARE, GUARDED, what="sched_ext import made optional (balance_serve not built)")


OVERLAY = OptionalSchedExtOverlay()
