#!/usr/bin/env python3
"""ktransformers (the patched build) imports and is the version the image claims."""

import os

from smokelib import fail

try:
    import ktransformers
except Exception as exc:  # any import failure is the finding
    fail(f"import ktransformers: {type(exc).__name__}: {exc}")

try:
    from importlib.metadata import version
    installed = version("ktransformers")
except Exception as exc:
    fail(f"ktransformers has no installed distribution metadata: {exc}")

if "+ktlegacy." not in installed and os.environ.get("KTLEGACY_IMAGE_ARCH"):
    fail(f"installed ktransformers {installed} is not a ktlegacy build (expected a +ktlegacy.* local version)")
print(f"ktransformers {ktransformers.__version__} imports (distribution {installed})")
