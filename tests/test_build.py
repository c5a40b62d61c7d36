"""invoke build / smoke against the real Docker engine (images/Dockerfile, ktlegacy/build.py).

The CUDA stages cannot run here (no nvidia/cuda images, no GPU): the stand-in base (Debian
bookworm, no CUDA) builds every stage that needs none, offline from a wheelhouse, and its runtime
image runs the smoke tests. The dry-run tests check the real CUDA 11.8 command lines.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ktlegacy import images
from ktlegacy.core.facts import ARCHES, arch_choice
from ktlegacy.build import (DEFAULT_BASE_IMAGE, DEFAULT_RUNTIME_IMAGE, DEFAULT_TORCH_INDEX_URL, DEFAULT_TORCH_VERSION,
                            BuildRequest, plan)

REPO = Path(__file__).resolve().parent.parent
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def cli(*args, env=None, check=False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, **(env or {})))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# -- dry run: the real CUDA 11.8 command lines ----------------------------------------------------

def _build_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if re.search(r"docker(\s+buildx)?\s+build\b", ln)]


def test_dry_run_sm75_is_a_cuda_11_8_build_for_7_5():
    proc = cli("build", "--arch", "sm75", "--dry-run", check=True)
    (line,) = [ln for ln in _build_lines(proc.stdout) if "images/Dockerfile" in ln]
    assert f"BASE_IMAGE={DEFAULT_BASE_IMAGE}" in line
    assert f"RUNTIME_IMAGE={DEFAULT_RUNTIME_IMAGE}" in line
    assert "TORCH_CUDA_ARCH_LIST=7.5" in line and "ARCH=sm75" in line
    assert f"TORCH_VERSION={DEFAULT_TORCH_VERSION}" in line
    assert f"TORCH_INDEX_URL={DEFAULT_TORCH_INDEX_URL}" in line
    assert "CPU_INSTRUCT=AVX2" in line
    assert "KTLEGACY_EXTENSIONS" not in line  # the real build compiles
    assert line.rstrip().endswith(str(REPO))
    assert f"-t {images.DEFAULT_REPOSITORY}:0.2.1.post1-cu118-sm75-avx2" in line
    from ktlegacy.docker import client
    from ktlegacy.core.errors import KtlegacyError
    try:
        buildx = client().buildx
    except KtlegacyError:  # no daemon here: the dry run prints for a docker.io-style client
        buildx = False
    assert line.startswith("DOCKER_BUILDKIT=1 ") != buildx, line


@pytest.mark.docker
def test_dry_run_without_a_daemon_prints_the_client_that_can_build(tmp_path, docker):
    """No daemon, and the first docker found refuses BuildKit (a client without buildx, as the
    28.x one here): the dry run prints the BuildKit-capable client, not a bare "docker"."""
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n"
                    "case \"$1\" in\n"
                    "  buildx) echo \"docker: 'buildx' is not a docker command.\" >&2; exit 1 ;;\n"
                    "  build) echo 'ERROR: BuildKit is enabled but the buildx component is missing or broken.' >&2;"
                    " exit 1 ;;\n"
                    "  *) echo 'Cannot connect to the Docker daemon' >&2; exit 1 ;;\n"
                    "esac\n")
    fake.chmod(0o755)
    proc = cli("build", "--arch", "sm75", "--dry-run",
               env={"KTLEGACY_DOCKER": str(fake), "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}, check=True)
    (line,) = [ln for ln in _build_lines(proc.stdout) if "images/Dockerfile" in ln]
    expected = docker.build_cmd("--progress")[:-1]  # the suite's BuildKit client, as it builds
    assert line.startswith(docker.shell_prefix() + " ".join(expected) + " --progress"), line
    assert str(fake) not in line


def test_dry_run_all_builds_every_arch():
    proc = cli("build", "--arch", "all", "--dry-run", check=True)
    lines = _build_lines(proc.stdout)
    assert len(lines) == len(ARCHES)
    for line, arch in zip(lines, ARCHES.values()):
        assert f"TORCH_CUDA_ARCH_LIST={arch.torch_cuda_arch_list}" in line and f"-cu118-{arch.name}-avx2" in line


def test_dry_run_secret_and_wheelhouse(standin_wheelhouse):
    proc = cli("build", "--arch", "sm70", "--dry-run", "--ca-cert", str(HOST_CA_BUNDLE),
               "--wheelhouse", str(standin_wheelhouse), "--offline", "--cpu-instruct", "avx512", check=True)
    lines = _build_lines(proc.stdout)
    assert len(lines) == 2 and "wheelhouse.Dockerfile" in lines[0] and lines[0].rstrip().endswith(str(standin_wheelhouse))
    wh_tag = re.search(r"-t (\S+)", lines[0]).group(1)
    assert f"WHEELHOUSE_IMAGE={wh_tag}" in lines[1]
    assert f"--secret id=ca_cert,src={HOST_CA_BUNDLE}" in lines[1]
    assert "--network none" in lines[1] and "CPU_INSTRUCT=AVX512" in lines[1] and "-sm70-avx512" in lines[1]
    # the CA bundle is never a build arg or part of the context
    assert "ca-certificates.crt" not in lines[1].split("--secret")[0]


def test_invoke_front_matches_the_cli():
    invoke = [str(Path(sys.executable).with_name("invoke")), "build", "--arch", "sm75", "--dry-run"]
    via_invoke = subprocess.run(invoke, capture_output=True, text=True, cwd=REPO)
    via_cli = cli("build", "--arch", "sm75", "--dry-run", check=True)
    assert via_invoke.returncode == 0, via_invoke.stderr
    assert _build_lines(via_invoke.stdout) == _build_lines(via_cli.stdout)
    missing = subprocess.run(invoke[:2], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode != 0 and missing.stderr.strip() == \
        f"error: --arch is required: {arch_choice('all', cards=True)}"


def test_build_request_is_the_build_flags_and_its_args_are_dockerfile_args():
    """The build command's flags are BuildRequest's fields with help, parsed into one request;
    every build arg it maps to is an ARG of images/Dockerfile."""
    from dataclasses import fields
    from ktlegacy.core.arch import get_arch
    from ktlegacy.cli import build_parser
    parser = build_parser().commands["build"]
    assert {f.name for f in fields(BuildRequest) if "help" in f.metadata} == \
        {a.dest for a in parser._actions} - {"help"}
    args = parser.parse_args(["--arch", "sm70", "--max-jobs", "3", "--offline", "--cache-to", "x", "--standin",
                              "--triton-version", "3.1.0"])
    assert BuildRequest.from_args(args) == BuildRequest("sm70", max_jobs=3, offline=True, cache_to="x",
                                                        standin=True, triton_version="3.1.0")
    every = BuildRequest("sm70", pip_index_url="p", apt_mirror="a", triton_version="t", standin=True,
                         ci_torch="2.5.1")
    build_args = every.build_args(get_arch("sm70"), commit="c", digest="d", revision="r", wheelhouse_image="w")
    declared = set(re.findall(r"^ARG (\w+)", (REPO / "images" / "Dockerfile").read_text(), re.M))
    assert set(build_args) <= declared, set(build_args) - declared


def test_plan_labels_cover_images_keys():
    (p,) = plan(BuildRequest("sm75", dry_run=True))
    for key in (images.LABEL_REF, images.LABEL_COMMIT, images.LABEL_OVERLAY_DIGEST, images.LABEL_ARCH,
                images.LABEL_CUDA, images.LABEL_TORCH, images.LABEL_CPU):
        assert p.labels[key], key
    assert p.labels[images.LABEL_CUDA] == "11.8" and p.labels[images.LABEL_ARCH] == "sm75"
    assert re.fullmatch(r"[0-9a-f]{64}", p.labels[images.LABEL_OVERLAY_DIGEST])


def test_failure_line_prefers_our_scripts_error_line():
    from ktlegacy.build import _failure_line
    log = ["#20 6.4 table  compile error: LLVM ERROR: x (compiler process died: signal 6)\n",
           "#20 6.4 error: Triton kernel k does not compile for sm70 with triton 3.2.0: LLVM ERROR: x\n",
           "#20 6.5 kernel  sm70  compile error: LLVM ERROR: y\n",
           "#20 ERROR: executor failed running [/bin/sh -c bash check_kernels.sh]: exit code: 1\n"]
    assert _failure_line(log).startswith("Triton kernel k does not compile for sm70")
    assert _failure_line(["#9 17.3 E: Unable to fetch some archives\n", "#9 ERROR: executor failed\n"]) == \
        "Unable to fetch some archives"
    assert _failure_line(["#17 2.2 TypeError: bad thing\n", "#17 ERROR: executor failed running\n"]) == \
        "TypeError: bad thing"


def test_unpullable_base_image_says_how_to_fix_it():
    from ktlegacy.build import _failure_hint
    log = ["#3 [internal] load metadata for docker.io/nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04\n",
           '#3 ERROR: failed to do request: Head "https://registry-1.docker.io/v2/nvidia/cuda/manifests/x": '
           "dial tcp: lookup registry-1.docker.io: no such host\n"]
    assert "--base-image" in _failure_hint(log) and "--debian-bases" in _failure_hint(log)
    assert _failure_hint(["#20 6.4 error: Triton kernel k does not compile\n"]) == ""


# -- bad input: one line, non-zero, nothing built --------------------------------------------------

def _no_image(tag: str) -> bool:
    return subprocess.run(["/usr/bin/docker", "image", "inspect", tag], capture_output=True).returncode != 0


@pytest.mark.docker
@pytest.mark.parametrize("args, expected", [
    (["--arch", "sm86"], "use the upstream"),
    (["--arch", "sm75", "--ref", "v9.9.9"], "unknown ktransformers ref"),
    (["--arch", "sm75", "--wheelhouse", "/nonexistent/h3-wheelhouse"], "does not exist"),
    (["--arch", "sm75", "--ca-cert", "/nonexistent/h3-ca.crt"], "--ca-cert"),
    (["--arch", "sm75", "--cpu-instruct", "SSE4"], "unknown CPU instruction set"),
    (["--arch", "sm75", "--offline"], "needs --wheelhouse"),
    (["--arch", "sm75", "--target", "nope"], "unknown --target"),
])
def test_bad_input_is_one_line_and_builds_nothing(args, expected, docker):
    proc = cli("build", *args, "--tag", "h3-bad/ktransformers:never")
    assert expected in one_line_error(proc)
    # refused before the first docker command: build() prints "$ <command>" before running each one
    assert "$ " not in proc.stdout, proc.stdout


@pytest.mark.docker
def test_wheelhouse_without_the_sdist_is_refused(tmp_path, docker):
    (tmp_path / "pyyaml-6.0-py3-none-any.whl").write_bytes(b"")
    line = one_line_error(cli("build", "--arch", "sm75", "--wheelhouse", str(tmp_path)))
    assert "ktransformers-0.2.1.post1.tar.gz" in line


@pytest.mark.docker
def test_no_docker_daemon(tmp_path, standin_wheelhouse):
    env = {"DOCKER_HOST": f"unix://{tmp_path}/h3-no-daemon.sock"}
    line = one_line_error(cli("build", "--arch", "sm75", "--standin", "--base-image", "x",
                              "--wheelhouse", str(standin_wheelhouse), env=env))
    # dockerd is installed here (tests/host-setup), so the line says to start it; without one it names the install step
    assert "the Docker engine is installed but not running" in line and "systemctl start docker" in line


@pytest.mark.docker
def test_daemon_without_buildkit(tmp_path, monkeypatch, docker):
    """A client/daemon pair that cannot do BuildKit builds (no buildx, `build` without --secret):
    only the probe can be faked here, the engine on CI has BuildKit."""
    fake, calls = tmp_path / "docker", tmp_path / "calls"
    fake.write_text("#!/bin/sh\n"
                    f"echo \"$*\" >> {calls}\n"
                    "case \"$1\" in\n"
                    "  version) echo 19.03.0 ;;\n"
                    "  buildx) exit 1 ;;\n"
                    "  build) echo 'Usage: docker build [OPTIONS] PATH'; echo '  -t, --tag list' ;;\n"
                    "esac\n")
    fake.chmod(0o755)
    import ktlegacy.docker as kdocker
    from ktlegacy.build import build
    from ktlegacy.core.errors import KtlegacyError
    kdocker.client.cache_clear()
    monkeypatch.setattr(kdocker, "_candidates", lambda: [str(fake)])
    try:
        with pytest.raises(KtlegacyError, match="cannot do BuildKit builds"):
            build(BuildRequest("sm75", tag="h3-bad/ktransformers:nobuildkit"), out=lambda line: None)
    finally:
        kdocker.client.cache_clear()
    # refused on the probe's answers: the client was asked what it can do, never to build
    asked = calls.read_text().splitlines()
    assert "build --help" in asked, asked
    assert [c for c in asked if c.split()[:1] == ["build"] or c.startswith("buildx build")] == ["build --help"], asked


@pytest.mark.docker
def test_cache_export_without_buildx_is_refused(docker):
    """The engine here is Debian's 20.10 client: BuildKit built in, no buildx, so no cache export."""
    if docker.buildx:
        pytest.skip("this client has buildx: --cache-to is supported")
    from ktlegacy.build import build
    from ktlegacy.core.errors import KtlegacyError
    with pytest.raises(KtlegacyError, match="--cache-to .* needs docker buildx"):
        build(BuildRequest("sm75", tag="h3-bad/ktransformers:cacheto", cache_to="type=local,dest=/tmp/h3-cache"),
              out=lambda line: None)
    assert _no_image("h3-bad/ktransformers:cacheto")


