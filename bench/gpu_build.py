#!/usr/bin/env python3
"""Build the patched extensions for ``7.5+PTX`` with the image's compile script, on a GPU host.

    python bench/gpu_build.py --src TREE --out EXT_DIR [--jobs 16] [--cpu-instruct AVX2]

``images/scripts/compile_extensions.py`` builds one arch as SASS only (``sm75`` ->
``TORCH_CUDA_ARCH_LIST=7.5``), which is right for an image and useless on the H100 we have:
an sm_90 card cannot run sm_75 SASS, but its driver JIT-compiles ``compute_75`` PTX, and the
code it runs then takes the same ``__CUDA_ARCH__ < 800`` branches as a T4. So this runs the
same script (same setup.py build_ext, same arch check) with ``7.5+PTX`` as the arch list, and
then asks ``check_cuda_arch.py`` to require the PTX too (``--expect-ptx``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "images" / "scripts"


def main(argv=None) -> int:
    sys.path.insert(0, str(SCRIPTS))
    import compile_extensions as ce
    ce.ARCH_LISTS = dict(ce.ARCH_LISTS, sm75="7.5+PTX")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--arch" not in argv:
        argv += ["--arch", "sm75"]
    code = ce.main(argv)
    if code:
        return code
    out = Path(argv[argv.index("--out") + 1])
    sos = sorted(str(p) for p in out.rglob("*.so"))
    return subprocess.run([sys.executable, str(SCRIPTS / "check_cuda_arch.py"), "--arch", "sm75",
                           "--expect-ptx", *sos]).returncode


if __name__ == "__main__":
    sys.exit(main())
