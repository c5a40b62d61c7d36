#!/usr/bin/env python3
"""The installed extensions hold SASS for exactly the image's arch: the compile stage's arch check
(images/scripts/check_cuda_arch.py, cuobjdump --list-elf) run again on the files Python imports.

Every extension the build recorded is checked, whatever its name; those recorded with device code
must hold a cubin for the arch. cuobjdump comes from Triton's wheel (triton/backends/nvidia/bin),
which torch installs beside it: the runtime carries no CUDA toolkit. No GPU needed. Skipped on
the no-CUDA stand-in (nothing compiled).
"""

import subprocess
import sys

from smokelib import extension_files, fail, helper_file, image_arch, skip, standin

if standin():
    skip("stand-in build, no CUDA: no extension to check")
arch = image_arch()
if not arch:
    skip("no arch to check against (KTLEGACY_IMAGE_ARCH / KTLEGACY_ARCH unset)")
files = extension_files()
if not files:
    fail("the build recorded no compiled extension")
argv = [sys.executable, str(helper_file("check_cuda_arch.py")), "--arch", arch]
for name, (_path, device) in sorted(files.items()):
    if device:
        argv += ["--require-device-code", f"{name}*"]
argv += [str(path) for path, _ in files.values()]
proc = subprocess.run(argv, capture_output=True, text=True)
if proc.returncode != 0:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    fail(next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else f"exit {proc.returncode}"))
device = sorted(n for n, (_, d) in files.items() if d)
print(f"{len(files)} installed extension(s) checked for {arch}: SASS for exactly {arch} in {', '.join(device) or 'none'}; "
      f"host-only: {', '.join(sorted(set(files) - set(device))) or 'none'}")
