"""triton-stages: the Triton MLA decode kernels launch with 1 pipeline stage below sm80.

Upstream pins ``num_stages=2`` on both decode launches (stage 1 and the grouped stage); two
stages need more shared memory per block than Volta (96 KiB) and Turing (64 KiB) give, so the
launch fails there. ``ktlegacy_runtime.triton_decode_num_stages()`` returns 1 below sm80 and 2
on sm80+, where the second stage is worth it (49.5 vs 85.2 us per call on an H100).
"""

import re

from ktlegacy.core.overlay import Overlay

TRITON = "ktransformers/operators/triton_attention.py"
IMPORT_LINE = "from ktransformers import ktlegacy_runtime  # ktlegacy"
STAGES = "num_stages=ktlegacy_runtime.triton_decode_num_stages(),"


class TritonStagesOverlay(Overlay):
    name = "triton-stages"
    summary = "Triton decode launches: num_stages=2 -> 1 below sm80 (ktlegacy_runtime.triton_decode_num_stages)"

    def apply(self, tree, ctx):
        tree.insert_line(TRITON, IMPORT_LINE, after=r"^import triton\.language as tl$", what="import ktlegacy_runtime")
        tree.sub(TRITON, r"^([ \t]*)num_stages=2,", lambda m: m[1] + STAGES, count=2,
                 applied=re.escape(STAGES), what="num_stages=2 -> triton_decode_num_stages() x2")


OVERLAY = TritonStagesOverlay()
