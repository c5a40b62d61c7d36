"""runtime: ship ``ktransformers/ktlegacy_runtime.py``, the module the other overlays' code asks.

It must come first: later overlays rewrite call sites to ``ktlegacy_runtime.<fn>()``, and the
patched tree only compiles to something importable if the module is there.
"""

from pathlib import Path

from ktlegacy.core import facts
from ktlegacy.core.overlay import Overlay

SOURCE = Path(__file__).resolve().parent / "runtime" / "ktlegacy_runtime.py"
TARGET = "ktransformers/ktlegacy_runtime.py"


def placeholders(arch) -> dict:
    """Each quoted placeholder of the module and the literal it becomes (from ktlegacy/core/facts.py)."""
    return {
        '"@KTLEGACY_BUILD_ARCH@"': repr(arch.name).replace("'", '"'),
        '"@KTLEGACY_BUILD_CC@"': repr(tuple(arch.compute_capability)),
        '"@KTLEGACY_GPU_PREFILL_MIN_TOKENS@"': repr(facts.GPU_PREFILL_MIN_TOKENS),
        '"@KTLEGACY_GPU_PREFILL_MIB@"': repr(facts.GPU_PREFILL_MIB),
    }


class RuntimeOverlay(Overlay):
    name = "runtime"
    summary = "add ktransformers/ktlegacy_runtime.py (compute capability, dtype, Triton stages, SDPA prefill)"

    def shipped_files(self):
        return [SOURCE]

    def apply(self, tree, ctx):
        text = SOURCE.read_text(encoding="utf-8")
        for placeholder, value in placeholders(ctx.arch).items():
            if text.count(placeholder) != 1:
                raise RuntimeError(f"{SOURCE}: expected one {placeholder} placeholder")
            text = text.replace(placeholder, value)
        # The package must exist: the module goes beside upstream's own.
        tree.read("ktransformers/__init__.py")
        tree.write(TARGET, text, f"runtime module for {ctx.arch.name} ({len(text.splitlines())} lines)")


OVERLAY = RuntimeOverlay()
