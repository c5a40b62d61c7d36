"""The CPU torch the test suite installs, and where pip gets it (tests/run, the cached venvs of
tests/cached_venv.py and the stand-in wheelhouse all ask here).

PyPI has no ``+cpu`` builds (its Linux torch is the CUDA build with GBs of nvidia-* wheels), so:

1. a local wheel directory, ``KTLEGACY_TORCH_WHEELS`` (default ``/opt/wheels``, which some CI
   machines pre-load), is used as a cache when it holds the pinned wheel;
2. otherwise pip reads PyTorch's CPU index, ``KTLEGACY_TORCH_INDEX_URL`` (default
   https://download.pytorch.org/whl/cpu; a mirror of it works), as an extra index beside PyPI.

``KTLEGACY_TEST_TORCH_VERSION`` changes the pin (default 2.13.0+cpu). ``python tests/torch_cpu.py``
prints the requirement and the pip arguments, one per line (tests/run reads them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_VERSION = "2.13.0+cpu"
DEFAULT_WHEELS = "/opt/wheels"
DEFAULT_INDEX_URL = "https://download.pytorch.org/whl/cpu"

VERSION = os.environ.get("KTLEGACY_TEST_TORCH_VERSION", DEFAULT_VERSION)
REQUIREMENT = f"torch=={VERSION}"


def local_wheel(version: str = VERSION, wheels: str | None = None) -> Path | None:
    """The pinned torch wheel in the local cache directory, if it is there."""
    d = Path(wheels if wheels is not None else os.environ.get("KTLEGACY_TORCH_WHEELS", DEFAULT_WHEELS))
    found = sorted(d.glob(f"torch-{version}-*.whl")) if d.is_dir() else []
    return found[-1] if found else None


def find_links(version: str = VERSION) -> tuple[str, ...]:
    """``("DIR",)`` when the local cache has the pin, else ``()``."""
    wheel = local_wheel(version)
    return (str(wheel.parent),) if wheel else ()


def index_urls(version: str = VERSION) -> tuple[str, ...]:
    """The extra index that has the pin when the local cache does not (empty variable: none,
    e.g. a pin that PyPI itself carries)."""
    if find_links(version):
        return ()
    url = os.environ.get("KTLEGACY_TORCH_INDEX_URL", DEFAULT_INDEX_URL).strip()
    return (url,) if url else ()


def pip_args(version: str = VERSION) -> list[str]:
    """What pip needs besides PyPI to install ``torch==version``."""
    args = []
    for link in find_links(version):
        args += ["--find-links", link]
    for url in index_urls(version):
        args += ["--extra-index-url", url]
    return args


if __name__ == "__main__":
    print(REQUIREMENT)
    print("\n".join(pip_args()))
    sys.exit(0)
