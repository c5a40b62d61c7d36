"""ktlegacy/core/facts.py is the one table; what cannot import it is generated or loads it.

What is left here is what ``python -m ktlegacy.generate --check`` (tests/test_generate.py) and the
by-path loaders cannot see:

* the table agrees with itself (a CUDA bump that misses the torch pin or the base images fails);
* names and choices the files spell themselves: the Dockerfile's LABEL keys, compose's image
  names, the workflow's ref options and matrix, every setting used by compose;
* a scan of the repository finds each pinned value, each arch or CPU-flag table, each label name
  and each tag suffix only in the table, in the generated files, or in the places listed in
  ``ALLOWED`` with the reason. docs/, bench/ (experiments that compare versions) and recorded
  fixtures are not scanned; neither are the tests, which check behaviour against the table.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ktlegacy import generate
from ktlegacy.core import facts
from ktlegacy.core.facts import (ARCHES, BASE_IMAGE, CPU_FLAGS, CPU_INSTRUCTS, CUDA_TAG, CUDA_VERSION,
                            DEFAULT_CPU_INSTRUCT, DEFAULT_REF, DEFAULT_REPOSITORY, REFS, RUNTIME_IMAGE,
                            TORCH_INDEX_URL, TORCH_VERSION)
from ktlegacy.images import image_tag, parse_tag

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "images" / "Dockerfile"


# --- the table agrees with itself -----------------------------------------------------------------

def test_cuda_torch_and_bases_name_the_same_cuda():
    assert CUDA_TAG == "cu" + CUDA_VERSION.replace(".", "")
    assert TORCH_VERSION.endswith("+" + CUDA_TAG) and TORCH_INDEX_URL.endswith("/" + CUDA_TAG)
    for image, flavour in ((BASE_IMAGE, "-devel-"), (RUNTIME_IMAGE, "-runtime-")):
        assert image.startswith(f"nvidia/cuda:{CUDA_VERSION}.") and flavour in image, image
    assert BASE_IMAGE.replace("-devel-", "-runtime-") == RUNTIME_IMAGE   # same release, same OS


def test_arch_rows_agree_with_their_name():
    for name, arch in ARCHES.items():
        major, minor = arch.compute_capability
        assert name == arch.name == f"sm{major}{minor}"
        assert arch.torch_cuda_arch_list == arch.cc_string == f"{major}.{minor}"
        assert arch.cuobjdump_name == f"sm_{major}{minor}"
        assert arch.compute_capability < (8, 0)   # ktlegacy is for pre-Ampere cards only


def test_cpu_sets_and_labels_are_consistent():
    """(The ref table's own consistency: tests/test_source.py.)"""
    assert DEFAULT_CPU_INSTRUCT in CPU_INSTRUCTS
    assert set(CPU_FLAGS) == set(CPU_INSTRUCTS) - {"NATIVE"}
    # each set runs the code of the one before it, plus more
    sets = [CPU_FLAGS[name] for name in CPU_INSTRUCTS if name in CPU_FLAGS]
    for smaller, larger in zip(sets, sets[1:]):
        assert larger[:len(smaller)] == smaller and len(larger) > len(smaller)
    labels = [v for k, v in vars(facts).items() if k.startswith("LABEL_")]
    assert len(set(labels)) == len(labels)
    assert set(labels) == set(facts.IMAGE_LABELS) | {facts.LABEL_BASE, facts.LABEL_DEBIAN_MIRROR}


# --- the copies ------------------------------------------------------------------------------------

def test_dockerfile_labels_are_the_table():
    """The runtime stage's LABEL keys are the label names of the table (values: ktlegacy.generate)."""
    text = DOCKERFILE.read_text()
    (block,) = re.findall(r"^LABEL ((?:.*\\\n)*.*)$", text, flags=re.M)
    labels = dict(re.findall(r'([\w.-]+)="([^"]*)"', block))
    assert set(facts.IMAGE_LABELS) <= set(labels)
    assert {k for k in labels if k.startswith("io.ktlegacy.")} == {k for k in facts.IMAGE_LABELS
                                                                    if k.startswith("io.ktlegacy.")}


def test_debian_bases_label():
    text = (REPO / "images" / "debian-cuda.Dockerfile").read_text()
    assert re.findall(r'^LABEL ([\w.-]+)="', text, flags=re.M) == [facts.LABEL_BASE] * 2


def _expand(template: str) -> str:
    """compose's ${VAR:-default} with no variable set (nested defaults too)."""
    while True:
        expanded = re.sub(r"\$\{\w+:-([^${}]*)\}", r"\1", template)
        if expanded == template:
            return expanded
        template = expanded


def test_compose_image_defaults_are_the_tag_scheme():
    """Without docker: each service's image, with no variable set, is image_tag of the default ref
    and CPU set for its arch (tests/test_compose.py checks the same through `docker compose config`)."""
    text = (REPO / "compose" / "compose.yaml").read_text()
    images = [_expand(m) for m in re.findall(r'^\s+image: "(.*)"$', text, flags=re.M)]
    services = yaml.safe_load(text)["services"]
    assert len(images) == len(services) >= 2
    for image in images:
        parts = parse_tag(image)
        assert parts and parts.arch in ARCHES, image
        assert image == image_tag(DEFAULT_REF, ARCHES[parts.arch], DEFAULT_CPU_INSTRUCT, DEFAULT_REPOSITORY)


def test_workflow_refs_and_matrix_are_of_the_table():
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(on["workflow_dispatch"]["inputs"]["ref"]["options"]) <= set(REFS)   # default: generated
    (job,) = wf["jobs"].values()
    assert set(job["strategy"]["matrix"]["arch"]) <= set(ARCHES)
    assert set(job["strategy"]["matrix"]["cpu"]) <= set(CPU_INSTRUCTS) - {"NATIVE"}


def test_every_setting_is_used_by_compose():
    """Every row of facts.SETTINGS is a ${KTLEGACY_X:-default} of compose.yaml (the defaults: generated)."""
    text = (REPO / "compose" / "compose.yaml").read_text()
    used = {}
    for name, default in re.findall(r"\$\{(KTLEGACY_\w+):-((?:[^${}]|\$\{[^}]*\})*)\}", text):
        used.setdefault(name, set()).add(default)
    assert set(facts.SETTINGS) <= set(used), set(facts.SETTINGS) - set(used)
    for name, setting in facts.SETTINGS.items():
        assert setting.kind in ("count", "port", "address", "gpu", "choice", "args", "text"), name
        assert setting.kind != "choice" or setting.default in setting.choices, name
    example = dict(re.findall(r"^(KTLEGACY_\w+)=(.*)$", (REPO / "compose" / ".env.example").read_text(), flags=re.M))
    assert {f"KTLEGACY_GPU_{i}" for i in range(facts.MAX_GPUS)} <= set(example)
    from ktlegacy.profiles import PROFILES
    assert max(p.gpus for p in PROFILES.values()) == facts.MAX_GPUS


# --- nothing else holds a copy ---------------------------------------------------------------------

def _needles() -> dict[str, re.Pattern]:
    arch_keys = "|".join(ARCHES)
    return {
        "torch pin": re.compile(re.escape(TORCH_VERSION)),
        "torch index": re.compile(re.escape(TORCH_INDEX_URL)),
        "Triton of the pin": re.compile(r"(?<![\d.])" + re.escape(facts.TRITON_VERSION) + r"(?![\d.])"),
        "CUDA base image": re.compile(r"nvidia/cuda:\S"),
        "CUDA tag in an image tag": re.compile(re.escape(f"-{CUDA_TAG}-")),
        # a table keyed by arch name ("sm70": ...), or an arch list given literally
        "arch table": re.compile(rf"""["']({arch_keys})["']\s*:|TORCH_CUDA_ARCH_LIST=\d"""),
        "CPU flag table": re.compile(r"""["'](f16c|avx512bw|avx512_vnni)["']"""),
        "CPU set table": re.compile(r"""["']FANCY["']"""),
        "label name": re.compile(r"io\.ktlegacy\.[a-z]"),
        "tag suffix": re.compile("|".join(re.escape(f'"{s}') for s in (facts.STANDIN_SUFFIX, facts.DIRTY_SUFFIX))
                                 + "|" + "|".join(re.escape(f"'{s}") for s in (facts.STANDIN_SUFFIX,
                                                                                facts.DIRTY_SUFFIX))),
        "tag regex": re.compile(r"sm\[0-9\]|sm\\d"),
    }


# ktlegacy.generate writes the table's values into these files (and names them): any needle may be there.
GENERATED = {rule.path for rule in generate.rules()} | {"ktlegacy/generate.py"}
# Where else a needle may appear besides ktlegacy/core/facts.py: {needle: {path: why}}.
PROSE = "prose: says which value and why, changes with the table by hand (like docs/)"
ALLOWED = {
    "Triton of the pin": {
        "images/Dockerfile": PROSE + " (the header's why-2.5.1 paragraph)",
        "overlays/runtime/ktlegacy_runtime.py": PROSE + " (the stage count measured with that Triton)",
    },
    "CUDA tag in an image tag": {"ktlegacy/images.py": "the tag scheme's module: its docstring's example"},
    "arch table": {"images/scripts/check_cuda_arch.py": PROSE + " (its docstring's example error line)"},
    "tag regex": {"ktlegacy/images.py": "parse_tag, the one parser of the tag scheme"},
}
NOT_SCANNED = ("docs/", "bench/", "tests/fixtures/", "README.md")


def _scanned_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = []
    for rel in filter(None, listed):
        if rel.startswith(NOT_SCANNED) or rel == "ktlegacy/core/facts.py" or rel.endswith(".json"):
            continue
        if rel.startswith("tests/") and not rel.startswith("tests/smoke/"):
            continue
        if (REPO / rel).is_file():
            files.append(Path(rel))
    return files


def test_no_copy_of_a_fact_outside_the_table():
    needles = _needles()
    assert set(ALLOWED) <= set(needles)
    found: dict[str, set] = {name: set() for name in needles}
    for rel in _scanned_files():
        try:
            text = (REPO / rel).read_text()
        except UnicodeDecodeError:
            continue
        for name, pattern in needles.items():
            if pattern.search(text):
                found[name].add(rel.as_posix())
    stray = {f"{name}: {path}" for name, paths in found.items()
             for path in paths - set(ALLOWED.get(name, ())) - GENERATED}
    assert not stray, ("a fact of ktlegacy/core/facts.py copied outside it (import it, load it by path, or have "
                       f"ktlegacy/generate.py write it): {sorted(stray)}")
    stale = {f"{name}: {path}" for name, paths in ALLOWED.items() for path in set(paths) - found[name]}
    assert not stale, f"ALLOWED lists places that no longer hold the value: {sorted(stale)}"


@pytest.mark.parametrize("name, text", [
    ("torch pin", f'pip install torch=={TORCH_VERSION}'),
    ("arch table", 'ARCHS = {"sm75": (7, 5)}'),
    ("CPU flag table", 'NEED = ("avx2", "fma", "f16c")'),
    ("label name", 'labels["io.ktlegacy.arch"]'),
    ("tag suffix", 'tag + "-standin"'),
    ("Triton of the pin", f"triton=={facts.TRITON_VERSION}"),
])
def test_the_scan_sees_a_copy(name, text):
    """The scan's patterns match the copies they are meant to catch."""
    assert _needles()[name].search(text)


def test_the_scan_leaves_other_versions_alone():
    needles = _needles()
    assert not needles["Triton of the pin"].search("triton 3.1.01, 13.1.0")
    assert not needles["arch table"].search('profile "sm75" image')
