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

import torch_cpu

REPO = Path(__file__).resolve().parent.parent


def _missing(what: str):
    if os.environ.get("KTLEGACY_ALLOW_SKIP") == "1":
        pytest.skip(what)
    pytest.fail(what + " (run tests/run, which sets it up, or KTLEGACY_ALLOW_SKIP=1 to skip)")


TAG_TREES_ENV = "KTLEGACY_TAG_TREES"


def exported_tag_tree(tag: str, dest_root: Path) -> tuple[Path, Path]:
    """(pristine export, private copy free to patch) of git tag ``tag`` from KTLEGACY_TAG_TREES=DIR
    (``DIR/<tag>``: the tag's top, or its archive/ from v0.4.2 on, exported with git archive). CI
    cannot reach GitHub: without the variable, or without the export, the test skips and says so."""
    root = os.environ.get(TAG_TREES_ENV)
    if not root:
        pytest.skip(f"{TAG_TREES_ENV} is not set: export the tags with git archive into DIR/<tag> to run "
                    "(CI cannot reach GitHub)")
    src = Path(root) / tag
    if not (src / "ktransformers" / "__init__.py").is_file():
        pytest.skip(f"{src} holds no exported ktransformers tree")
    dest = Path(dest_root) / tag
    shutil.copytree(src, dest, symlinks=True)
    return src, dest


@pytest.fixture(scope="session")
def sdist_tree(tmp_path_factory) -> Path:
    """A pristine 0.2.1.post1 tree, fetched once per session. Do not modify: copy it."""
    from ktlegacy.core.source import fetch_source
    dest = tmp_path_factory.mktemp("upstream") / "ktransformers-0.2.1.post1"
    fetch_source(dest, "0.2.1.post1")
    return dest


@pytest.fixture(scope="session")
def patched_tree(tmp_path_factory, request):
    """``patched_tree(ref, arch)``: the tree of a supported ref patched for an arch, made once per
    session; read only. The sdist ref is fetched (CI); a git ref comes from KTLEGACY_TAG_TREES (the
    test skips without it, see exported_tag_tree)."""
    from ktlegacy.core.arch import get_arch
    from ktlegacy.core.facts import REFS
    from ktlegacy.core.overlay import patch_tree
    made: dict[tuple[str, str], Path] = {}

    def get(ref: str, arch: str) -> Path:
        if (ref, arch) not in made:
            root = tmp_path_factory.mktemp(f"patched-{ref}-{arch}")
            if REFS[ref].kind == "sdist":
                tree = root / "tree"
                shutil.copytree(request.getfixturevalue("sdist_tree"), tree, symlinks=True)
            else:
                _, tree = exported_tag_tree(ref, root)
            patch_tree(tree, get_arch(arch), out=lambda line: None)
            made[ref, arch] = tree
        return made[ref, arch]
    return get


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
    from ktlegacy.core.errors import KtlegacyError
    try:
        return client()
    except KtlegacyError as exc:
        _missing(f"Docker engine: {exc}")


@pytest.fixture(scope="session")
def standin_base(docker) -> str:
    """Tag of the debootstrapped Debian stand-in for the CUDA base images."""
    from ktlegacy.standin import ensure_standin_image
    return ensure_standin_image(docker)


# -- the stand-in image build (helper h3; also used by the compose and publish tests) -------------

STANDIN_TORCH_VERSION = torch_cpu.VERSION   # the suite's CPU torch (tests/torch_cpu.py)
STANDIN_REPOSITORY = "h3-ktlegacy/ktransformers"


@pytest.fixture(scope="session")
def standin_wheelhouse(docker) -> Path:
    """Every package the stand-in build installs (the suite's CPU torch, the build tools,
    ktransformers' dependencies) plus the 0.2.1.post1 sdist: the build needs no network."""
    from ktlegacy.testing.wheelhouse import make_wheelhouse
    return make_wheelhouse(torch_version=STANDIN_TORCH_VERSION, find_links=torch_cpu.find_links(STANDIN_TORCH_VERSION),
                           extra_index_urls=torch_cpu.index_urls(STANDIN_TORCH_VERSION))


@pytest.fixture(scope="session")
def standin_runtime_image(docker, standin_base, standin_wheelhouse) -> str:
    """Tag of images/Dockerfile's runtime stage built for sm75 on the no-CUDA stand-in base,
    offline (--network none) from the wheelhouse. Its extensions are not compiled and its
    labels say so (io.ktlegacy.standin=true); its build ran the in-container smoke."""
    from ktlegacy.build import BuildRequest, build
    from ktlegacy.core.errors import KtlegacyError
    try:
        result = build(BuildRequest("sm75", standin=True, base_image=standin_base,
                                    torch_version=STANDIN_TORCH_VERSION, wheelhouse=standin_wheelhouse,
                                    offline=True, repository=STANDIN_REPOSITORY),
                       echo=False, out=lambda line: None)
    except KtlegacyError as exc:
        log = getattr(exc, "log", "")
        pytest.fail(f"stand-in image build failed: {exc}\n" + "\n".join(log.splitlines()[-60:]))
    return result.tags[0]
