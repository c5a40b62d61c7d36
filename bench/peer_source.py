#!/usr/bin/env python3
"""The peers' source the peer benchmark builds (issues 13, 26), as small archives to carry.

    python bench/peer_source.py --out .whl/llama.cpp-src.tar.gz [--sdist FILE]
    python bench/peer_source.py --peer ik_llama_cpp --out .whl/ik_llama.cpp-src.tar.gz [--sdist FILE]

Both peers' GitHub snapshots are over the size the library tools bring here, so their source
comes from PyPI sdists that vendor it (``PEERS`` below, each pinned by version and sha256):

- ``llama_cpp``: ``llama-cpp-python``'s sdist vendors llama.cpp at a recorded upstream commit
  (its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@COMMIT"). What a CPU + CUDA
  ``llama-bench`` build never reads is dropped (docs, the tokenizer vocab test files under
  ``models/``, the web UI, the other GPU backends, examples, tests): 176 MB -> a few MB.
- ``ik_llama_cpp``: ``ik-llama-cpp-python``'s sdist vendors ik_llama.cpp as a git submodule and
  records no commit. Only what the ``llama-bench`` build reads is kept (the top CMake files,
  ``cmake/``, ``common/``, ``src/``, ``include/``, ``ggml/`` without the Vulkan/SYCL/CANN/Kompute/
  Metal/RPC backends, the two vendored libraries ``common`` needs, ``examples/llama-bench/``):
  2,600 files / 42 MB -> about 3 MB. ik's ``examples/CMakeLists.txt`` adds every example, so
  ``bench/peer_build_llama.sh`` adds ``examples/llama-bench`` alone, as ik-llama-cpp-python's own
  CMakeLists.txt does for ``examples/quantize``.

This script checks the sdist's sha256, takes the vendored tree out of it and writes an archive
whose top folder is the peer's (``llama.cpp/`` or ``ik_llama.cpp/``), with ``KTLEGACY-SOURCE.json``
in it saying where it came from. Nothing here is committed: archives go to the git-ignored ``.whl/``.
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
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peer:
    name: str             # --peer
    dist: str             # the PyPI project
    version: str
    sha256: str           # of its sdist
    vendor: str           # the vendored tree, inside the sdist's top folder
    top: str              # the archive's top folder
    drop: tuple = ()      # paths under the tree the build never reads
    keep_only: tuple = () # if set: only these paths are kept (then ``drop`` applies within them)
    needs: tuple = ()     # files the build reads: an sdist without them is refused

    @property
    def sdist_name(self) -> str:
        return f"{self.dist.replace('-', '_')}-{self.version}.tar.gz"

    @property
    def prefix(self) -> str:
        return f"{self.dist.replace('-', '_')}-{self.version}/{self.vendor}"

    def keep(self, rel: str) -> bool:
        if self.keep_only and not any(rel == k.rstrip("/") or rel.startswith(k) or k.startswith(rel + "/")
                                      for k in self.keep_only):
            return False
        return not any(rel == d.rstrip("/") or rel.startswith(d) for d in self.drop)


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

# ik_llama.cpp (an older layout: llama-bench is under examples/, backends are single files in
# ggml/src/): what a CPU + CUDA llama-bench build reads, and the backends' sources dropped from it.
IK_KEEP_ONLY = (
    "CMakeLists.txt", "LICENSE", "cmake/", "common/", "src/", "include/", "ggml/",
    "vendor/cpp-httplib/", "vendor/nlohmann/", "examples/llama-bench/",
)
IK_DROP = (
    "ggml/src/kompute/", "ggml/src/kompute-shaders/", "ggml/src/vulkan-shaders/", "ggml/src/ggml-sycl/",
    "ggml/src/ggml-cann/", "ggml/src/ggml-vulkan.cpp", "ggml/src/ggml-sycl.cpp", "ggml/src/ggml-cann.cpp",
    "ggml/src/ggml-kompute.cpp", "ggml/src/ggml-metal.m", "ggml/src/ggml-metal.metal", "ggml/src/ggml-rpc.cpp",
)

PEERS = {
    "llama_cpp": Peer(
        name="llama_cpp", dist="llama-cpp-python", version="0.3.36",
        sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        vendor="vendor/llama.cpp/", top="llama.cpp", drop=DROP,
        needs=("CMakeLists.txt",)),
    "ik_llama_cpp": Peer(
        name="ik_llama_cpp", dist="ik-llama-cpp-python", version="0.1.5",
        sha256="33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad",
        vendor="vendor/ik_llama.cpp/", top="ik_llama.cpp", drop=IK_DROP, keep_only=IK_KEEP_ONLY,
        needs=("CMakeLists.txt", "examples/llama-bench/llama-bench.cpp", "ggml/src/iqk/iqk_mul_mat.cpp")),
}

# llama.cpp's names, as before this module had two peers.
SDIST_VERSION = PEERS["llama_cpp"].version
SDIST_NAME = PEERS["llama_cpp"].sdist_name
SDIST_SHA256 = PEERS["llama_cpp"].sha256
VENDOR = PEERS["llama_cpp"].prefix


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


def keep(rel: str, peer: str = "llama_cpp") -> bool:
    return PEERS[peer].keep(rel)


def _record(peer: Peer, src: tarfile.TarFile, names: set, sha256: str) -> dict:
    top = peer.prefix[: -len(peer.vendor)]
    record = {"peer": peer.name, "from": f"PyPI {peer.dist} {peer.version} sdist", "sdist_sha256": sha256}
    if peer.name == "llama_cpp":
        record["llama_cpp_commit"] = upstream_commit(src.extractfile(top + "CHANGELOG.md").read().decode())
    else:
        # a git submodule in the sdist's repository: no .git, and neither PKG-INFO nor the
        # package's files name the ik_llama.cpp commit
        record["ik_llama_cpp_commit"] = None
        record["commit_note"] = (f"{peer.dist} {peer.version} vendors ik_llama.cpp as a git submodule "
                                 "(github.com/ikawrakow/ik_llama.cpp) and records no commit")
        # ik's .gitignore has "build*", so the sdist lacks this script that common/CMakeLists.txt runs
        record["missing_from_sdist"] = {
            "common/cmake/build-info-gen-cpp.cmake": "bench/peer_build_llama.sh writes it (build-info.cpp from "
                                                     "build-info.cpp.in, commit 'unknown')"}
    if peer.keep_only:
        record["kept_only"] = list(peer.keep_only)
    record["dropped"] = list(peer.drop)
    return record


def make_archive(sdist: Path, out: Path, sha256: str | None = None, peer: str = "llama_cpp") -> dict:
    p = PEERS[peer]
    sha256 = sha256 or p.sha256
    got = _sha256(sdist)
    if got != sha256:
        raise SystemExit(f"error: {sdist} has sha256 {got}, expected {sha256} "
                         f"({p.dist} {p.version}'s sdist): download it again")
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(sdist, "r:gz") as src:
        members = src.getmembers()
        names = {m.name for m in members}
        missing = [n for n in p.needs if p.prefix + n not in names]
        if missing:
            raise ValueError(f"the sdist holds no {p.prefix}{missing[0]}: not {p.dist} {p.version}'s layout")
        record = _record(p, src, names, sha256)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write(p, src, members, tmp, record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    kept = sum(1 for m in members if m.name.startswith(p.prefix) and m.isfile() and p.keep(m.name[len(p.prefix):]))
    tmp.rename(out)
    record.update(files=kept, archive=str(out), archive_bytes=out.stat().st_size)
    return record


def _write(p: Peer, src, members, tmp: Path, record: dict) -> None:
    with tarfile.open(tmp, "w:gz", compresslevel=9) as dst:
        for m in members:
            if not m.name.startswith(p.prefix):
                continue
            rel = m.name[len(p.prefix):].rstrip("/")
            if not rel or not p.keep(rel) or not (m.isfile() or m.isdir()):
                continue
            info = tarfile.TarInfo(f"{p.top}/{rel}")
            info.mode, info.mtime, info.type = m.mode, m.mtime, m.type
            if m.isfile():
                info.size = m.size
                dst.addfile(info, src.extractfile(m))
            else:
                dst.addfile(info)
        data = json.dumps(record, indent=2).encode() + b"\n"
        info = tarfile.TarInfo(f"{p.top}/KTLEGACY-SOURCE.json")
        info.size, info.mode = len(data), 0o644
        dst.addfile(info, io.BytesIO(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=sorted(PEERS), default="llama_cpp",
                   help="which peer's source (default llama_cpp)")
    p.add_argument("--out", type=Path, required=True,
                   help="archive to write (e.g. .whl/llama.cpp-src.tar.gz, .whl/ik_llama.cpp-src.tar.gz)")
    p.add_argument("--sdist", type=Path, help="the peer's sdist already downloaded (default: pip download it)")
    args = p.parse_args(argv)
    peer = PEERS[args.peer]
    sdist = args.sdist
    with tempfile.TemporaryDirectory() as d:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", d, f"{peer.dist}=={peer.version}"], check=True)
            sdist = Path(d) / peer.sdist_name
        elif not sdist.is_file():
            raise SystemExit(f"error: {sdist} does not exist: pass the downloaded {peer.sdist_name}")
        print(json.dumps(make_archive(sdist, args.out, peer=args.peer), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
