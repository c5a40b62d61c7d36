"""The upstream ktransformers refs ktlegacy supports, and where each one comes from.

The sdist is the only ref CI can fetch (PyPI is reachable, GitHub is not), so it is pinned
by hash; the git tags are fetched with their submodules and their resolved commit is
recorded next to the tree (see :mod:`ktlegacy.core.source`). The table (``REFS``, ``DEFAULT_REF``)
is in :mod:`ktlegacy.core.facts`.
"""

from __future__ import annotations

from .errors import KtlegacyError
from .facts import DEFAULT_REF, REFS, Ref  # noqa: F401  (the table lives in ktlegacy/core/facts.py; re-exported)

UPSTREAM_GIT_URL = "https://github.com/kvcache-ai/ktransformers.git"
PYPI_SIMPLE_URL = "https://pypi.org/simple"


def get_ref(name: str) -> Ref:
    if name in REFS:
        return REFS[name]
    raise KtlegacyError(
        f"unknown ktransformers ref {name!r}: supported refs are {', '.join(REFS)} "
        "(fetch-source takes another tag or commit with --git-url URL, or your own tree with --local DIR)"
    )
