"""runtime: ship ``ktransformers/ktlegacy_runtime.py``, the module the other overlays' code asks.

It must come first: later overlays rewrite call sites to ``ktlegacy_runtime.<fn>()``, and the
patched tree only compiles to something importable if the module is there.
"""

from pathlib import Path

from ktlegacy.overlay import Overlay

SOURCE = Path(__file__).resolve().parent / "runtime" / "ktlegacy_runtime.py"
TARGET = "ktransformers/ktlegacy_runtime.py"
PLACEHOLDER = '"@KTLEGACY_BUILD_ARCH@"'


class RuntimeOverlay(Overlay):
    name = "runtime"
    summary = "add ktransformers/ktlegacy_runtime.py (compute capability, dtype, Triton stages, SDPA prefill)"

    def shipped_files(self):
        return [SOURCE]

    def apply(self, tree, ctx):
        source = SOURCE.read_text(encoding="utf-8")
        if source.count(PLACEHOLDER) != 1:
            raise RuntimeError(f"{SOURCE}: expected one {PLACEHOLDER} placeholder")
        # The package must exist: the module goes beside upstream's own.
        tree.read("ktransformers/__init__.py")
        text = source.replace(PLACEHOLDER, repr(ctx.arch.name).replace("'", '"'))
        tree.write(TARGET, text, f"runtime module for {ctx.arch.name} ({len(text.splitlines())} lines)")


OVERLAY = RuntimeOverlay()
