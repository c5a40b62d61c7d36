"""Compile every Triton kernel of a patched ktransformers tree for sm70/sm75; fail if one does not fit.

The same check as ``python -m ktlegacy check-triton`` (ktlegacy/core/triton_check.py), runnable
from a checkout without installing ktlegacy -- in the image's kernels stage or on a GPU host:

    python images/scripts/check_triton_kernels.py --src /src --arch sm75 [--python PY] [--json OUT]

No GPU is used. Prints a table (kernel, scenario, arch, triton, warps, stages, shared bytes,
limit, verdict); on failure prints one line naming the kernel, the arch and the bytes needed
vs the limit (or the compiler's error) and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if (REPO / "ktlegacy" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ktlegacy.core import triton_check  # noqa: E402,F401  (registers check-triton)
from ktlegacy.core.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["check-triton", *sys.argv[1:]]))
