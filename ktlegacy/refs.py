"""The upstream ktransformers refs ktlegacy supports, and where each one comes from.

The sdist is the only ref CI can fetch (PyPI is reachable, GitHub is not), so it is pinned
by hash; the git tags are fetched with their submodules and their resolved commit is
recorded next to the tree (see :mod:`ktlegacy.source`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KtlegacyError

UPSTREAM_GIT_URL = "https://github.com/kvcache-ai/ktransformers.git"
PYPI_SIMPLE_URL = "https://pypi.org/simple"


@dataclass(frozen=True)
class Ref:
    name: str         # what users pass to --ref
    version: str      # ktransformers.__version__ as that tree spells it (read at the tag, see below)
    kind: str         # "sdist" (PyPI) or "git"
    sha256: str = ""  # sdist only: the file's hash, verified on every download
    filename: str = ""  # sdist only: the file name on the simple index
    commit: str = ""  # git only: the commit the tag names (fetch-source refuses another one)
    # git only: where the legacy engine lives in the repository at that tag ("" = the top).
    # From v0.4.2 on upstream keeps it under archive/, and its third_party/ there lacks the
    # llama.cpp and pybind11 submodules, which stay at the top: fetch-source puts them back.
    subdir: str = ""
    submodules: tuple = ()  # git only, with subdir: top-level submodules the engine builds from


REFS = {
    "0.2.1.post1": Ref(
        "0.2.1.post1", "0.2.1.post1", "sdist",
        sha256="079ee36fbefe1280455f6cb2d9afaf840a9fed350acecdcf94f03b113aa94199",
        filename="ktransformers-0.2.1.post1.tar.gz",
    ),
    # Upstream did not bump __version__ in step with its tags: the v0.3.1 tree says "0.3", the
    # v0.3.2 tree "0.3.1", v0.4.1 "0.3.2", and every tag from v0.4.2 to v0.7.0 "0.4.1" (read
    # with `git show <tag>:ktransformers/__init__.py`). So the version names no ref: a tree's
    # ref comes from its content (ktlegacy/fingerprints.json, see ktlegacy.fingerprint).
    "v0.2.4post1": Ref("v0.2.4post1", "0.2.4post1", "git", commit="6617549de0d1f40b0e9254105be7dcc11bf97de5"),
    "v0.3.1": Ref("v0.3.1", "0.3", "git", commit="32f3d7befb906ddc2563e43dda1ad04703272f49"),
    "v0.3.2": Ref("v0.3.2", "0.3.1", "git", commit="495ae374780bff7aeb4c5742b8a6a13ec1eca221"),
    "v0.4.1": Ref("v0.4.1", "0.3.2", "git", commit="e40ba6dfae17ab24212ddcc6ab4b32594258f04d"),
    # The newest legacy engine: archive/ of v0.7.0 (2026-08); its balance_serve submodules
    # (spdlog, xxHash, prometheus-cpp, PhotonLibOS) are gone, so it builds without balance_serve.
    "v0.7.0": Ref("v0.7.0", "0.4.1", "git", commit="e80614fc2d2c3990bd1abe895d5014fc14733fde",
                  subdir="archive", submodules=("third_party/llama.cpp", "third_party/pybind11")),
}

DEFAULT_REF = "0.2.1.post1"


def get_ref(name: str) -> Ref:
    if name in REFS:
        return REFS[name]
    raise KtlegacyError(
        f"unknown ktransformers ref {name!r}: supported refs are {', '.join(REFS)} "
        "(or pass --src DIR with a tree you fetched yourself)"
    )