# -- the stand-in build ------------------------------------------------------------------------------

def _inspect(tag: str) -> dict:
    out = subprocess.run(["/usr/bin/docker", "image", "inspect", tag], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


@pytest.mark.docker
@pytest.mark.slow
def test_standin_image_passes_its_smoke(standin_runtime_image):
    proc = cli("smoke", "--arch", "sm75", "--image", standin_runtime_image)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"smoke: \d+ passed, \d+ skipped, 0 failed", proc.stdout)
    assert "smoke pass check_rules_torch_only" in proc.stdout
    assert "smoke pass check_flash_attn_stub" in proc.stdout
    assert "smoke pass check_build_labels" in proc.stdout
    assert "smoke pass check_server_imports" in proc.stdout
    assert "skipped: stand-in build, no CUDA" in proc.stdout  # never a fake pass for the extensions


@pytest.mark.docker
@pytest.mark.slow
def test_smoke_refuses_an_image_of_another_arch(standin_runtime_image):
    line = one_line_error(cli("smoke", "--arch", "sm70", "--image", standin_runtime_image))
    assert "labelled for arch 'sm75'" in line


@pytest.mark.docker
def test_smoke_without_the_image_names_the_build_command(docker):
    from ktlegacy.core.arch import get_arch
    tag = images.image_tag("v0.3.2", get_arch("sm70"), "AVX512")
    assert docker.inspect(tag) is None, f"{tag} exists on this daemon (this test expects it absent)"
    line = one_line_error(cli("smoke", "--arch", "sm70", "--ref", "v0.3.2", "--cpu-instruct", "avx512"))
    assert f"image {tag} not found; build it first: invoke build --arch sm70 --cpu-instruct AVX512 --ref v0.3.2" in line
    line = one_line_error(cli("smoke", "--arch", "sm75", "--image", "h5-never/built:x"))
    assert "build it first: invoke build --arch sm75 --tag h5-never/built:x" in line


