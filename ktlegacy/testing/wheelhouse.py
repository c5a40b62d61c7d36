"""A wheelhouse for offline image builds: every package the Dockerfile installs, plus the sdist.

``invoke build --wheelhouse DIR`` makes pip inside the build use DIR only (``--no-index``), so
DIR must hold the pinned torch, the build tools (images/requirements/*.txt), ktransformers'
dependencies and, for an sdist ref, the ktransformers sdist itself. :func:`make_wheelhouse` fills
one with this machine's pip (through whatever index and proxy it is configured for), for a base
whose Python matches this one: the tests use it for the stand-in base (Debian bookworm,
Python 3.11) with the suite's CPU torch (tests/torch_cpu.py: a local wheel cache, else
PyTorch's CPU index). Users behind a firewall can do the
same on a connected machine and carry the directory over.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core.errors import KtlegacyError
from ..core.refs import DEFAULT_REF, get_ref
from ..core.source import CACHE_DIR, download_sdist

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO_ROOT / "images" / "requirements"


def ktransformers_requirements(ref_name: str = DEFAULT_REF) -> list[str]:
    """The ``[project].dependencies`` of the ref's sdist (read from the cached, hash-checked archive)."""
    ref = get_ref(ref_name)
    if ref.kind != "sdist":
        raise KtlegacyError(f"a wheelhouse is made for sdist refs only; {ref.name} is a git ref")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    archive = download_sdist(ref)
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml")), None)
        if member is None:
            raise KtlegacyError(f"{archive} has no top-level pyproject.toml")
        project = tomllib.loads(tar.extractfile(member).read().decode()).get("project", {})
    return [d.strip() for d in project.get("dependencies", [])]


def _requirement_lines(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def wheelhouse_requirements(torch_version: str, ref_name: str = DEFAULT_REF, compile_tools: bool = False) -> list[str]:
    reqs = [f"torch=={torch_version}"] + _requirement_lines(REQUIREMENTS / "build.txt")
    if compile_tools:
        reqs += _requirement_lines(REQUIREMENTS / "compile.txt")
    # torch is pinned above; ktransformers' own "torch >= x" must not pull another one
    reqs += [r for r in ktransformers_requirements(ref_name) if not re.match(r"torch\b", r)]
    reqs += _requirement_lines(REQUIREMENTS / "runtime.txt")
    return reqs


def make_wheelhouse(dest: Path | None = None, *, torch_version: str, ref: str = DEFAULT_REF,
                    find_links: tuple[str, ...] = (), extra_index_urls: tuple[str, ...] = (),
                    python_version: str = "3.11", compile_tools: bool = False) -> Path:
    """Fill (or reuse) a wheelhouse for a base with Python ``python_version``; return its path.

    The default ``dest`` is a cache directory named after the requirement set, so a second call
    with the same inputs is free. Written to a temporary directory and renamed when complete.
    """
    here = "%d.%d" % sys.version_info[:2]
    if here != python_version:
        raise KtlegacyError(f"this Python is {here} but the base image's is {python_version}: run with a "
                            f"Python {python_version} so pip picks wheels the image can install")
    reqs = wheelhouse_requirements(torch_version, ref, compile_tools)
    key = hashlib.sha256("\n".join(reqs + list(find_links) + list(extra_index_urls) + [python_version]).encode()).hexdigest()[:16]
    dest = Path(dest) if dest else CACHE_DIR / f"wheelhouse-{key}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions fill it once
        if dest.is_dir() and (dest / ".complete").is_file():
            return dest
        _fill(dest, reqs, find_links, extra_index_urls, torch_version, ref)
    return dest


def _fill(dest: Path, reqs: list[str], find_links: tuple[str, ...], extra_index_urls: tuple[str, ...],
          torch_version: str, ref: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=dest.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(tmp)]
        for link in find_links:
            cmd += ["--find-links", link]
        for url in extra_index_urls:
            cmd += ["--extra-index-url", url]
        proc = subprocess.run(cmd + reqs, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise KtlegacyError(f"pip download for the wheelhouse failed: {last}")
        torch_files = [p.name for p in tmp.glob("torch-*.whl")]
        if len(torch_files) != 1 or f"torch-{torch_version}-" not in torch_files[0]:
            raise KtlegacyError(f"the wheelhouse got torch {torch_files}, expected exactly torch {torch_version}")
        ref_info = get_ref(ref)
        shutil.copy2(download_sdist(ref_info), tmp / ref_info.filename)
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
