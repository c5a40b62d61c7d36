"""Evidence for the image's torch pin: which Triton compiles ktransformers' kernels for sm70/sm75.

For each Triton version (each in its own venv with a CPU torch, made with pip under
~/.cache/ktlegacy/venvs/triton-<version>), runs the build-time check (ktlegacy/core/triton_check.py,
no GPU) on the 0.2.1.post1 sdist, pristine and patched for each arch, and records every
launch's verdict and shared bytes in bench/results/triton_pin.json. docs/torch-pin.md reads it.

    .venv/bin/python bench/triton_pin.py 3.1.0 3.2.0 3.3.1 3.4.0 3.5.1 3.6.0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ktlegacy.core.arch import ARCHES  # noqa: E402
from ktlegacy.core.overlay import patch_tree  # noqa: E402
from ktlegacy.core.source import fetch_source  # noqa: E402
from ktlegacy.core.triton_check import check_tree  # noqa: E402

VENVS = Path(os.environ.get("KTLEGACY_CACHE", Path.home() / ".cache" / "ktlegacy")) / "venvs"
TORCH_CPU = os.environ.get("KTLEGACY_TEST_TORCH_CPU", "torch==2.13.0+cpu")
# The torch release that pins each Triton (its requires_dist on Linux x86_64; 3.1.0 and 3.2.0
# confirmed from pip resolver output, the others from release notes and issue reports).
TORCH_FOR_TRITON = {"3.1.0": "2.5.1", "3.2.0": "2.6.0", "3.3.1": "2.7.1", "3.4.0": "2.8.0",
                    "3.5.1": "2.9.1", "3.6.0": "2.11.0"}


def venv_for(version: str) -> Path:
    root = VENVS / f"triton-{version}"
    python = root / "bin" / "python"
    reqs = [f"triton=={version}", TORCH_CPU]
    marker = root / ".ktlegacy-requirements"
    if not (marker.is_file() and marker.read_text() == "\n".join(reqs) + "\n"):
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *reqs], check=True)
        marker.write_text("\n".join(reqs) + "\n")
    return python


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("versions", nargs="+")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "triton_pin.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ktlegacy-triton-pin-"))
    pristine = work / "pristine"
    fetch_source(pristine, "0.2.1.post1")
    trees = {"pristine": pristine}
    for name, arch in ARCHES.items():
        trees[f"patched-{name}"] = work / f"patched-{name}"
        shutil.copytree(pristine, trees[f"patched-{name}"], symlinks=True)
        patch_tree(trees[f"patched-{name}"], arch, out=lambda line: None)
    runs = []
    for version in args.versions:
        python = venv_for(version)
        for tree_name, tree in trees.items():
            for name, arch in ARCHES.items():
                if tree_name.startswith("patched-") and tree_name != f"patched-{name}":
                    continue
                for r in check_tree(tree, [arch], python=str(python)):
                    if r.verdict == "not-run":
                        continue
                    runs.append({"triton": version, "torch": TORCH_FOR_TRITON.get(version, "?"),
                                 "tree": tree_name, "arch": name, "kernel": r.kernel, "scenario": r.scenario,
                                 "num_warps": r.num_warps, "num_stages": r.num_stages, "shared": r.shared,
                                 "limit": r.limit, "verdict": r.verdict,
                                 "detail": r.detail or None, "message": r.message() if r.failed else None})
                print(f"triton {version} {tree_name} {name}: done", flush=True)
    data = {
        "what": "Triton kernels of ktransformers 0.2.1.post1 compiled for sm70/sm75 without a GPU "
                "(ktlegacy/core/triton_check.py); shared bytes per block vs the arch limit",
        "command": "bench/triton_pin.py " + " ".join(args.versions),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, no GPU)",
        "torch_cpu_in_venvs": TORCH_CPU,
        "results": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} ({len(runs)} launches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