@pytest.mark.docker
@pytest.mark.slow
def test_standin_labels_match_the_build(standin_runtime_image, standin_base, standin_wheelhouse):
    from conftest import STANDIN_REPOSITORY, STANDIN_TORCH_VERSION
    (expected,) = plan(BuildRequest("sm75", standin=True, base_image=standin_base,
                                    torch_version=STANDIN_TORCH_VERSION, wheelhouse=standin_wheelhouse,
                                    offline=True, repository=STANDIN_REPOSITORY))
    config = _inspect(standin_runtime_image)["Config"]
    labels = config["Labels"]
    for key, value in expected.labels.items():
        if key == images.LABEL_REVISION:
            continue  # the commit of this checkout moves while the session-cached image does not
        assert labels.get(key) == value, key
    assert labels[images.LABEL_STANDIN] == "true" and labels[images.LABEL_EXTENSIONS] == "skip"
    assert labels[images.LABEL_TORCH] == STANDIN_TORCH_VERSION
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["KTLEGACY_IMAGE_ARCH"] == labels[images.LABEL_ARCH]
    assert env["KTLEGACY_IMAGE_OVERLAY_DIGEST"] == labels[images.LABEL_OVERLAY_DIGEST]
    # the overlay manifest inside the image carries the labelled digest
    manifest = subprocess.run(["/usr/bin/docker", "run", "--rm", standin_runtime_image, "cat",
                               "/ktlegacy/ktlegacy-overlays.json"], capture_output=True, text=True, check=True)
    assert json.loads(manifest.stdout)["overlay_digest"] == labels[images.LABEL_OVERLAY_DIGEST]


