"""invoke publish against a real registry: Debian's docker-registry (distribution 2.8) on 127.0.0.1.

Each test starts its own registry (storage in a tmp dir, deletes enabled) and publishes the
stand-in runtime image (fixture ``standin_runtime_image``: images/Dockerfile built on the no-CUDA
stand-in base, labelled by ktlegacy/build.py), or an image built FROM it.
Failures are real ones: the registry process is killed between the manifest push and the
tagging, a proxy in front of the registry fails one tag PUT, htpasswd auth refuses, a port
has nothing listening.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ktlegacy import images
from ktlegacy.arch import get_arch
from ktlegacy.errors import KtlegacyError

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
REGISTRY_BIN = "/usr/bin/docker-registry"
REF = "0.2.1.post1"
SHA_B = "b2c3d4e5f60718293a4b5c6d7e8f901234567890"
TAG = images.tag_suffix(REF, get_arch("sm75"), "AVX2") + "-standin"   # as ktlegacy/build.py tags it
MOVING = "latest-sm75-avx2-standin"
NAME = "ktransformers"
# local repositories (h5 prefix: other helpers share this Docker daemon)
SRC_A = "h5-ktlegacy/ktransformers"
SRC_B = "h5-ktlegacy-b/ktransformers"
SRC_BAD = "h5-ktlegacy-bad/ktransformers"
SRC_TWO = "h5-ktlegacy-two/ktransformers"   # two images: A as avx2, and A relabelled avx512
TAG_512 = images.tag_suffix(REF, get_arch("sm75"), "AVX512") + "-standin"
# the fixture image is built from this working tree, which may have uncommitted changes
ALLOW = ("--allow-standin", "--allow-dirty")


def _missing(what: str):
    if os.environ.get("KTLEGACY_ALLOW_SKIP") == "1":
        pytest.skip(what)
    pytest.fail(what + " (run tests/host-setup, or KTLEGACY_ALLOW_SKIP=1 to skip)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """docker-registry serving on 127.0.0.1:<port>, storage under ``root``; start/kill/restart."""

    def __init__(self, root: Path, htpasswd: Path | None = None, auth_yaml: str = ""):
        self.root, self.port, self.proc = root, free_port(), None
        self.host = f"127.0.0.1:{self.port}"
        self.auth = None  # "user:password" (basic) or "Bearer <token>" for the test's own API calls
        root.mkdir(parents=True, exist_ok=True)
        auth = f"auth:\n  htpasswd:\n    realm: h5-test\n    path: {htpasswd}\n" if htpasswd else auth_yaml
        (root / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth)

    def start(self) -> "LocalRegistry":
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.root / "config.yml")],
                                     stdout=open(self.root / "log", "ab"), stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("docker-registry exited: " + (self.root / "log").read_text()[-500:])
                time.sleep(0.1)
        raise RuntimeError("docker-registry did not listen on " + self.host)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def api(self, method: str, path: str, accept: str = "application/vnd.docker.distribution.manifest.v2+json"):
        req = urllib.request.Request(f"http://{self.host}{path}", method=method, headers={"Accept": accept})
        if self.auth and self.auth.startswith("Bearer "):
            req.add_header("Authorization", self.auth)
        elif self.auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(self.auth.encode()).decode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def tags(self, name: str = NAME) -> list[str]:
        status, _, body = self.api("GET", f"/v2/{name}/tags/list")
        if status == 404:
            return []
        assert status == 200, (status, body)
        return sorted(json.loads(body).get("tags") or [])

    def digest_of(self, tag: str, name: str = NAME) -> str | None:
        status, headers, _ = self.api("HEAD", f"/v2/{name}/manifests/{tag}")
        return headers["Docker-Content-Digest"] if status == 200 else None


@pytest.fixture
def registry(tmp_path):
    if not os.access(REGISTRY_BIN, os.X_OK):
        _missing(f"{REGISTRY_BIN} (Debian package docker-registry)")
    reg = LocalRegistry(tmp_path / "registry").start()
    yield reg
    reg.kill()


@pytest.fixture
def docker_config(tmp_path, monkeypatch) -> Path:
    """An empty docker config dir: no login unless a test makes one (never the host's)."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


@pytest.fixture(scope="module")
def layer_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("h5-publish-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(layer_cache, monkeypatch):
    # our own layer cache, and a blob store so the 1.6 GB image is compressed once per module
    # (the first publish, test_publish_then_pull_back..., compresses; later ones reuse)
    monkeypatch.setattr("ktlegacy.publish.CACHE_DIR", layer_cache)
    monkeypatch.setenv("KTLEGACY_CACHE", str(layer_cache))
    monkeypatch.setenv("KTLEGACY_BLOB_STORE", str(layer_cache / "blobs"))


def _build_from(docker, base: str, context: Path, tag: str, labels: dict, run: str | None = None) -> str:
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text(f"FROM {base}\n" + (f"RUN {run}\n" if run else ""))
    args = ["-q", "-t", tag]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    proc = subprocess.run(docker.build_cmd(*args, str(context)), env=docker.build_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _inspect(docker, tag)["Id"]


def _inspect(docker, ref: str) -> dict:
    return json.loads(docker.run("image", "inspect", ref).stdout)[0]


@pytest.fixture(scope="module")
def standin_images(docker, standin_runtime_image, tmp_path_factory) -> dict:
    """A: the stand-in runtime image itself; B: A plus one layer, built at another commit;
    bad: A relabelled for sm70 under an sm75 tag."""
    root = tmp_path_factory.mktemp("h5-images")
    docker.run("tag", standin_runtime_image, f"{SRC_A}:{TAG}")
    built = {
        "A": _inspect(docker, standin_runtime_image)["Id"],
        "B": _build_from(docker, standin_runtime_image, root / "b", f"{SRC_B}:{TAG}",
                         {images.LABEL_REVISION: SHA_B}, run="echo h5-image-b > /tmp/h5-marker"),
        "bad": _build_from(docker, standin_runtime_image, root / "bad", f"{SRC_BAD}:{TAG}",
                           {images.LABEL_ARCH: "sm70"}),
        "avx512": _build_from(docker, standin_runtime_image, root / "avx512", f"{SRC_TWO}:{TAG_512}",
                              {images.LABEL_CPU: "AVX512"}),
    }
    docker.run("tag", standin_runtime_image, f"{SRC_TWO}:{TAG}")
    built["revision_A"] = _inspect(docker, standin_runtime_image)["Config"]["Labels"][images.LABEL_REVISION]
    assert built["revision_A"], "the stand-in runtime image has no revision label"
    yield built
    for ref in (f"{SRC_A}:{TAG}", f"{SRC_B}:{TAG}", f"{SRC_BAD}:{TAG}", f"{SRC_TWO}:{TAG}", f"{SRC_TWO}:{TAG_512}"):
        docker.run("rmi", ref, check=False)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", "publish", *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def expected_tags(revision: str, moving: bool) -> list[str]:
    dirty = "-dirty" if revision.endswith("-dirty") else ""
    return sorted([TAG, f"{TAG}-g{revision[:7]}{dirty}"] + ([MOVING] if moving else []))


def verify_blobs(reg: LocalRegistry, digest: str) -> dict:
    """Fetch the manifest by digest and every blob it names; check digests and diff_ids; return config."""
    status, headers, body = reg.api("GET", f"/v2/{NAME}/manifests/{digest}")
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    manifest = json.loads(body)
    status, _, config_bytes = reg.api("GET", f"/v2/{NAME}/blobs/{manifest['config']['digest']}")
    assert status == 200 and "sha256:" + hashlib.sha256(config_bytes).hexdigest() == manifest["config"]["digest"]
    config = json.loads(config_bytes)
    diff_ids = []
    for layer in manifest["layers"]:
        status, _, blob = reg.api("GET", f"/v2/{NAME}/blobs/{layer['digest']}")
        assert status == 200 and len(blob) == layer["size"]
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest())
    assert diff_ids == config["rootfs"]["diff_ids"]
    return config


# --- the happy path --------------------------------------------------------------------------

def test_publish_then_pull_back_by_tag_and_by_digest(registry, docker, docker_config, standin_images):
    revision = standin_images["revision_A"]
    proc = cli("--registry", registry.host, "--source-repository", SRC_A, *ALLOW, "--moving")
    assert proc.returncode == 0, proc.stderr
    assert registry.tags() == expected_tags(revision, moving=True)
    digest = registry.digest_of(TAG)
    assert all(registry.digest_of(t) == digest for t in expected_tags(revision, True))
    assert f"{registry.host}/{NAME}@{digest}" in proc.stdout

    # every blob, fetched over the API: digest, size, and decompressed diff_id match the config
    config = verify_blobs(registry, digest)
    assert config["config"]["Labels"][images.LABEL_ARCH] == "sm75"

    # docker pulls it back by tag and by digest: the same image (config digest = image id), labels
    # intact, and its in-image smoke passes (docker skips layers it holds: the blob check above
    # is what proves every layer's bytes)
    remote = f"{registry.host}/{NAME}"
    try:
        for ref in (f"{remote}:{TAG}", f"{remote}@{digest}"):
            docker.run("pull", "-q", ref)
            info = _inspect(docker, ref)
            assert info["Id"] == standin_images["A"], "the pulled image is not the one pushed"
            assert f"{remote}@{digest}" in info["RepoDigests"]
            labels = info["Config"]["Labels"]
            assert labels[images.LABEL_REF] == REF and labels[images.LABEL_CPU] == "AVX2"
            assert labels[images.LABEL_REVISION] == revision and labels["io.ktlegacy.standin"] == "true"
        smoke = subprocess.run([sys.executable, "-m", "ktlegacy", "smoke", "--arch", "sm75", "--image",
                                f"{remote}:{TAG}"], capture_output=True, text=True, cwd=REPO)
        assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-2000:]
    finally:
        docker.run("rmi", f"{remote}:{TAG}", check=False)
        docker.run("rmi", f"{remote}@{digest}", check=False)

    # publishing again is idempotent: same digest, no new blobs, same tags
    again = cli("--registry", registry.host, "--source-repository", SRC_A, *ALLOW)
    assert again.returncode == 0, again.stderr
    assert f"@{digest} (0 blobs uploaded" in again.stdout
    assert registry.tags() == expected_tags(revision, moving=True)


def test_dry_run_through_invoke_pushes_nothing(registry, standin_images, docker_config):
    revision = standin_images["revision_A"]
    invoke = REPO / ".venv/bin/invoke"
    base = [str(invoke) if invoke.exists() else "invoke", "publish", "--registry", f"{registry.host}/team",
            "--source-repository", SRC_A, *ALLOW, "--dry-run", "--cpu-instruct", "avx2", "--arch", "sm75"]
    moving = subprocess.run(base + ["--moving"], capture_output=True, text=True, cwd=REPO)
    plain = subprocess.run(base, capture_output=True, text=True, cwd=REPO)
    assert moving.returncode == 0 and plain.returncode == 0, moving.stderr + plain.stderr
    tags = ", ".join([TAG, expected_tags(revision, False)[1], MOVING])
    assert f"to {registry.host}/team/{NAME} as {tags}" in moving.stdout
    assert "latest-" not in plain.stdout
    assert registry.tags("team/" + NAME) == []


# --- bad input: one line, non-zero, no tags ----------------------------------------------------

def test_registry_killed_between_digest_push_and_tagging(registry, docker, docker_config, standin_images,
                                                          monkeypatch):
    import ktlegacy.publish as publish_mod
    seen = {}

    def crash(plan, digest):
        seen["digest"] = digest
        registry.kill()

    monkeypatch.setattr(publish_mod, "before_tagging", crash)
    with pytest.raises(KtlegacyError) as err:
        publish_mod.publish(registry.host, source_repository=SRC_A, allow_standin=True, allow_dirty=True,
                            moving=True, docker=docker, out=lambda line: None)
    message = str(err.value)
    assert "\n" not in message and f"registry {registry.host} is unreachable" in message
    assert "no tag" in message

    registry.start()  # same storage: what did the crash leave behind?
    assert registry.tags() == []
    assert registry.api("HEAD", f"/v2/{NAME}/manifests/{seen['digest']}")[0] == 200  # it was pushed by digest


class FailingProxy:
    """HTTP proxy to the registry that forwards everything, but answers 500 to the first PUT of one
    tag (after forwarding it, so the tag did move: the worst case for the publisher)."""

    def __init__(self, upstream: str, fail_path: str, after_forward=None):
        # after_forward(path): instead of answering 500, run this once the PUT landed (e.g. kill
        # the registry) and pass the registry's own answer on
        self.upstream, self.fail_path, self.failed = upstream, fail_path, 0
        self.after_forward = after_forward
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
                length = int(self.headers.get("Content-Length") or 0)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
                left = length
                while left:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    conn.send(chunk)
                    left -= len(chunk)
                resp = conn.getresponse()
                body = resp.read()
                if self.command == "PUT" and self.path == proxy.fail_path and not proxy.failed and proxy.after_forward:
                    proxy.failed += 1
                    proxy.after_forward(self.path)
                elif self.command == "PUT" and self.path == proxy.fail_path and not proxy.failed:
                    proxy.failed += 1
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_failed_tag_rolls_back_every_tag(registry, docker, docker_config, standin_images):
    from ktlegacy.publish import publish
    publish(registry.host, source_repository=SRC_A, allow_standin=True, allow_dirty=True, moving=True,
            docker=docker, out=lambda line: None)
    before = {tag: registry.digest_of(tag) for tag in registry.tags()}
    assert sorted(before) == expected_tags(standin_images["revision_A"], moving=True)

    # B: same ref/arch/cpu tag, new commit; the moving tag's PUT fails after it landed
    proxy = FailingProxy(registry.host, f"/v2/{NAME}/manifests/{MOVING}")
    try:
        with pytest.raises(KtlegacyError) as err:
            publish(proxy.host, source_repository=SRC_B, allow_standin=True, allow_dirty=True, moving=True,
                    docker=docker, out=lambda line: None)
    finally:
        proxy.close()
    assert proxy.failed == 1
    message = str(err.value)
    assert "\n" not in message and "HTTP 500" in message and "rolled back" in message
    # exactly A's tags, each still on A's manifest; B's sha tag is gone
    assert {tag: registry.digest_of(tag) for tag in registry.tags()} == before


def test_registry_killed_while_tagging_names_what_may_be_left(registry, docker, docker_config, standin_images):
    """The one case no client can roll back: the registry dies after the first tag landed. The
    error must say so, and name every tag that may be left (a superset of what is there)."""
    from ktlegacy.publish import publish
    proxy = FailingProxy(registry.host, f"/v2/{NAME}/manifests/{TAG}", after_forward=lambda path: registry.kill())
    try:
        with pytest.raises(KtlegacyError) as err:
            publish(proxy.host, source_repository=SRC_A, allow_standin=True, allow_dirty=True, moving=True,
                    docker=docker, out=lambda line: None)
    finally:
        proxy.close()
    message = str(err.value)
    assert proxy.failed == 1 and "\n" not in message
    assert "could not roll back" in message and "re-run publish, or delete them" in message
    named = set(message.split("so tags ", 1)[1].split(f" of {proxy.host}", 1)[0].split(", "))
    registry.start()
    assert TAG in registry.tags() and set(registry.tags()) <= named


def test_failed_tag_of_the_second_image_rolls_back_the_first(registry, docker, docker_config, standin_images):
    """Several images in one run: all are stored by digest first, then all tags or none."""
    from ktlegacy.publish import publish
    proxy = FailingProxy(registry.host, f"/v2/{NAME}/manifests/{TAG_512}")
    try:
        with pytest.raises(KtlegacyError) as err:
            publish(proxy.host, source_repository=SRC_TWO, allow_standin=True, allow_dirty=True, docker=docker,
                    out=lambda line: None)
    finally:
        proxy.close()
    assert proxy.failed == 1 and "rolled back" in str(err.value)
    assert registry.tags() == []  # not even the avx2 image's tags, which went in first

    # the same run without the failure publishes both
    results = publish(registry.host, source_repository=SRC_TWO, allow_standin=True, allow_dirty=True,
                      docker=docker, out=lambda line: None)
    assert [r.plan.image.cpu for r in results] == ["AVX2", "AVX512"]
    assert {TAG, TAG_512} <= set(registry.tags()) and len(registry.tags()) == 4


def test_auth_refused_without_login_or_with_a_wrong_one(tmp_path, docker, docker_config, standin_images):
    import bcrypt  # the registry's htpasswd takes bcrypt hashes only
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("h5user:" + bcrypt.hashpw(b"h5-secret-pw", bcrypt.gensalt(rounds=5)).decode() + "\n")
    reg = LocalRegistry(tmp_path / "auth-registry", htpasswd=htpasswd).start()
    try:
        args = ("--registry", reg.host, "--source-repository", SRC_A, *ALLOW)
        line = assert_one_line_error(cli(*args), f"registry {reg.host} asks for a login",
                                     f"docker login {reg.host}")

        wrong = base64.b64encode(b"h5user:not-the-password").decode()
        (docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": wrong}}}))
        line = assert_one_line_error(cli(*args), "refused", "HTTP 401", f"docker login {reg.host}")
        assert "not-the-password" not in line and wrong not in line
        reg.auth = "h5user:h5-secret-pw"
        assert reg.tags() == []

        # a real docker login, then the same command publishes
        (docker_config / "config.json").unlink()
        login = subprocess.run(docker.cmd("login", reg.host, "-u", "h5user", "--password-stdin"),
                               input=b"h5-secret-pw", capture_output=True, env=dict(os.environ))
        assert login.returncode == 0, login.stderr
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "h5-secret-pw" not in proc.stdout + proc.stderr
        assert reg.tags() == expected_tags(standin_images["revision_A"], moving=False)
    finally:
        reg.kill()


def test_unreachable_registry(docker_config, standin_images):
    port = free_port()  # nothing listens there
    proc = cli("--registry", f"127.0.0.1:{port}", "--source-repository", SRC_A, *ALLOW)
    assert_one_line_error(proc, f"registry 127.0.0.1:{port} is unreachable", "connection refused")


def test_image_never_built(registry, docker_config, standin_images):
    proc = cli("--registry", registry.host, "--source-repository", "h5-ktlegacy-never/ktransformers")
    assert_one_line_error(proc, "no image like h5-ktlegacy-never/ktransformers:<ref>-cu118-", "invoke build")
    proc = cli("--registry", registry.host, "--source-repository", SRC_A, "--ref", "v0.3.2", *ALLOW)
    assert_one_line_error(proc, "no image like h5-ktlegacy/ktransformers:v0.3.2-cu118-")
    assert registry.tags() == []


def test_refuses_labels_that_contradict_the_tag(registry, docker, docker_config, standin_images):
    proc = cli("--registry", registry.host, "--source-repository", SRC_BAD, *ALLOW)
    assert_one_line_error(proc, f"{SRC_BAD}:{TAG} is labelled {images.LABEL_ARCH}=sm70 but its tag says sm75")
    proc = cli("--registry", registry.host, "--source-repository", SRC_B, *ALLOW, "--sha", "c" * 40)
    assert_one_line_error(proc, f"built from commit {SHA_B[:12]}", f"not --sha {'c' * 12}")
    proc = cli("--registry", registry.host, "--source-repository", SRC_A, "--allow-dirty")
    assert_one_line_error(proc, "stand-in build without CUDA", "--allow-standin")
    # a stand-in image under a tag without -standin would pass for a CUDA build
    docker.run("tag", standin_images["A"], f"{SRC_BAD}-plain:{TAG.removesuffix('-standin')}")
    try:
        proc = cli("--registry", registry.host, "--source-repository", f"{SRC_BAD}-plain", *ALLOW)
        assert_one_line_error(proc, "io.ktlegacy.standin=true but its tag does not say -standin")
    finally:
        docker.run("rmi", f"{SRC_BAD}-plain:{TAG.removesuffix('-standin')}", check=False)
    assert registry.tags() == []



class TokenService:
    """A bearer-token service as GHCR, Docker Hub and Harbor run one: basic auth in, a JWT out
    (ES256, the signing certificate in the x5c header), which docker-registry checks against
    its rootcertbundle. Only h5user:h5-token-pw gets a token; it grants what the scope asks."""

    USER, PASSWORD = "h5user", "h5-token-pw"

    def __init__(self, root: Path):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h5-token-issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = root / "token-ca.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[tuple[str, str]] = []  # (who, scope)
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                who = "anonymous"
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    who = base64.b64decode(header[6:]).decode()
                service.requests.append((who, query.get("scope", "")))
                if who != f"{service.USER}:{service.PASSWORD}":
                    body = b'{"errors":[{"code":"UNAUTHORIZED"}]}'
                    self.send_response(401)
                else:
                    body = json.dumps({"token": service.issue(query.get("scope", ""))}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def issue(self, scope: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for item in filter(None, scope.split(" ")):
            kind, name, actions = item.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": "h5-issuer", "sub": self.USER, "aud": "h5-registry", "exp": now + 600,
                  "nbf": now - 60, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def yaml(self) -> str:
        return ("auth:\n  token:\n"
                f"    realm: {self.realm}\n    service: h5-registry\n    issuer: h5-issuer\n"
                f"    rootcertbundle: {self.bundle}\n")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_bearer_token_flow_as_on_ghcr(tmp_path, docker, docker_config, standin_images):
    tokens = TokenService(tmp_path / "tokens")
    reg = LocalRegistry(tmp_path / "token-registry", auth_yaml=tokens.yaml()).start()
    try:
        args = ("--registry", reg.host, "--source-repository", SRC_A, *ALLOW)
        assert_one_line_error(cli(*args), f"the token service of {reg.host} refused an anonymous request",
                              "HTTP 401", f"docker login {reg.host}")
        assert tokens.requests[-1] == ("anonymous", f"repository:{NAME}:pull,push")

        login = subprocess.run(docker.cmd("login", reg.host, "-u", tokens.USER, "--password-stdin"),
                               input=tokens.PASSWORD.encode(), capture_output=True, env=dict(os.environ))
        assert login.returncode == 0, login.stderr
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert tokens.PASSWORD not in proc.stdout + proc.stderr
        assert (f"{tokens.USER}:{tokens.PASSWORD}", f"repository:{NAME}:pull,push") in tokens.requests
        reg.auth = "Bearer " + tokens.issue(f"repository:{NAME}:pull")
        assert reg.tags() == expected_tags(standin_images["revision_A"], moving=False)
        assert registry_digest_ok(reg)
    finally:
        reg.kill()
        tokens.close()


def registry_digest_ok(reg: LocalRegistry) -> bool:
    digest = reg.digest_of(TAG)
    return bool(digest) and verify_blobs(reg, digest)["config"]["Labels"][images.LABEL_ARCH] == "sm75"
