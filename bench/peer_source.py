#!/usr/bin/env python3
"""The llama.cpp source the peer benchmark builds (issue 13), as a small archive to carry.

    python bench/peer_source.py --out .whl/llama.cpp-src.tar.gz [--sdist FILE]

llama.cpp's GitHub snapshot (1.4 GB with history) is over the size the library tools bring
here, so the source comes from PyPI instead: ``llama-cpp-python``'s sdist vendors llama.cpp at
a recorded upstream commit (its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@COMMIT").
This script checks the sdist's sha256, takes ``vendor/llama.cpp`` out of it and drops what a
CPU + CUDA ``llama-bench`` build never reads (docs, the tokenizer vocab test files under
``models/``, the web UI, the other GPU backends, examples, tests): 176 MB -> a few MB.
The archive's top folder is ``llama.cpp/``; ``llama.cpp/KTLEGACY-SOURCE.json`` says where it
came from. Nothing here is committed: the archive goes to the git-ignored ``.whl/``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"

# Paths under llama.cpp/ that the build never reads (CMake only descends into enabled backends,
# and LLAMA_BUILD_{TESTS,EXAMPLES,SERVER}=OFF skip those trees).
DROP = (
    "docs/", "models/", "media/", "examples/", "tests/", "pocs/", "tools/ui/", "tools/server/",
    "gguf-py/", "scripts/", "ci/", "benches/", "skills/", "requirements/", "grammars/", "conversion/",
    "ggml/src/ggml-cann/", "ggml/src/ggml-et/", "ggml/src/ggml-hexagon/", "ggml/src/ggml-metal/",
    "ggml/src/ggml-opencl/", "ggml/src/ggml-openvino/", "ggml/src/ggml-sycl/", "ggml/src/ggml-virtgpu/",
    "ggml/src/ggml-vulkan/", "ggml/src/ggml-webgpu/", "ggml/src/ggml-zdnn/", "ggml/src/ggml-zendnn/",
    "ggml/src/ggml-musa/", "ggml/src/ggml-hip/", "ggml/src/ggml-rpc/",
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def upstream_commit(changelog: str) -> str:
    """The llama.cpp commit the newest CHANGELOG entry of llama-cpp-python names."""
    m = re.search(r"update llama\.cpp to ggml-org/llama\.cpp@([0-9a-f]{7,40})", changelog)
    if not m:
        raise ValueError("the sdist's CHANGELOG.md names no llama.cpp commit")
    return m.group(1)


def keep(rel: str) -> bool:
    return not any(rel == d.rstrip("/") or rel.startswith(d) for d in DROP)


def make_archive(sdist: Path, out: Path, sha256: str = SDIST_SHA256) -> dict:
    got = _sha256(sdist)
    if got != sha256:
        raise SystemExit(f"error: {sdist} has sha256 {got}, expected {sha256} "
                         f"(llama-cpp-python {SDIST_VERSION}'s sdist): download it again")
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(sdist, "r:gz") as src:
        members = src.getmembers()
        changelog = src.extractfile(f"llama_cpp_python-{SDIST_VERSION}/CHANGELOG.md").read().decode()
        commit = upstream_commit(changelog)
        record = {"llama_cpp_commit": commit, "from": f"PyPI llama-cpp-python {SDIST_VERSION} sdist",
                  "sdist_sha256": sha256, "dropped": list(DROP)}
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write(src, members, tmp, record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    kept = sum(1 for m in members if m.name.startswith(VENDOR) and m.isfile() and keep(m.name[len(VENDOR):]))
    tmp.rename(out)
    record.update(files=kept, archive=str(out), archive_bytes=out.stat().st_size)
    return record


def _write(src, members, tmp: Path, record: dict) -> None:
    with tarfile.open(tmp, "w:gz", compresslevel=9) as dst:
        for m in members:
            if not m.name.startswith(VENDOR):
                continue
            rel = m.name[len(VENDOR):]
            if not rel or not keep(rel) or not (m.isfile() or m.isdir()):
                continue
            info = tarfile.TarInfo("llama.cpp/" + rel)
            info.mode, info.mtime, info.type = m.mode, m.mtime, m.type
            if m.isfile():
                info.size = m.size
                dst.addfile(info, src.extractfile(m))
            else:
                dst.addfile(info)
        data = json.dumps(record, indent=2).encode() + b"\n"
        info = tarfile.TarInfo("llama.cpp/KTLEGACY-SOURCE.json")
        info.size, info.mode = len(data), 0o644
        dst.addfile(info, io.BytesIO(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="archive to write (e.g. .whl/llama.cpp-src.tar.gz)")
    p.add_argument("--sdist", type=Path, help=f"{SDIST_NAME} already downloaded (default: pip download it)")
    args = p.parse_args(argv)
    sdist = args.sdist
    with tempfile.TemporaryDirectory() as d:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", d, f"llama-cpp-python=={SDIST_VERSION}"], check=True)
            sdist = Path(d) / SDIST_NAME
        elif not sdist.is_file():
            raise SystemExit(f"error: {sdist} does not exist: pass the downloaded {SDIST_NAME}")
        print(json.dumps(make_archive(sdist, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
