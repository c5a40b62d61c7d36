"""Code for tests and benchmarks, not for serving: synthetic models and wheelhouses.

- :mod:`ktlegacy.testing.testmodel`: synthetic DeepSeek-V2/V3 GGUF checkpoints
  (``invoke make-test-model``, what the GPU proofs load);
- :mod:`ktlegacy.testing.peer_model`: a DeepSeek-V2-Lite-shaped GGUF (``--preset v2-lite``,
  bench/peer_run.sh);
- :mod:`ktlegacy.testing.wheelhouse`: fills a wheelhouse for an offline ``invoke build
  --wheelhouse DIR`` (the tests' stand-in build, bench/build_cache.py).

Their third-party packages (``tokenizers``, ``numpy``, ``gguf``) come with the ``testing``
extra (``pip install 'ktlegacy[testing]'``; the ``test`` extra includes it), not with the
base install: the commands users run never import this package except ``make-test-model``,
which says in one line which extra is missing (:func:`require`).
"""

from __future__ import annotations

import importlib.util

from ..core.errors import KtlegacyError

EXTRA = "testing"


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` this interpreter cannot import (checked without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(what: str, *modules: str, extra: str = EXTRA) -> None:
    """Raise one line naming the extra to install when a module ``what`` needs is missing."""
    absent = missing(*modules)
    if absent:
        raise KtlegacyError(f"{what} needs {', '.join(absent)}, which the base install leaves out: "
                            f"pip install 'ktlegacy[{extra}]' (from a checkout: pip install -e '.[{extra}]')")
