"""sdpa: DeepSeek MLA prefill runs on SDPA instead of FlashAttention 2, and sm<80 takes that path.

``KDeepseekV2Attention`` calls ``flash_attn_func`` in its Triton and flashinfer paths; each call
becomes ``ktlegacy_runtime.sdpa_prefill`` (same arguments, same semantics: layout, softmax
scale, bottom-right causal mask, v head dim; see overlays/runtime/ktlegacy_runtime.py), and the
``flash_attn`` import becomes optional. Routing:

* 0.2.1.post1 sends only Windows to ``forward_windows``; we add ``KTLEGACY_PREFILL=windows`` so
  the upstream path stays selectable for comparison.
* flashinfer's MLA path (taken whenever flashinfer imports) is kept for sm80+.
* v0.2.4post1 and later send ``get_compute_capability() < 8`` to ``forward_windows`` (in
  attention.py, and models.py builds the causal mask that path needs under the same test); we
  replace that test by ``KTLEGACY_PREFILL=windows`` in both files, so sm<80 runs the
  Triton/SDPA path by default.
"""

import re

from ktlegacy.core.overlay import Overlay

ATTENTION = "ktransformers/operators/attention.py"
MODELS = "ktransformers/operators/models.py"
IMPORT_LINE = "from ktransformers import ktlegacy_runtime  # ktlegacy"
WINDOWS = 'ktlegacy_runtime.prefill_path() == "windows"'
CC_TEST = r"get_compute_capability\(\)\s*<\s*8"

BARE_IMPORT = "\nfrom flash_attn import flash_attn_func\n"
OPTIONAL_IMPORT = (
    "\ntry:\n"
    "    from flash_attn import flash_attn_func\n"
    "except ImportError:  # ktlegacy: prefill runs on SDPA (ktlegacy_runtime.sdpa_prefill)\n"
    "    pass\n")
FLASHINFER_BRANCH = "            if flashinfer_enabled:\n                return self.forward_linux_flashinfer(\n"
UPSTREAM_OPTIONAL = "\ntry:\n    from flash_attn import flash_attn_func\nexcept:\n"


class SdpaOverlay(Overlay):
    name = "sdpa"
    summary = "flash_attn_func -> SDPA (ktlegacy_runtime.sdpa_prefill); sm<80 prefill off forward_windows"

    def apply(self, tree, ctx):
        text = tree.read(ATTENTION)
        if BARE_IMPORT in text:
            tree.replace(ATTENTION, BARE_IMPORT, OPTIONAL_IMPORT, what="flash_attn import made optional")
        elif OPTIONAL_IMPORT not in text and UPSTREAM_OPTIONAL not in text:
            raise tree.drift(ATTENTION, "'from flash_attn import flash_attn_func' (bare or in try/except)")
        tree.insert_line(ATTENTION, IMPORT_LINE,
                         after=r"^from ktransformers\.operators\.triton_attention import decode_attention_fwd_grouped\b.*$",
                         what="import ktlegacy_runtime")
        tree.sub(ATTENTION, r"(?<![\w.])flash_attn_func\(", "ktlegacy_runtime.sdpa_prefill(",
                 applied=r"ktlegacy_runtime\.sdpa_prefill\(", what="flash_attn_func(...) -> ktlegacy_runtime.sdpa_prefill(...)")

        # flashinfer's MLA kernels need sm80+: below it the Triton path runs even where
        # flashinfer happens to be installed.
        tree.replace(ATTENTION, FLASHINFER_BRANCH, FLASHINFER_BRANCH.replace(
            "if flashinfer_enabled:", "if flashinfer_enabled and not ktlegacy_runtime.is_legacy():"),
            what="flashinfer MLA prefill only on sm80+")

        if ctx.ref.name == "0.2.1.post1":
            tree.replace(ATTENTION, "        if os.name == 'nt':\n            return self.forward_windows(",
                         f"        if os.name == 'nt' or {WINDOWS}:\n            return self.forward_windows(",
                         what="forward_windows also selectable with KTLEGACY_PREFILL=windows")
        else:
            tree.sub(ATTENTION, CC_TEST, WINDOWS, count=1, applied=re.escape(WINDOWS),
                     what="sm<80 -> Triton/SDPA prefill; forward_windows only with KTLEGACY_PREFILL=windows")
            tree.insert_line(MODELS, IMPORT_LINE, after=r"^from ktransformers\.util\.utils import .*$",
                             what="import ktlegacy_runtime")
            tree.sub(MODELS, CC_TEST, WINDOWS, count=1, applied=re.escape(WINDOWS),
                     what="causal mask for forward_windows under the same KTLEGACY_PREFILL test")


OVERLAY = SdpaOverlay()
