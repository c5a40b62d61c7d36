"""What the smoke checks share: the skip protocol and where the build's records are.

Not a check itself (run.py only runs check_*.py). Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SKIP = 77
# The runtime image copies the build's records here (images/Dockerfile); outside an image,
# KTLEGACY_MANIFEST_DIR may point at a directory holding them.
MANIFEST_DIR = Path(os.environ.get("KTLEGACY_MANIFEST_DIR", "/ktlegacy"))


# A skip whose reason starts with this is one only a GPU lifts; run.py reports those apart.
NEEDS_GPU = "needs a GPU: "
HERE = Path(__file__).resolve().parent


def helper_file(name: str) -> Path:
    """A file the smoke runs but does not own, without a copy: in the image the build puts it in
    ``lib/`` beside the checks (images/Dockerfile); in a checkout it is read where it lives."""
    repo = HERE.parent.parent
    for candidate in (HERE / "lib" / name, repo / "images" / "scripts" / name,
                      repo / "ktlegacy" / "testing" / name):
        if candidate.is_file():
            return candidate
    fail(f"{name} is missing beside the smoke checks ({HERE / 'lib'}) and in the checkout")


def fail(reason: str):
    print(f"FAIL: {reason}", file=sys.stderr)
    sys.exit(1)


# ktlegacy/core/facts.py through check_cuda_arch.py, its one loader (in lib/ in the image, images/scripts/ in a checkout)
sys.path.insert(0, str(helper_file("check_cuda_arch.py").parent))
from check_cuda_arch import FACTS as _FACTS  # noqa: E402

ARCH_CC = {name: arch.compute_capability for name, arch in _FACTS.ARCHES.items()}


def skip(reason: str, gpu: bool = False):
    print(f"skipped: {NEEDS_GPU if gpu else ''}{reason}")
    sys.exit(SKIP)


def record(name: str) -> dict | None:
    path = MANIFEST_DIR / name
    return json.loads(path.read_text()) if path.is_file() else None


def standin() -> bool:
    """True on the no-CUDA stand-in build (its extensions were not compiled, by design)."""
    if os.environ.get("KTLEGACY_IMAGE_STANDIN", "").lower() == "true":
        return True
    ext = record("ktlegacy-extensions.json")
    return bool(ext and ext.get("mode") == "skip")


def image_arch() -> str | None:
    """The arch this image (or this machine's build) targets: KTLEGACY_IMAGE_ARCH, else KTLEGACY_ARCH."""
    return os.environ.get("KTLEGACY_IMAGE_ARCH") or os.environ.get("KTLEGACY_ARCH") or None


def extension_files() -> dict:
    """Module name -> (installed file, holds device code) of every compiled extension the build
    recorded (any number of them), found where Python imports it from."""
    import importlib.util
    ext = record("ktlegacy-extensions.json") or {}
    found = {}
    for entry in ext.get("extensions", []):
        name = Path(entry["file"]).name.split(".")[0]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            fail(f"extension {name} (built: {entry['file']}) is not installed")
        found[name] = (Path(spec.origin), bool(entry.get("device_code")))
    return found


def expected_extensions() -> list[str]:
    """Module names of the compiled extensions: from the build record, else ktransformers' two."""
    ext = record("ktlegacy-extensions.json")
    if ext and ext.get("mode") == "build":
        return sorted({Path(e["file"]).name.split(".")[0] for e in ext["extensions"]})
    return ["KTransformersOps", "cpuinfer_ext"]


# /proc/cpuinfo flags each CPU_INSTRUCT build of cpuinfer_ext executes (its CMake flags): the
# doctor's table.
CPU_FLAGS = _FACTS.CPU_FLAGS


def missing_cpu_flags() -> list[str]:
    """Flags the image's CPU set needs that this CPU lacks ([] if fine or unknown: NATIVE, no /proc)."""
    wanted = CPU_FLAGS.get(os.environ.get("KTLEGACY_IMAGE_CPU_INSTRUCT", "").upper(), ())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in wanted if f not in have]
