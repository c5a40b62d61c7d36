"""Time and size of CI's runtime lane (tests/test_runtime_lane.py): the whole image through `runtime`
with real CUDA 11.8 extensions, for sm70 and sm75, on the `--debian-bases` bases.

    .venv/bin/python bench/runtime_lane.py --label cold|warm [--out bench/results/runtime_lane.json] [--cu11-set]

1. builds the runtime image for sm70, then sm75, with the lane's request (`lane_request`), timing
   each (sm70's time includes everything the arches share: root file system, Debian CUDA bases,
   toolchain, source; a build log per arch goes to ~/.cache/ktlegacy/bench-logs/);
2. runs the two real-CUDA test files (`pytest -m cuda118`: the compile lane's tests and the runtime
   lane's, whose builds are then cache hits), timing them;
3. per arch: the smoke report, the unresolved libraries (check_libraries.py), the image size and
   the toolkit-free minimum measured inside the image: the CUDA runtime libraries it holds
   (site-packages/nvidia), torch and the Triton it requires, and our wheel (ktransformers, its
   extensions, the flash-attn stub);
4. ``--cu11-set``: downloads the pin's whole nvidia-*-cu11 set (ci-cuda-runtime.txt says why the
   lane image holds only its libcudart) and sums its installed size from the wheels' listings: the
   CUDA 11.8 libraries a user's image holds instead of the lane's CUDA 12 ones.

Writes ``runtime_lane`` as the issue asks: {arch: {smoke_passed, unresolved_libraries, image_mib,
minimum_mib, cold_s, warm_s}}; a label's own times stay under ``runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# torch 2.5.1+cu118's CUDA requirements (its wheel's Requires-Dist; pytorch's
# .github/scripts/generate_binary_build_matrix.py for 11.8 at v2.5.1)
CU11_SET = ("nvidia-cuda-nvrtc-cu11==11.8.89", "nvidia-cuda-runtime-cu11==11.8.89", "nvidia-cuda-cupti-cu11==11.8.87",
            "nvidia-cudnn-cu11==9.1.0.70", "nvidia-cublas-cu11==11.11.3.6", "nvidia-cufft-cu11==10.9.0.58",
            "nvidia-curand-cu11==10.3.0.86", "nvidia-cusolver-cu11==11.4.1.48", "nvidia-cusparse-cu11==11.7.5.86",
            "nvidia-nccl-cu11==2.21.5", "nvidia-nvtx-cu11==11.8.86")

MEASURE = r"""
import json, os, sysconfig, importlib.util
sp = sysconfig.get_paths()["purelib"]
def du(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))
ext = json.load(open("/ktlegacy/ktlegacy-extensions.json"))
ours = [importlib.util.find_spec(e["file"].split(".")[0]).origin for e in ext["extensions"]]
parts = {
    "cuda_libraries": du(os.path.join(sp, "nvidia")),
    "torch": du(os.path.join(sp, "torch")) + du(os.path.join(sp, "triton")),
    "our_wheel": du(os.path.join(sp, "ktransformers")) + sum(du(p) for p in ours) + du(os.path.join(sp, "flash_attn")),
    "site_packages": du(sp),
}
print(json.dumps(parts))
"""


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/docker", *args], capture_output=True, text=True)


def measure(tag: str) -> dict:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())
    parts = json.loads(docker("run", "--rm", tag, "python", "-c", MEASURE).stdout)
    smoke = docker("run", "--rm", tag, "sh", "-c", "python /ktlegacy/smoke/run.py --json /tmp/s.json >/dev/null; "
                   "cat /tmp/s.json")
    report = json.loads(smoke.stdout)
    libs = docker("run", "--rm", tag, "sh", "-c", "cd /ktlegacy/smoke && python check_libraries.py --json /tmp/l.json "
                  ">/dev/null; cat /tmp/l.json")
    found = json.loads(libs.stdout)
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    minimum = parts["cuda_libraries"] + parts["torch"] + parts["our_wheel"]
    return {"image_mib": mib(size), "minimum_mib": mib(minimum), "over_minimum": round(size / minimum - 1, 3),
            "parts_mib": {k: mib(v) for k, v in parts.items()},
            "smoke_passed": report["failed"] == 0, "smoke_needs_gpu": report["needs_gpu"],
            "smoke": {c["check"]: c["status"] for c in report["checks"]},
            "unresolved_libraries": sorted(f"{p}: {', '.join(n)}" for p, n in found["unresolved"].items()),
            "shared_objects_checked": found["checked"], "driver_libraries": found["driver"]}


def cu11_set_mib(cache: Path) -> dict:
    """One wheel at a time (downloaded, listed, deleted: the set is 1.8 GB), installed size as the
    runtime keeps it (no headers, no static libraries)."""
    import shutil
    sizes = {}
    for req in CU11_SET:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(cache), req],
                       check=True)
        (wheel,) = list(cache.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            installed = sum(i.file_size for i in zf.infolist()
                            if "/include/" not in i.filename and not i.filename.endswith(".a"))
        sizes[req] = {"wheel_mib": round(wheel.stat().st_size / 2**20, 1), "installed_mib": round(installed / 2**20, 1)}
    shutil.rmtree(cache, ignore_errors=True)
    return {"wheels": sizes, "installed_mib": round(sum(s["installed_mib"] for s in sizes.values()), 1)}


def main() -> int:
    from ktlegacy.build import build
    from test_cuda118_compile import ARCHES, lane_request
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime_lane.json")
    p.add_argument("--cu11-set", action="store_true")
    args = p.parse_args()
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    run = {"builds_s": {}}
    tags = {}
    for arch in ARCHES:
        logs = Path(os.environ.get("KTLEGACY_CACHE", Path.home() / ".cache" / "ktlegacy")) / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"runtime_lane-{args.label}-{arch}.log"
        start = time.monotonic()
        try:
            result = build(lane_request(arch, "runtime"), echo=True)
        except Exception as exc:
            log.write_text(getattr(exc, "log", ""))
            print(f"{arch}: build failed after {time.monotonic() - start:.0f} s: {exc}", flush=True)
            raise
        log.write_text(result.logs.get(result.tags[0], ""))
        run["builds_s"][arch] = round(time.monotonic() - start, 1)
        tags[arch] = result.tags[0]
        print(f"{arch}: built {tags[arch]} in {run['builds_s'][arch]} s", flush=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda118", "tests/test_cuda118_compile.py",
                           "tests/test_runtime_lane.py"], cwd=REPO, capture_output=True, text=True)
    run["tests_s"] = round(time.monotonic() - start, 1)
    run["tests"] = (proc.stdout.strip().splitlines() or [""])[-1]
    run["tests_exit"] = proc.returncode
    run["lane_s"] = round(sum(run["builds_s"].values()) + run["tests_s"], 1)
    data.setdefault("runs", {})[args.label] = run
    lane = data.setdefault("runtime_lane", {})
    for arch, tag in tags.items():
        entry = lane.setdefault(arch, {})
        entry.update(measure(tag))
        entry[f"{args.label}_s"] = run["builds_s"][arch]
    if args.cu11_set:
        cache = Path(os.environ.get("KTLEGACY_CACHE", Path.home() / ".cache" / "ktlegacy")) / "cu11-set"
        data["cu11_set"] = cu11_set_mib(cache)
    data["command"] = "python bench/runtime_lane.py --label LABEL [--cu11-set]"
    data["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "docker": docker("version", "--format", "{{.Server.Version}}").stdout.strip()}
    args.out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"run": run, "runtime_lane": lane}, indent=2))
    if proc.returncode:
        print(proc.stdout[-6000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
