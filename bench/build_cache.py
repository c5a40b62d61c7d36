"""How well images/Dockerfile uses the BuildKit cache, on the stand-in base (no CUDA needed).

    .venv/bin/python bench/build_cache.py [--out bench/results/build_cache.json]

Measures, in a scratch copy of the build context (the checkout is never touched):
1. a first build of the stand-in sm75 runtime image (warm or cold, whatever the daemon holds),
2. a no-op rebuild: wall time and how many RUN/COPY steps were CACHED (all should be),
3. a rebuild after editing a library module the image does not run (a comment appended to
   ``ktlegacy/doctor.py``): every stage copies only the modules it runs, so every step must be
   CACHED here too (before, the source stage copied all of ``ktlegacy/``: the sdist was fetched
   again and every stage after it re-ran),
4. a rebuild after a Python-only overlay change (an extra overlay that appends a comment to
   ``ktransformers/local_chat.py``): wall time, which steps ran, and whether the compile stage's
   RUN (compile_extensions.py) was a cache hit -- the proof that such a change does not recompile
   the C++/CUDA extensions,
5. image sizes: the runtime image vs the build stage (``--target compile``: toolchain + extensions).

On the stand-in the compile stage compiles nothing (no nvcc), but its cache key is the same as in
a CUDA build: the C++ side of the patched tree, the compile script and the build args. Writes JSON
(machine, command, numbers) and prints one summary line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ktlegacy.standin import ensure_standin_image  # noqa: E402
from ktlegacy.testing.wheelhouse import make_wheelhouse  # noqa: E402

TORCH = "2.13.0+cpu"
REPOSITORY = "h3-bench/ktransformers"
CONTEXT_DIRS = ("ktlegacy", "overlays", "images", "tests/smoke")
UNRUN_MODULE = "ktlegacy/doctor.py"   # the library module the case 3 edit goes to: no stage runs it

PYTHON_ONLY_OVERLAY = '''"""bench only: a Python-only change (a comment appended to local_chat.py)."""
from ktlegacy.core.overlay import Overlay

MARK = "# ktlegacy bench: python-only overlay change\\n"


class BenchPythonOnly(Overlay):
    name = "bench-python-only"
    summary = "append a comment to ktransformers/local_chat.py"

    def apply(self, tree, ctx):
        text = tree.read("ktransformers/local_chat.py")
        if not text.endswith(MARK):
            tree.write("ktransformers/local_chat.py", text + MARK, "bench comment")


OVERLAY = BenchPythonOnly()
'''


def copy_context(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *CONTEXT_DIRS],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def build(context: Path, base: str, wheelhouse: Path, target: str = "runtime") -> dict:
    cmd = [sys.executable, "-m", "ktlegacy", "build", "--arch", "sm75", "--standin", "--base-image", base,
           "--torch-version", TORCH, "--wheelhouse", str(wheelhouse), "--offline", "--target", target,
           "--tag", f"{REPOSITORY}:{target}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=context, env=dict(os.environ, PYTHONPATH=str(context)),
                          capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"build failed: {proc.stderr.strip()[-500:]}\n{proc.stdout[-3000:]}")
    log = proc.stdout
    steps = {m.group(1): m.group(2) for m in re.finditer(r"^#(\d+) \[([^\]]+\] (?:RUN|COPY) .*)$", log, re.M)}
    cached = set(re.findall(r"^#(\d+) CACHED$", log, re.M))
    ran = sorted(d for i, d in steps.items() if i not in cached)
    compile_steps = [i for i, d in steps.items() if "compile_extensions.py" in d and "] RUN" in d]
    return {"wall_s": round(wall, 2), "steps": len(steps), "cached": len(set(steps) & cached), "ran": ran,
            "compile_stage_cached": bool(compile_steps) and all(i in cached for i in compile_steps),
            "command": "python " + " ".join(cmd[1:])}


def image_size(tag: str) -> int:
    out = subprocess.run(["/usr/bin/docker", "image", "inspect", "--format", "{{.Size}}", tag],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "build_cache.json")
    args = p.parse_args(argv)

    base = ensure_standin_image()
    wheelhouse = make_wheelhouse(torch_version=TORCH, find_links=("/opt/wheels",))
    results = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, no GPU; "
                          "docker " + subprocess.run(["/usr/bin/docker", "version", "--format", "{{.Server.Version}}"],
                                                     capture_output=True, text=True).stdout.strip(),
               "command": "bench/build_cache.py", "base": base, "torch": TORCH}
    with tempfile.TemporaryDirectory(prefix="h3-bench-context-") as tmp:
        context = Path(tmp)
        copy_context(context)
        results["first_build"] = build(context, base, wheelhouse)
        results["noop_rebuild"] = build(context, base, wheelhouse)
        doctor = context / UNRUN_MODULE
        doctor.write_text(doctor.read_text() + "# bench: an edit to a module no image stage runs\n")
        results["unrun_module_rebuild"] = build(context, base, wheelhouse)
        results["unrun_module_rebuild"]["edited"] = UNRUN_MODULE
        (context / "overlays" / "zz_bench_python_only.py").write_text(PYTHON_ONLY_OVERLAY)
        results["python_only_overlay_rebuild"] = build(context, base, wheelhouse)
        results["build_stage"] = build(context, base, wheelhouse, target="compile")
    results["sizes_bytes"] = {"runtime": image_size(f"{REPOSITORY}:runtime"),
                              "build_stage_compile": image_size(f"{REPOSITORY}:compile")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    n, u, o = results["noop_rebuild"], results["unrun_module_rebuild"], results["python_only_overlay_rebuild"]
    print(f"no-op rebuild: {n['wall_s']} s, {n['cached']}/{n['steps']} steps cached")
    print(f"{UNRUN_MODULE} edited: {u['wall_s']} s, {u['cached']}/{u['steps']} steps cached"
          + (f"; ran: {', '.join(u['ran'])}" if u["ran"] else ""))
    print(f"python-only overlay change: {o['wall_s']} s, {o['cached']}/{o['steps']} cached, compile stage "
          f"{'CACHED (no recompile)' if o['compile_stage_cached'] else 'RE-RUN'}; ran: {', '.join(o['ran'])}")
    s = results["sizes_bytes"]
    print(f"sizes: runtime {s['runtime'] / 1e9:.2f} GB, build stage (compile) {s['build_stage_compile'] / 1e9:.2f} GB")
    print(f"wrote {args.out}")
    return 0 if (n["cached"] == n["steps"] and u["cached"] == u["steps"] and o["compile_stage_cached"]) else 1


if __name__ == "__main__":
    sys.exit(main())
