"""A build checks first that the torch pin is there for the image's Python (issue 23 item 4).

Against a real index: a directory served over HTTP on 127.0.0.1 by the standard library's
http.server, laid out as a PEP 503 simple index (``simple/torch/`` listing the files), holding a
stand-in wheel file named as the real one (``torch-2.5.1+cu118-cp311-cp311-linux_x86_64.whl``; only its
name is read). A TLS-intercepting proxy is played by the same server behind a certificate made
here that the system does not trust.
"""

from __future__ import annotations

import functools
import re
import http.server
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ktlegacy.core import facts
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.preflight import TorchWheel, check_torch_cuda, check_torch_wheel, torch_wheel

REPO = Path(__file__).resolve().parent.parent
PIN = facts.TORCH_VERSION
REAL_NAME = f"torch-{PIN}-cp311-cp311-linux_x86_64.whl"   # as PyTorch's cu118 index names it


@pytest.fixture
def index(tmp_path):
    """(base URL, index root): an HTTP server on 127.0.0.1 serving tmp_path/www, stopped after the test."""
    root = tmp_path / "www"
    (root / "simple" / "torch").mkdir(parents=True)
    (root / "empty" / "torch").mkdir(parents=True)
    (root / "simple" / "torch" / REAL_NAME).write_bytes(b"stand-in: only the name is read")
    (root / "empty" / "torch" / f"torch-2.4.1+cu118-cp311-cp311-linux_x86_64.whl").write_bytes(b"x")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, server
    server.shutdown()
    server.server_close()


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_the_pin_is_found_for_the_images_python(index):
    url, _, _ = index
    assert check_torch_wheel(TorchWheel(PIN, facts.DEBIAN_BASE_PYTHON, f"{url}/simple", None)) == REAL_NAME


def test_another_python_or_version_is_refused_in_one_line(index):
    url, _, _ = index
    with pytest.raises(KtlegacyError) as exc:
        check_torch_wheel(TorchWheel(PIN, facts.BASE_IMAGE_PYTHON, f"{url}/simple", None))
    msg = str(exc.value)
    assert f"serves no torch=={PIN} wheel for CPython {facts.BASE_IMAGE_PYTHON}" in msg and REAL_NAME in msg
    assert "--torch-index-url" in msg and "--wheelhouse" in msg and "\n" not in msg
    with pytest.raises(KtlegacyError, match=f"none of version {re.escape(PIN)}.*--torch-index-url.*--wheelhouse"):
        check_torch_wheel(TorchWheel(PIN, facts.DEBIAN_BASE_PYTHON, f"{url}/empty", None))


def test_a_missing_project_or_index_is_refused(index):
    url, _, server = index
    with pytest.raises(KtlegacyError, match="has no torch project page .*HTTP 404.*--wheelhouse"):
        check_torch_wheel(TorchWheel(PIN, "3.11", f"{url}/nothing-here", None))
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(KtlegacyError, match=f"cannot reach the torch index http://127.0.0.1:{port}/simple .*"
                                            "--torch-index-url.*--wheelhouse"):
        check_torch_wheel(TorchWheel(PIN, "3.11", f"http://127.0.0.1:{port}/simple", None), timeout=5)


@pytest.mark.docker
def test_the_build_refuses_before_anything_runs(index, docker):   # (after the Docker client check)
    url, _, _ = index
    proc = cli("build", "--arch", "sm75", "--debian-bases", "--torch-index-url", f"{url}/empty")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: the torch index "), proc.stderr
    assert "--torch-index-url" in lines[0] and "--wheelhouse" in lines[0]
    assert "$ " not in proc.stdout and "debootstrap" not in proc.stdout + proc.stderr, proc.stdout


def test_dry_run_says_which_torch_and_from_where(index):
    url, _, _ = index
    proc = cli("build", "--arch", "sm75", "--debian-bases", "--torch-index-url", f"{url}/simple", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert (f"note: the image installs torch=={PIN} (CPython {facts.DEBIAN_BASE_PYTHON}, linux x86_64) "
            f"from {url}/simple") in proc.stderr
    proc = cli("build", "--arch", "sm70", "--dry-run")
    assert f"torch=={PIN} (CPython {facts.BASE_IMAGE_PYTHON}, linux x86_64) from {facts.TORCH_INDEX_URL}" in proc.stderr


def test_a_wheelhouse_must_hold_the_pin(tmp_path):
    house = tmp_path / "wh"
    house.mkdir()
    (house / "torch-2.4.1+cu118-cp311-cp311-linux_x86_64.whl").write_bytes(b"x")
    wheel = TorchWheel(PIN, "3.11", None, house)
    with pytest.raises(KtlegacyError, match=f"has no torch=={re.escape(PIN)} wheel for CPython 3.11"):
        check_torch_wheel(wheel)
    (house / REAL_NAME).write_bytes(b"x")
    assert check_torch_wheel(wheel) == REAL_NAME


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl makes the proxy's certificate")
def test_a_tls_intercepting_proxy_is_named_with_the_fix(index, tmp_path):
    url, root, server = index
    key, cert = tmp_path / "proxy.key", tmp_path / "proxy.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    try:
        https = f"https://127.0.0.1:{tls.server_address[1]}/simple"
        with pytest.raises(KtlegacyError, match="fails certificate verification .*--ca-cert"):
            check_torch_wheel(TorchWheel(PIN, "3.11", https, None))
        assert check_torch_wheel(TorchWheel(PIN, "3.11", https, None), ca_cert=cert) == REAL_NAME
    finally:
        tls.shutdown()
        tls.server_close()


def test_a_pin_for_another_cuda_major_is_refused():
    check_torch_cuda(PIN)
    check_torch_cuda("2.5.1")          # no local tag: what the index resolves
    check_torch_cuda("2.13.0+cpu", standin=True)
    for version, expected in (("2.5.1+cu124", "built for CUDA 12.4"), ("2.5.1+cpu", "not a CUDA build")):
        with pytest.raises(KtlegacyError, match=expected):
            check_torch_cuda(version)
    proc = cli("build", "--arch", "sm75", "--torch-version", "2.5.1+cu121", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --torch-version 2.5.1+cu121 is built for CUDA 12.1, the image's toolkit is CUDA 11.8: torch refuses "
        f"to build extensions with an nvcc of another major; use a CUDA 11 build, e.g. {PIN}"]


def test_which_builds_check_which_torch():
    from ktlegacy.build import BuildRequest
    assert torch_wheel(BuildRequest("sm75", standin=True)) is None
    assert torch_wheel(BuildRequest("sm75", ci_torch="2.5.1")) is None
    assert torch_wheel(BuildRequest("sm75", base_image="my/base:1")).python is None
    assert torch_wheel(BuildRequest("sm75", wheelhouse="/x")).index is None