@pytest.mark.docker
@pytest.mark.slow
def test_runtime_is_non_root_without_compiler_or_source(standin_runtime_image):
    info = _inspect(standin_runtime_image)
    assert info["Config"]["User"] == "ktlegacy"
    assert info["Config"]["Healthcheck"]["Test"][-1] == "/ktlegacy/healthcheck.py"
    probe = subprocess.run(
        ["/usr/bin/docker", "run", "--rm", standin_runtime_image, "sh", "-c",
         "id -u; command -v gcc cc nvcc cmake || true; test -e /src && echo HAS_SRC; "
         "python /ktlegacy/healthcheck.py && echo HEALTHY"],
        capture_output=True, text=True)
    out = probe.stdout.split()
    assert out[0] == "1000" and "HEALTHY" in out and "HAS_SRC" not in out
    assert not [w for w in out if w.endswith(("/gcc", "/cc", "/nvcc", "/cmake"))], probe.stdout


def _rebuild_standin(standin_base, standin_wheelhouse, **kwargs):
    from conftest import STANDIN_REPOSITORY, STANDIN_TORCH_VERSION
    from ktlegacy.build import build
    return build(BuildRequest("sm75", standin=True, base_image=standin_base, torch_version=STANDIN_TORCH_VERSION,
                              wheelhouse=standin_wheelhouse, offline=True, repository=STANDIN_REPOSITORY, **kwargs),
                 echo=False, out=lambda line: None)


