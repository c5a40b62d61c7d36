"""ktlegacy.testing.wheelhouse: what an offline build's wheelhouse must hold (the cached sdist is real)."""

import pytest

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.testing.wheelhouse import ktransformers_requirements, make_wheelhouse, wheelhouse_requirements


def test_requirements_come_from_the_sdist_and_pin_torch_once():
    deps = ktransformers_requirements("0.2.1.post1")
    assert "transformers == 4.43.2" in deps and any(d.startswith("torch") for d in deps)
    reqs = wheelhouse_requirements("2.13.0+cpu", "0.2.1.post1")
    assert [r for r in reqs if r.startswith("torch")] == ["torch==2.13.0+cpu"]
    assert "pyyaml>=6" in reqs and "cpufeature" not in reqs
    assert "cpufeature" in wheelhouse_requirements("2.5.1+cu118", "0.2.1.post1", compile_tools=True)


def test_git_refs_and_foreign_pythons_are_refused(tmp_path):
    with pytest.raises(KtlegacyError, match="sdist refs only"):
        ktransformers_requirements("v0.3.1")
    with pytest.raises(KtlegacyError, match="base image's is 3.10"):
        make_wheelhouse(tmp_path / "wh", torch_version="2.5.1+cu118", python_version="3.10")
    assert not (tmp_path / "wh").exists()


@pytest.mark.docker
def test_standin_wheelhouse_holds_everything(standin_wheelhouse):
    names = {p.name for p in standin_wheelhouse.iterdir()}
    assert "ktransformers-0.2.1.post1.tar.gz" in names
    assert [n for n in names if n.startswith("torch-")] == ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert any(n.startswith("transformers-4.43.2-") for n in names)
