#!/usr/bin/env python3
"""Every shared object in the image finds the libraries it links: ``ldd`` on each ``*.so*`` file
prints no "not found".

Scanned: the whole file system but /proc, /sys, /dev (in the image: the OS, Python, the venv with
torch, Triton, the CUDA wheels and our extensions). The extensions find torch's libraries and CUDA
11.8's libcudart through their RUNPATH (images/scripts/assemble_wheel.py), so no import order or
LD_LIBRARY_PATH is assumed. Not counted as missing: the driver's libraries (libcuda.so.1,
libnvidia-ml.so.1 ...), which the NVIDIA container runtime mounts from the host when the container
gets a GPU; they are listed apart. Outside an image (KTLEGACY_IMAGE_ARCH unset): skipped, a host's
own libraries are not this check's business. ``--json FILE`` writes what was found.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smokelib import fail, skip

# Sonames of the NVIDIA driver (user-space side), injected at run time by the NVIDIA container runtime.
DRIVER = re.compile(r"^lib(cuda|nvidia-[\w-]+|nvcuvid|nvoptix)\.so(\.\d+)*$")
SKIP_DIRS = ("/proc", "/sys", "/dev", "/run", "/tmp")
ELF_MAGIC = b"\x7fELF"

if not os.environ.get("KTLEGACY_IMAGE_ARCH") and "--all" not in sys.argv:
    skip("not inside a ktlegacy image (KTLEGACY_IMAGE_ARCH unset): the host's libraries are not checked")
ldd = shutil.which("ldd")
if ldd is None:
    fail("ldd is missing from the image (libc-bin)")


def shared_objects(root: str = "/") -> list[str]:
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in SKIP_DIRS]
        for name in files:
            if ".so" not in name:
                continue
            path = os.path.join(top, name)
            if not re.search(r"\.so(\.\d+)*$", name) or os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as fh:
                    if fh.read(4) != ELF_MAGIC:
                        continue  # a linker script (libc.so) or data
            except OSError:
                continue
            found.append(path)
    return sorted(found)


def missing(path: str) -> list[str]:
    proc = subprocess.run([ldd, path], capture_output=True, text=True)
    return [line.split("=>")[0].strip() for line in proc.stdout.splitlines() if "not found" in line]


files = shared_objects()
with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
    results = dict(zip(files, pool.map(missing, files)))
unresolved = {path: [n for n in names if not DRIVER.match(n)] for path, names in results.items()}
unresolved = {path: names for path, names in unresolved.items() if names}
driver = sorted({n for names in results.values() for n in names if DRIVER.match(n)})
if "--json" in sys.argv:
    out = Path(sys.argv[sys.argv.index("--json") + 1])
    out.write_text(json.dumps({"checked": len(files), "unresolved": unresolved, "driver": driver}, indent=2) + "\n")
if unresolved:
    first = next(iter(unresolved))
    fail(f"{len(unresolved)} of {len(files)} shared objects link libraries that are not in the image, first: "
         f"{first} needs {', '.join(unresolved[first])}")
print(f"{len(files)} shared objects: every linked library resolves"
      + (f" (the host's driver brings {', '.join(driver)} with the NVIDIA runtime)" if driver else ""))
