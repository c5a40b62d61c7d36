"""Fixtures shared by the whole suite.

Real components only: the upstream tree is the real 0.2.1.post1 sdist (downloaded through
PyPI's simple index once, hash-checked, cached under ~/.cache/ktlegacy); Docker tests use the
real engine that tests/host-setup starts. Where a component is missing the test fails and says
what to run, unless KTLEGACY_ALLOW_SKIP=1 asks for a skip (for a laptop without Docker).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _missing(what: str):
    if os.environ.get("KTLEGACY_ALLOW_SKIP") == "1":
        pytest.skip(what)
    pytest.fail(what + " (run tests/run, which sets it up, or KTLEGACY_ALLOW_SKIP=1 to skip)")


@pytest.fixture(scope="session")
def sdist_tree(tmp_path_factory) -> Path:
    """A pristine 0.2.1.post1 tree, fetched once per session. Do not modify: copy it."""
    from ktlegacy.source import fetch_source
    dest = tmp_path_factory.mktemp("upstream") / "ktransformers-0.2.1.post1"
    fetch_source(dest, "0.2.1.post1")
    return dest


@pytest.fixture
def pristine_tree(sdist_tree, tmp_path) -> Path:
    """A private copy of the pristine sdist tree, free to patch or mutate."""
    dest = tmp_path / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def docker():
    """The BuildKit-capable Docker client (ktlegacy.docker.client)."""
    from ktlegacy.docker import client
    from ktlegacy.errors import KtlegacyError
    try:
        return client()
    except KtlegacyError as exc:
        _missing(f"Docker engine: {exc}")


@pytest.fixture(scope="session")
def standin_base(docker) -> str:
    """Tag of the debootstrapped Debian stand-in for the CUDA base images."""
    from ktlegacy.standin import ensure_standin_image
    return ensure_standin_image(docker.path)
