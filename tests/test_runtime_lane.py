"""The whole image on real CUDA 11.8 extensions (issue 23): images/Dockerfile through its `runtime`
stage, for sm70 and sm75, on the `--debian-bases` bases, exactly as `invoke build --arch ARCH
--debian-bases` builds it, but for the one substitution CI cannot avoid: PyPI's torch 2.5.1 (a
CUDA 12.4 build) for 2.5.1+cu118 (download.pytorch.org is out of reach), carried by the build arg
KTLEGACY_CI_TORCH (tests/test_cuda118_compile.py, `lane_request`; docs/images.md says what it can
hide). The extensions are compiled by nvcc 11.8, packed into the wheel, installed into the runtime
base beside CUDA 11.8's libcudart (PyPI's nvidia-cuda-runtime-cu11, the wheel torch's cu118 build
brings), and the runtime stage's last step runs the smoke inside (a failing check fails the build).

The same request as the compile lane, so the compile stage comes from BuildKit's cache when that
lane ran first. Marked `cuda118` (and `slow`, `docker`) like it; `-m 'not cuda118'` leaves it out.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from ktlegacy.core import facts
from test_cuda118_compile import ARCHES, CI_TORCH_VERSION, lane_request

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.cuda118]

# what the smoke must prove without a GPU; check_gpu is the one that needs one
NO_GPU_CHECKS = {"check_build_labels", "check_extensions", "check_flash_attn_stub", "check_installed_arch",
                 "check_ktransformers_import", "check_libraries", "check_moe", "check_rules_torch_only",
                 "check_server_imports", "check_triton"}


def _docker(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["/usr/bin/docker", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args[:4])}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def runtime_images(docker) -> dict:
    """arch -> tag of the runtime image (its build ran the smoke: it exists only if the smoke passed)."""
    from ktlegacy.build import build
    from ktlegacy.core.errors import KtlegacyError
    tags = {}
    for arch in ARCHES:  # one at a time: 2 cores; the second reuses the first's arch-free layers
        try:
            result = build(lane_request(arch, "runtime"), echo=False, out=lambda line: None)
        except KtlegacyError as exc:
            log = getattr(exc, "log", "")
            pytest.fail(f"runtime lane build for {arch} failed: {exc}\n" + "\n".join(log.splitlines()[-120:]))
        tags[arch] = result.tags[0]
    return tags


def smoke_report(tag: str) -> dict:
    proc = _docker("run", "--rm", tag, "sh", "-c",
                   "python /ktlegacy/smoke/run.py --json /tmp/smoke.json >&2; cat /tmp/smoke.json", check=False)
    assert proc.stdout.strip(), proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    report["log"] = proc.stderr
    return report


@pytest.mark.parametrize("arch", list(ARCHES))
def test_smoke_passes_inside_the_runtime_image(runtime_images, arch):
    report = smoke_report(runtime_images[arch])
    status = {c["check"]: c["status"] for c in report["checks"]}
    assert report["failed"] == 0, report["log"]
    assert {c for c, s in status.items() if s == "pass"} == NO_GPU_CHECKS, report["log"]
    assert report["needs_gpu"] == ["check_gpu"] and status["check_gpu"] == "skip", report["log"]
    assert "skipped for want of a GPU: check_gpu" in report["log"]


@pytest.mark.parametrize("arch", list(ARCHES))
def test_every_shared_object_resolves_its_libraries(runtime_images, arch):
    proc = _docker("run", "--rm", runtime_images[arch], "sh", "-c",
                   "cd /ktlegacy/smoke && python check_libraries.py --json /tmp/ldd.json >&2; cat /tmp/ldd.json")
    found = json.loads(proc.stdout)
    assert found["unresolved"] == {} and found["checked"] > 500, found
    assert set(found["driver"]) <= {"libcuda.so.1", "libnvidia-ml.so.1"}, found["driver"]


@pytest.mark.parametrize("arch", list(ARCHES))
def test_extensions_run_on_cuda_11_8_from_the_cu11_wheel(runtime_images, arch):
    code = ("import torch, KTransformersOps, cpuinfer_ext, re; "
            "maps = open('/proc/self/maps').read(); "
            "print(sorted(set(re.findall(r'/\\S*/libcudart\\.so\\S*', maps))))")
    proc = _docker("run", "--rm", runtime_images[arch], "python", "-c", code)
    loaded = eval(proc.stdout.strip())
    ours = [p for p in loaded if p.endswith("libcudart.so.11.0")]
    assert len(ours) == 1 and "/site-packages/nvidia/cuda_runtime/lib/" in ours[0], loaded
    # the stand-in torch brings its own CUDA 12 runtime too: what docs/images.md says the lane cannot see
    assert any(".so.12" in p for p in loaded), loaded


@pytest.mark.parametrize("arch", list(ARCHES))
def test_runtime_holds_no_toolkit_headers_or_static_libraries(runtime_images, arch):
    script = ("sp=$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'); "
              "command -v nvcc g++ c++ cuobjdump; ls -d /usr/local/cuda /src /build /ext \"$sp/torch/include\" "
              "2>/dev/null; find \"$sp\" -path \"$sp/triton\" -prune -o -name '*.a' -print; "
              "find \"$sp/nvidia\" -mindepth 2 -maxdepth 2 -name include")
    proc = _docker("run", "--rm", runtime_images[arch], "sh", "-c", script, check=False)
    assert proc.stdout.strip() == "", proc.stdout


@pytest.mark.parametrize("arch", list(ARCHES))
def test_labels_say_ci_torch_and_publish_refuses(runtime_images, arch, docker):
    from ktlegacy.core.arch import get_arch
    from ktlegacy.core.errors import KtlegacyError
    from ktlegacy.publish import LocalImage, check_labels
    tag = runtime_images[arch]
    labels = docker.labels(tag)
    assert labels[facts.LABEL_CI_TORCH] == CI_TORCH_VERSION and labels[facts.LABEL_TORCH] == CI_TORCH_VERSION
    assert labels[facts.LABEL_EXTENSIONS] == "build" and labels[facts.LABEL_STANDIN] == "false"
    assert labels[facts.LABEL_ARCH] == arch and labels[facts.LABEL_CUDA] == facts.CUDA_VERSION
    image = LocalImage(tag=tag, ref=labels[facts.LABEL_REF], arch=get_arch(arch), cpu=labels[facts.LABEL_CPU],
                       variant="", image_id="", labels=labels)
    with pytest.raises(KtlegacyError, match="never published"):
        check_labels(image, sha=None, allow_standin=True, allow_dirty=True)
