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


REFS = {
    "0.2.1.post1": Ref(
        "0.2.1.post1", "0.2.1.post1", "sdist",
        sha256="079ee36fbefe1280455f6cb2d9afaf840a9fed350acecdcf94f03b113aa94199",
        filename="ktransformers-0.2.1.post1.tar.gz",
    ),
    # Upstream did not bump __version__ in step with its tags: the v0.3.1 tree says "0.3" and
    # the v0.3.2 tree says "0.3.1" (read with `git show <tag>:ktransformers/__init__.py`).
    "v0.2.4post1": Ref("v0.2.4post1", "0.2.4post1", "git"),
    "v0.3.1": Ref("v0.3.1", "0.3", "git"),
    "v0.3.2": Ref("v0.3.2", "0.3.1", "git"),
}

DEFAULT_REF = "0.2.1.post1"


def get_ref(name: str) -> Ref:
    if name in REFS:
        return REFS[name]
    raise KtlegacyError(
        f"unknown ktransformers ref {name!r}: supported refs are {', '.join(REFS)} "
        "(or pass --src DIR with a tree you fetched yourself)"
    )


def ref_for_version(version: str) -> Ref | None:
    """The supported ref whose tree reports ``version`` (``ktransformers.__version__``)."""
    for ref in REFS.values():
        if ref.version == version:
            return ref
    return None