def build_steps(log: str) -> dict[str, str]:
    """{step id: description} of the RUN/COPY steps of a plain-progress BuildKit log."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^#(\d+) \[([^\]]+\] (?:RUN|COPY) .*)$", log, re.M)}


def cached_steps(log: str) -> set[str]:
    return set(re.findall(r"^#(\d+) CACHED$", log, re.M))


@pytest.mark.docker
@pytest.mark.slow
def test_noop_rebuild_is_all_cached(standin_runtime_image, standin_base, standin_wheelhouse):
    # Build, then build again: the first absorbs whatever changed in the checkout since the
    # session's fixture build; the second changes nothing and must not run a single step.
    _rebuild_standin(standin_base, standin_wheelhouse)
    result = _rebuild_standin(standin_base, standin_wheelhouse)
    log = result.logs[standin_runtime_image]
    steps = build_steps(log)
    assert len(steps) >= 20, log[-2000:]
    not_cached = {i: d for i, d in steps.items() if i not in cached_steps(log)}
    assert not not_cached, not_cached


def _distinctive_ca_chunks(image: str) -> list[bytes]:
    """Certificates of the host bundle that the base image's own bundle lacks (the proxy's CA):
    their base64 bodies cannot be in the image unless the secret leaked."""
    base = subprocess.run(["/usr/bin/docker", "run", "--rm", "--entrypoint", "cat", image,
                           "/etc/ssl/certs/ca-certificates.crt"], capture_output=True, text=True).stdout

    def bodies(text):
        return re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", text, re.S)

    own = set(bodies(base))
    chunks = []
    for body in bodies(HOST_CA_BUNDLE.read_text()):
        if body not in own:
            lines = body.splitlines()
            chunks.append(lines[len(lines) // 2].encode())  # one 64-char base64 line from the middle
    return chunks


def _layer_hits(image: str, needles: list[bytes], whole: bytes) -> list[str]:
    """Files in any layer of ``image`` (docker save) containing a needle or equal to ``whole``."""
    hits = []
    save = subprocess.Popen(["/usr/bin/docker", "save", image], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
        for member in outer:
            if not member.isfile():
                continue
            data = outer.extractfile(member).read()
            blobs = [(member.name, data)]
            if member.name.endswith("layer.tar") or member.name.startswith("blobs/"):
                try:
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as layer:
                        blobs = [(f"{member.name}:{m.name}", layer.extractfile(m).read())
                                 for m in layer if m.isfile()]
                except tarfile.TarError:
                    pass
            for name, blob in blobs:
                if blob == whole or any(n in blob for n in needles):
                    hits.append(name)
    assert save.wait() == 0
    return hits


@pytest.mark.docker
@pytest.mark.slow
def test_ca_bundle_is_in_no_layer_and_no_history(standin_base, standin_wheelhouse, tmp_path):
    from conftest import STANDIN_REPOSITORY
    tag_repo = STANDIN_REPOSITORY + "-ca"
    # --no-cache: secrets are not part of the cache key, so a cached build would never mount it
    from conftest import STANDIN_TORCH_VERSION
    from ktlegacy.build import build
    result = build(BuildRequest("sm75", standin=True, base_image=standin_base, torch_version=STANDIN_TORCH_VERSION,
                                wheelhouse=standin_wheelhouse, offline=True, repository=tag_repo,
                                ca_cert=HOST_CA_BUNDLE, extra_build_flags=("--no-cache",)),
                   echo=False, out=lambda line: None)
    (tag,) = result.tags
    try:
        log = result.logs[tag]
        assert "using the CA bundle secret for this step" in log  # the secret really was mounted
        whole = HOST_CA_BUNDLE.read_bytes()
        needles = _distinctive_ca_chunks(tag)
        hits = _layer_hits(tag, needles, whole)
        assert hits == [], hits
        history = subprocess.run(["/usr/bin/docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", tag],
                                 capture_output=True, check=True).stdout
        config = subprocess.run(["/usr/bin/docker", "image", "inspect", tag], capture_output=True, check=True).stdout
        for text in (history, config):
            assert not any(n in text for n in needles)
            assert str(HOST_CA_BUNDLE).encode() not in text
    finally:
        subprocess.run(["/usr/bin/docker", "image", "rm", "-f", tag], capture_output=True)


# -- the kernels stage with a real Triton (stand-in: CPU torch + a Triton wheel from PyPI) ------------

@pytest.fixture(scope="module")
def triton_wheelhouse(standin_wheelhouse) -> Path:
    """The stand-in wheelhouse plus triton 3.1.0 (torch 2.5.1's) and 3.2.0 (torch 2.6's), from PyPI."""
    from ktlegacy.core.source import CACHE_DIR
    wheels = CACHE_DIR / "h3-triton-wheels"
    for version in ("3.1.0", "3.2.0"):
        if not list(wheels.glob(f"triton-{version}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                            f"triton=={version}"], check=True, capture_output=True)
    house = CACHE_DIR / "h3-triton-wheelhouse"
    house.mkdir(exist_ok=True)
    for src in [*standin_wheelhouse.iterdir(), *wheels.glob("triton-*.whl")]:
        dest = house / src.name
        if src.is_file() and not dest.exists():
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)
    return house


def _kernels_stage(standin_base, wheelhouse, arch, triton, tag):
    from conftest import STANDIN_TORCH_VERSION
    from ktlegacy.build import build
    return build(BuildRequest(arch, standin=True, base_image=standin_base, torch_version=STANDIN_TORCH_VERSION,
                              triton_version=triton, wheelhouse=wheelhouse, offline=True, target="kernels",
                              tag=tag),
                 echo=False, out=lambda line: None)


@pytest.mark.docker
@pytest.mark.slow
def test_bad_triton_pin_fails_the_build_naming_kernel_and_arch(standin_base, triton_wheelhouse):
    from ktlegacy.core.errors import KtlegacyError
    tag = "h3-test/ktransformers:kernels-sm70-triton320"
    with pytest.raises(KtlegacyError) as info:
        _kernels_stage(standin_base, triton_wheelhouse, "sm70", "3.2.0", tag)
    message = str(info.value)
    assert "\n" not in message
    assert "_fwd_grouped_kernel_stage1" in message and "sm70" in message and "triton 3.2.0" in message
    assert _no_image(tag)


@pytest.mark.docker
@pytest.mark.slow
def test_pinned_triton_fits_sm75_in_the_kernels_stage(standin_base, triton_wheelhouse):
    tag = "h3-test/ktransformers:kernels-sm75-triton310"
    _kernels_stage(standin_base, triton_wheelhouse, "sm75", "3.1.0", tag)
    try:
        out = subprocess.run(["/usr/bin/docker", "run", "--rm", tag, "cat", "/checks/ktlegacy-kernels.json"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["/usr/bin/docker", "image", "rm", "-f", tag], capture_output=True)
    results = json.loads(out)["results"]
    stage1 = [r for r in results if r["kernel"] == "_fwd_grouped_kernel_stage1"]
    assert stage1 and all(r["arch"] == "sm75" and r["shared"] == 52_224 and r["limit"] == 65_536
                          and not r["failed"] for r in stage1)


# -- plan output, from the table's facts (not from plan itself) -------------------------------------

def _expected_overlay_digest(ref, arch) -> str:
    """What ``patch`` writes for (ref, arch): overlay.digest over the overlays that apply to ref."""
    from ktlegacy.core.overlay import digest, load_overlays
    files = []
    for overlay, path in load_overlays():
        if overlay.applies_to(ref):
            files += [path, *getattr(overlay, "shipped_files", lambda: [])()]
    return digest(files, arch, ref)


# (request, the arches it names, its CPU set as the table spells it)
_REPRESENTATIVE = [
    (dict(arch="sm75"), ["sm75"], "AVX2"),
    (dict(arch="all", cpu_instruct="avx512", max_jobs=2), list(ARCHES), "AVX512"),
    (dict(arch=" SM_70", cpu_instruct=" fancy", standin=True, base_image="b/std:1", target="toolchain"),
     ["sm70"], "FANCY"),
    (dict(arch="sm75", debian_bases=True, ci_torch="2.5.1", repository="r/k"), ["sm75"], "AVX2"),
]


@pytest.mark.parametrize("asked, arch_names, cpu", _REPRESENTATIVE)
def test_plan_output_is_the_tables_facts(asked, arch_names, cpu):
    """Steps, build args, tags and labels of a few requests, each value taken from the table
    (facts, images.image_tag, the overlays), not from plan."""
    from ktlegacy.core import facts
    from ktlegacy.build import DEBIAN_BASE_REPOSITORY, DOCKERFILE, dockerfile_stages
    request = BuildRequest(**asked, dry_run=True)
    if request.target != "runtime":
        assert request.target in dockerfile_stages()
    plans = plan(request)
    ref = facts.REFS[facts.DEFAULT_REF]
    assert [p.arch for p in plans] == [facts.ARCHES[a] for a in arch_names]
    for i, p in enumerate(plans):
        arch = facts.ARCHES[arch_names[i]]
        tag = images.image_tag(ref.name, arch, cpu, request.repository) + \
            (facts.STANDIN_SUFFIX if request.standin else "") + \
            (f"-{request.target}" if request.target != "runtime" else "")
        digest = _expected_overlay_digest(ref, arch)
        commit = f"sdist-sha256:{ref.sha256}"
        assert p.tag == tag
        assert p.build_args["ARCH"] == arch.name
        assert p.build_args["TORCH_CUDA_ARCH_LIST"] == arch.torch_cuda_arch_list
        assert p.build_args["CPU_INSTRUCT"] == cpu
        assert p.build_args["KTRANSFORMERS_REF"] == ref.name
        assert p.build_args["KTRANSFORMERS_COMMIT"] == commit
        assert p.build_args["OVERLAY_DIGEST"] == digest
        assert p.build_args["MAX_JOBS"] == str(asked.get("max_jobs", 4))
        if request.debian_bases:
            assert p.build_args["BASE_IMAGE"] == f"{DEBIAN_BASE_REPOSITORY}:{facts.CUDA_VERSION}-devel"
            assert p.build_args["RUNTIME_IMAGE"] == f"{DEBIAN_BASE_REPOSITORY}:{facts.CUDA_VERSION}-runtime"
        elif request.standin:
            assert p.build_args["BASE_IMAGE"] == p.build_args["RUNTIME_IMAGE"] == asked["base_image"]
        else:
            assert (p.build_args["BASE_IMAGE"], p.build_args["RUNTIME_IMAGE"]) == (facts.BASE_IMAGE,
                                                                                   facts.RUNTIME_IMAGE)
        assert {k: p.labels[k] for k in (images.LABEL_REF, images.LABEL_COMMIT, images.LABEL_OVERLAY_DIGEST,
                                          images.LABEL_ARCH, images.LABEL_CUDA, images.LABEL_CPU,
                                          images.LABEL_TORCH, facts.LABEL_STANDIN, facts.LABEL_CI_TORCH)} == {
            images.LABEL_REF: ref.name, images.LABEL_COMMIT: commit, images.LABEL_OVERLAY_DIGEST: digest,
            images.LABEL_ARCH: arch.name, images.LABEL_CUDA: facts.CUDA_VERSION, images.LABEL_CPU: cpu,
            images.LABEL_TORCH: request.ci_torch or facts.TORCH_VERSION,
            facts.LABEL_STANDIN: "true" if request.standin else "false", facts.LABEL_CI_TORCH: request.ci_torch or ""}
        # the steps: the Debian bases before the first arch only, then the image build with every arg
        *before, last = p.steps
        assert len(before) == (4 if request.debian_bases and i == 0 else 0)
        expected = ["docker", "build", "--progress", "plain", "-f", str(DOCKERFILE), "--target", request.target]
        for k, v in p.build_args.items():
            expected += ["--build-arg", f"{k}={v}"]
        assert last.argv == expected + ["-t", tag, str(REPO)] and last.buildkit


@pytest.mark.parametrize("argv, expected", [
    (["--arch", "sm86"], "error: arch 'sm86' is Ampere or newer"),
    (["--arch", "sm60"], f"error: unknown arch 'sm60': use {arch_choice('all')}"),
    (["--arch", "sm75", "--ref", "v9.9.9"], "error: unknown ktransformers ref 'v9.9.9'"),
    (["--arch", "sm75", "--cpu-instruct", "SSE4"], "error: unknown CPU instruction set 'SSE4'"),
    # the removed --push is named first, before any other flag is looked at
    (["--arch", "sm60", "--push"], "error: build --push is removed"),
])
def test_bad_arch_ref_or_cpu_is_one_line_before_anything_runs(argv, expected):
    proc = cli("build", *argv, "--dry-run")
    line = one_line_error(proc)
    assert line.startswith(expected), line
    assert proc.stdout == ""


def test_a_request_resolves_once_and_plan_takes_the_resolved_objects(monkeypatch):
    """Ref, arches and CPU set are resolved when the request is made; plan looks none of them up again."""
    from ktlegacy import build
    from ktlegacy.core import facts
    request = BuildRequest("all", cpu_instruct=" avx512", dry_run=True)
    assert (request.upstream, request.arches, request.cpu) == (facts.REFS[facts.DEFAULT_REF],
                                                               tuple(facts.ARCHES.values()), "AVX512")

    def looked_up(*args, **kwargs):
        raise AssertionError(f"looked up again: {args}")
    monkeypatch.setattr(build, "get_ref", looked_up)
    monkeypatch.setattr(build, "arches_for", looked_up)
    monkeypatch.setattr(build, "get_arch", looked_up)
    assert [p.arch for p in plan(request)] == list(facts.ARCHES.values())
