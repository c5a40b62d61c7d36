"""The real CUDA 11.8 compile (issue 11): images/Dockerfile's `compile` stage, for sm70 and for
sm75, on CUDA 11.8 bases made here from the Debian mirror (`invoke build --debian-bases`: a
debootstrapped bookworm plus Debian's non-free nvidia-cuda-toolkit 11.8.89). The same
images/scripts run as in the product build: compile_extensions.py builds KTransformersOps and
cpuinfer_ext with nvcc 11.8 and checks them with check_cuda_arch.py and CUDA 11.8's cuobjdump.

Which torch the CI compile builds against, and why: **PyPI's torch 2.5.1, a CUDA 12.4 build**,
i.e. the product pin's version and headers, not its +cu118 build: +cu118 wheels live only on
download.pytorch.org, which CI cannot reach. torch's extension builder refuses an nvcc of another
CUDA major (11.8 vs 12.4), so the CI build's one substitution, the build arg KTLEGACY_CI_TORCH=2.5.1,
also makes compile_extensions.py waive that one comparison (the host-compiler bounds of CUDA 11.8
still apply); the images it reaches are labelled io.ktlegacy.ci-torch, which `publish` refuses
(tests/test_runtime_lane.py builds them through the runtime stage). (The alternative, PyPI's torch 2.0.1, a CUDA 11.7 build, needs setuptools < 70 for its
cpp_extension and is far from the pin.) The extensions link Debian's libcudart 11.8 and torch
2.5.1's libraries and import beside it without a GPU. The product image keeps torch
2.5.1+cu118 (docs/images.md).

Marked `cuda118` (and `slow`, `docker`): CI runs it; `-m 'not cuda118'` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy.core import facts
from ktlegacy.build import DEBIAN_BASE_REPOSITORY, BuildRequest, plan

REPO = Path(__file__).resolve().parent.parent
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

CI_TORCH_VERSION = facts.TORCH_VERSION.split("+")[0]   # the pin's release from PyPI: CUDA 12.4 (docstring)
BASE_REPOSITORY = "h11-ktlegacy-debian-cuda"
REPOSITORY = "h11-ktlegacy/ktransformers"
ARCHES = {name: arch.cuobjdump_name for name, arch in facts.ARCHES.items()}   # arch -> its cubins' name


def lane_request(arch: str, target: str) -> BuildRequest:
    """CI's real CUDA 11.8 build of ``arch`` up to ``target``: the user's `invoke build --arch ARCH
    --debian-bases` with the one substitution (KTLEGACY_CI_TORCH). The compile and runtime lanes
    ask the same, so the runtime lane's build finds the compile stage in BuildKit's cache."""
    return BuildRequest(arch, debian_bases=True, debian_base_repository=BASE_REPOSITORY, ci_torch=CI_TORCH_VERSION,
                        ca_cert=HOST_CA_BUNDLE if HOST_CA_BUNDLE.is_file() else None,
                        target=target, repository=REPOSITORY, max_jobs=os.cpu_count() or 2)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", *args], capture_output=True, text=True, cwd=REPO)


# -- the plan (no Docker) --------------------------------------------------------------------------

def test_debian_bases_dry_run_shows_the_whole_route():
    proc = cli("build", "--arch", "all", "--debian-bases", "--apt-mirror", "http://mirror.example/debian",
               "--torch-index-url", "https://mirror.example/whl/cu118", "--pip-index-url",
               "https://mirror.example/pypi/simple", "--ca-cert", str(HOST_CA_BUNDLE), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("python -m ktlegacy debian-rootfs --tag ktlegacy-standin/bookworm:base "
                        "--mirror http://mirror.example/debian")
    assert lines[1] == ("python -m ktlegacy debian-rootfs --runtime --tag ktlegacy-standin/bookworm:runtime "
                        "--mirror http://mirror.example/debian")
    devel, runtime, sm70, sm75 = lines[2:]
    assert "ROOTFS_IMAGE=ktlegacy-standin/bookworm:base " in devel
    assert "ROOTFS_IMAGE=ktlegacy-standin/bookworm:runtime " in runtime
    for line, stage in ((devel, "devel"), (runtime, "runtime")):
        assert "images/debian-cuda.Dockerfile" in line and f"--target {stage}" in line
        assert "APT_MIRROR=http://mirror.example/debian" in line and "id=ca_cert" in line
        assert f"-t {DEBIAN_BASE_REPOSITORY}:11.8-{stage} " in line
    for line, arch in ((sm70, "7.0"), (sm75, "7.5")):
        assert "images/Dockerfile" in line and f"TORCH_CUDA_ARCH_LIST={arch}" in line
        assert f"BASE_IMAGE={DEBIAN_BASE_REPOSITORY}:11.8-devel" in line
        assert f"RUNTIME_IMAGE={DEBIAN_BASE_REPOSITORY}:11.8-runtime" in line
        assert f"TORCH_VERSION={facts.TORCH_VERSION}" in line
        assert "TORCH_INDEX_URL=https://mirror.example/whl/cu118" in line
        assert "PIP_INDEX_URL=https://mirror.example/pypi/simple" in line and "id=ca_cert" in line
        assert "nvidia/cuda" not in line


@pytest.mark.parametrize("args, expected", [
    (["--base-image", "x/y:1"], "drop --base-image"),
    (["--standin"], "pick one"),
])
def test_debian_bases_conflicts_are_one_line(args, expected):
    proc = cli("build", "--arch", "sm75", "--debian-bases", *args, "--dry-run")
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith("error: ")
    assert expected in errors[0]


def test_ci_torch_is_one_build_arg_and_a_label():
    (p,) = plan(BuildRequest("sm70", ci_torch=CI_TORCH_VERSION, dry_run=True))
    (user,) = plan(BuildRequest("sm70", dry_run=True))
    assert {k: v for k, v in p.build_args.items() if user.build_args.get(k) != v} == \
        {"KTLEGACY_CI_TORCH": CI_TORCH_VERSION}
    assert p.labels[facts.LABEL_CI_TORCH] == CI_TORCH_VERSION and user.labels[facts.LABEL_CI_TORCH] == ""
    assert p.labels[facts.LABEL_TORCH] == CI_TORCH_VERSION and user.labels[facts.LABEL_TORCH] == facts.TORCH_VERSION


# -- the real compile ------------------------------------------------------------------------------

def _docker(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["/usr/bin/docker", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def cuda118_compile_images(docker) -> dict:
    """arch -> tag of the `compile` stage built for it on the Debian CUDA 11.8 bases."""
    from ktlegacy.build import BuildRequest, build
    from ktlegacy.core.errors import KtlegacyError
    tags = {}
    for arch in ARCHES:  # one at a time: 2 cores, and the second reuses the first's toolchain layer
        try:
            result = build(lane_request(arch, "compile"), echo=False, out=lambda line: None)
        except KtlegacyError as exc:
            log = getattr(exc, "log", "")
            pytest.fail(f"CUDA 11.8 compile build for {arch} failed: {exc}\n" + "\n".join(log.splitlines()[-80:]))
        tags[arch] = result.tags[0]
    return tags


def _record(tag: str) -> dict:
    return json.loads(_docker("run", "--rm", tag, "cat", "/ext/ktlegacy-extensions.json").stdout)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.cuda118
@pytest.mark.parametrize("arch", list(ARCHES))
def test_extensions_compile_with_nvcc_11_8(cuda118_compile_images, arch):
    record = _record(cuda118_compile_images[arch])
    assert record["mode"] == "build" and record["arch"] == arch
    assert "cuda_11.8" in record["nvcc"], record["nvcc"]  # nvcc --version: "Build cuda_11.8.r11.8/..."
    names = {Path(f["file"]).name.split(".")[0]: f for f in record["extensions"]}
    assert set(names) == {"KTransformersOps", "cpuinfer_ext", "ktlegacy_gguf_ops"}, names
    assert names["KTransformersOps"]["device_code"] is True
    assert names["ktlegacy_gguf_ops"]["device_code"] is True   # KLinearGGUF's kernels (overlay gguf-linear)
    assert record["arch_check"]["result"] == "pass" and record["arch_check"]["arch"] == arch
    assert record["torch_cuda_major_mismatch_allowed"] is True  # says what it is: a CI compile


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.cuda118
@pytest.mark.parametrize("arch", list(ARCHES))
def test_sass_is_exactly_the_arch_by_cuda_11_8_cuobjdump(cuda118_compile_images, arch):
    tag = cuda118_compile_images[arch]
    version = _docker("run", "--rm", tag, "cuobjdump", "--version").stdout
    assert "release 11.8" in version, version
    check = ["run", "--rm", tag, "/opt/ktlegacy/venv/bin/python", "/ktlegacy/images/scripts/check_cuda_arch.py",
             "--arch"]
    ok = _docker(*check, arch, "/ext", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = next(a for a in ARCHES if a != arch)
    wrong = _docker(*check, other, "/ext", check=False)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert f"expected {ARCHES[other]}" in wrong.stderr and ARCHES[arch] in wrong.stderr, wrong.stderr


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.cuda118
@pytest.mark.parametrize("arch", list(ARCHES))
def test_built_extensions_import_beside_the_ci_torch(cuda118_compile_images, arch):
    code = ("import sys, torch; sys.path.insert(0, '/ext'); import KTransformersOps, cpuinfer_ext; "
            "print(torch.__version__, torch.version.cuda, sorted(n for n in dir(KTransformersOps) if not n.startswith('_')), "
            "hasattr(cpuinfer_ext, 'CPUInfer'))")
    proc = _docker("run", "--rm", cuda118_compile_images[arch], "/opt/ktlegacy/venv/bin/python", "-c", code)
    assert re.match(rf"{re.escape(CI_TORCH_VERSION)}(\+cu124)? 12\.4 ", proc.stdout), proc.stdout
    assert "dequantize_q4_k" in proc.stdout and proc.stdout.rstrip().endswith("True"), proc.stdout
    ours = _docker("run", "--rm", cuda118_compile_images[arch], "/opt/ktlegacy/venv/bin/python", "-c",
                   "import sys, torch; sys.path.insert(0, '/ext'); import ktlegacy_gguf_ops as o; "
                   "print(sorted(o.supported_types()), o.max_rows, list(o.block_layout(12)))")
    assert ours.stdout.split("]")[0] + "]" == "[2, 6, 8, 10, 11, 12, 13, 14, 23]", ours.stdout
    assert ours.stdout.strip().endswith("4 [256, 144]"), ours.stdout


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.cuda118
def test_debian_runtime_base_has_cudart_11_8_and_no_compiler(cuda118_compile_images):
    tag = f"{BASE_REPOSITORY}:11.8-runtime"
    proc = _docker("run", "--rm", tag, "bash", "-c",
                   "ls /usr/lib/x86_64-linux-gnu/libcudart.so.11.0 && dpkg-query -W -f='${Version}' libcudart11.0 "
                   "&& ! command -v nvcc && ! command -v gcc && ! ls /usr/lib/x86_64-linux-gnu/libcuda.so.1 "
                   "&& ! command -v git && ! command -v pip3 && ! ls /var/lib/apt/lists/*Packages*")
    assert proc.stdout.split()[-1].startswith("11.8."), proc.stdout
