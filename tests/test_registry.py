"""ktlegacy/registry.py without a registry: --registry parsing, docker login's stored credentials
(config.json entries and a real credential-helper program), WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from ktlegacy.errors import KtlegacyError
from ktlegacy.registry import _parse_challenge, docker_credentials, parse_target


@pytest.mark.parametrize("value, host, namespace, scheme, repository", [
    ("ghcr.io/owner", "ghcr.io", "owner", "https", "owner/ktransformers"),
    ("ghcr.io/org/team/", "ghcr.io", "org/team", "https", "org/team/ktransformers"),
    ("127.0.0.1:5000", "127.0.0.1:5000", "", "http", "ktransformers"),
    ("localhost:5000/x", "localhost:5000", "x", "http", "x/ktransformers"),
    ("[::1]:5000", "[::1]:5000", "", "http", "ktransformers"),
    ("http://harbor.lan/proj", "harbor.lan", "proj", "http", "proj/ktransformers"),
    ("https://10.0.0.5:8443/ml", "10.0.0.5:8443", "ml", "https", "ml/ktransformers"),
    ("docker.io/someone", "docker.io", "someone", "https", "someone/ktransformers"),
])
def test_parse_target(value, host, namespace, scheme, repository):
    target = parse_target(value)
    assert (target.host, target.namespace, target.scheme) == (host, namespace, scheme)
    assert target.repository("ktransformers") == repository


def test_docker_hub_goes_to_its_api_host():
    target = parse_target("docker.io/someone")
    assert target.api_host == "registry-1.docker.io"
    assert target.reference("ktransformers") == "docker.io/someone/ktransformers"


@pytest.mark.parametrize("value, needle", [
    ("owner/ktransformers", "does not start with a registry host"),
    ("", "does not start with a registry host"),
    ("ftp://ghcr.io/x", "only http:// or https://"),
    ("ghcr.io/Owner", "'Owner' is not a valid repository path component"),
    ("ghcr.io/a b", "'a b' is not a valid repository path component"),
])
def test_parse_target_refuses_in_one_line(value, needle):
    with pytest.raises(KtlegacyError) as err:
        parse_target(value)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _config(tmp_path, monkeypatch, data: dict):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(data))


def test_credentials_from_auths(tmp_path, monkeypatch):
    auth = base64.b64encode(b"me:pa:ss").decode()
    _config(tmp_path, monkeypatch, {"auths": {"https://ghcr.io": {"auth": auth},
                                              "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()}}})
    assert docker_credentials("ghcr.io") == ("me", "pa:ss")
    assert docker_credentials("docker.io") == ("hub", "pw")
    assert docker_credentials("quay.io") is None


def test_no_config_means_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "absent"))
    assert docker_credentials("ghcr.io") is None


def test_broken_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(KtlegacyError) as err:
        docker_credentials("ghcr.io")
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def helper_on_path(tmp_path, monkeypatch):
    """A real docker-credential-h5test program speaking the credential-helper protocol."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-h5test"
    script.write_text(f"""#!/bin/sh
read server
echo "$1 $server" >> {log}
if [ "$server" = "harbor.example.com" ]; then
  printf '{{"ServerURL":"%s","Username":"robot$ci","Secret":"s3cret"}}' "$server"
else
  echo "credentials not found in native keychain"; exit 1
fi
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_credentials_from_a_helper(tmp_path, monkeypatch, helper_on_path):
    _config(tmp_path, monkeypatch, {"credHelpers": {"harbor.example.com": "h5test"}, "credsStore": "h5test"})
    assert docker_credentials("harbor.example.com") == ("robot$ci", "s3cret")
    assert docker_credentials("quay.io") is None  # credsStore asked, has nothing
    assert helper_on_path.read_text().split("\n")[:2] == ["get harbor.example.com", "get quay.io"]


def test_missing_helper_is_one_line(tmp_path, monkeypatch):
    _config(tmp_path, monkeypatch, {"credsStore": "h5-absent-helper"})
    with pytest.raises(KtlegacyError) as err:
        docker_credentials("ghcr.io")
    assert "docker-credential-h5-absent-helper" in str(err.value)


def test_parse_challenge():
    scheme, params = _parse_challenge('Bearer realm="https://ghcr.io/token",service="ghcr.io",'
                                      'scope="repository:o/k:pull"')
    assert scheme == "bearer" and params == {"realm": "https://ghcr.io/token", "service": "ghcr.io",
                                             "scope": "repository:o/k:pull"}
    assert _parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})


def test_https_to_a_plain_http_registry_says_how_to_fix_it():
    import http.server
    import threading

    from ktlegacy.registry import RegistryClient

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = parse_target(f"https://127.0.0.1:{server.server_address[1]}/team")
        with pytest.raises(KtlegacyError) as err:
            RegistryClient(target, target.repository("ktransformers"), use_docker_login=False).ping()
    finally:
        server.shutdown()
        server.server_close()
    assert "TLS failed" in str(err.value) and "--registry http://HOST" in str(err.value)
    assert "\n" not in str(err.value)
