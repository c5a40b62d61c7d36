"""invoke publish against a real registry: Debian's docker-registry (distribution 2.8) on 127.0.0.1.

Each test starts its own registry (storage in a tmp dir) and publishes the stand-in runtime image
(fixture ``standin_runtime_image``: images/Dockerfile built on the no-CUDA stand-in base, labelled
by ktlegacy/build.py), or an image built FROM it, with ``docker push`` (dockerd does the transfer).
Failures are real ones: a proxy in front of the registry answers 500 to one manifest PUT (a
followed tag, or the commit tag of the second image), htpasswd auth refuses, a port has nothing
listening; each ends in one line, and running the same publish again ends with every tag on the
image that was checked.
"""

from __future__ import annotations

import base64
import copy
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
import urllib.request
import uuid
from pathlib import Path

import pytest

from ktlegacy import images
from ktlegacy.core.arch import get_arch

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
REGISTRY_BIN = "/usr/bin/docker-registry"
REF = "0.2.1.post1"
SHA_B = "b2c3d4e5f60718293a4b5c6d7e8f901234567890"
TAG = images.tag_suffix(REF, get_arch("sm75"), "AVX2") + "-standin"   # as ktlegacy/build.py tags it
MOVING = "latest-sm75-avx2-standin"
NAME = "ktransformers"
# local repositories, unique to this run: other test runs share this Docker daemon
RUN = uuid.uuid4().hex[:6]
SRC_A = f"h5-{RUN}-ktlegacy/ktransformers"
SRC_B = f"h5-{RUN}-ktlegacy-b/ktransformers"
SRC_BAD = f"h5-{RUN}-ktlegacy-bad/ktransformers"
SRC_TWO = f"h5-{RUN}-ktlegacy-two/ktransformers"   # two images: A as avx2, and A relabelled avx512
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

    def __init__(self, root: Path, htpasswd: Path | None = None):
        self.root, self.port, self.proc = root, free_port(), None
        self.host = f"127.0.0.1:{self.port}"
        self.ns = ""      # a namespace of its own per test (see the registry fixture)
        self.auth = None  # "user:password" for the test's own API calls
        root.mkdir(parents=True, exist_ok=True)
        auth = f"auth:\n  htpasswd:\n    realm: h5-test\n    path: {htpasswd}\n" if htpasswd else ""
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
        if self.auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(self.auth.encode()).decode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    @property
    def arg(self) -> str:
        """What --registry gets: HOST:PORT[/NAMESPACE]."""
        return f"{self.host}/{self.ns}" if self.ns else self.host

    @property
    def name(self) -> str:
        """The repository's name inside the registry."""
        return f"{self.ns}/{NAME}" if self.ns else NAME

    @property
    def repo(self) -> str:
        """The repository users pull."""
        return f"{self.arg}/{NAME}"

    def namespaced(self, ns: str) -> "LocalRegistry":
        view = copy.copy(self)
        view.ns = ns
        return view

    def tags(self, name: str | None = None) -> list[str]:
        name = name or self.name
        status, _, body = self.api("GET", f"/v2/{name}/tags/list")
        if status == 404:
            return []
        assert status == 200, (status, body)
        return sorted(json.loads(body).get("tags") or [])

    def digest_of(self, tag: str, name: str | None = None) -> str | None:
        status, headers, _ = self.api("HEAD", f"/v2/{name or self.name}/manifests/{tag}")
        return headers["Docker-Content-Digest"] if status == 200 else None


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory):
    """One registry for the module: dockerd compresses the 1.6 GB image once, for the first push
    to it; every later push mounts the blobs from the repository that holds them."""
    if not os.access(REGISTRY_BIN, os.X_OK):
        _missing(f"{REGISTRY_BIN} (Debian package docker-registry)")
    reg = LocalRegistry(tmp_path_factory.mktemp("h5-registry")).start()
    yield reg
    reg.kill()


@pytest.fixture
def registry(shared_registry):
    """The shared registry, seen through a namespace of this test's own: empty at the start."""
    return shared_registry.namespaced("t" + uuid.uuid4().hex[:10])


@pytest.fixture
def docker_config(tmp_path, monkeypatch) -> Path:
    """An empty docker config dir: no login unless a test makes one (never the host's)."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


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


SRC_TINY = f"h5-{RUN}-ktlegacy-tiny/ktransformers"


@pytest.fixture(scope="module")
def tiny_image(docker, standin_images, tmp_path_factory) -> str:
    """Two small files as an image, with the stand-in image's labels under its tag: it passes
    every check, and a push to a registry of its own (the auth test's) moves kilobytes."""
    root = tmp_path_factory.mktemp("h5-tiny")
    (root / "h5-tiny").write_text("h5\n")
    labels = docker.labels(f"{SRC_A}:{TAG}")
    changes = []
    for key, value in labels.items():
        changes += ["--change", f"LABEL {json.dumps(key)}={json.dumps(value)}"]
    tar = subprocess.run(["tar", "-C", str(root), "-c", "h5-tiny"], capture_output=True, check=True).stdout
    docker.run("import", *changes, "-", f"{SRC_TINY}:{TAG}", input=tar)
    assert docker.labels(f"{SRC_TINY}:{TAG}") == labels
    yield f"{SRC_TINY}:{TAG}"
    docker.run("rmi", f"{SRC_TINY}:{TAG}", check=False)


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


def commit_tag(revision: str, tag: str = TAG) -> str:
    dirty = "-dirty" if revision.endswith("-dirty") else ""
    return f"{tag}-g{revision[:7]}{dirty}"


def expected_tags(revision: str, moving: bool) -> list[str]:
    return sorted([TAG, commit_tag(revision)] + ([MOVING] if moving else []))


def config_digest(reg: LocalRegistry, digest: str) -> str:
    """The image id (config digest) of the manifest stored under ``digest``."""
    status, _, body = reg.api("GET", f"/v2/{reg.name}/manifests/{digest}")
    assert status == 200, (status, body)
    return json.loads(body)["config"]["digest"]


def where_tags_point(reg: LocalRegistry) -> dict:
    return {tag: reg.digest_of(tag) for tag in reg.tags()}


# --- the happy path --------------------------------------------------------------------------

def test_publish_then_pull_back_by_tag_and_by_digest(registry, docker, docker_config, standin_images):
    revision = standin_images["revision_A"]
    proc = cli("--registry", registry.arg, "--source-repository", SRC_A, *ALLOW, "--moving")
    assert proc.returncode == 0, proc.stderr
    assert registry.tags() == expected_tags(revision, moving=True)
    digest = registry.digest_of(TAG)
    assert all(registry.digest_of(t) == digest for t in expected_tags(revision, True))
    assert f"{registry.repo}@{digest}" in proc.stdout
    # the registry holds the checked local image: its config digest is the local image id
    assert config_digest(registry, digest) == standin_images["A"]
    # publish leaves no local name of the registry behind (it tags by image id, pushes, untags)
    assert docker.tags(registry.repo) == []

    # docker pulls it back by tag and by digest: the same image, labels intact, its smoke passes
    remote = registry.repo
    try:
        for ref in (f"{remote}:{TAG}", f"{remote}@{digest}"):
            docker.run("pull", "-q", ref)
            info = docker.inspect(ref)
            assert info["Id"] == standin_images["A"], "the pulled image is not the one pushed"
            assert f"{remote}@{digest}" in info["RepoDigests"]
            labels = docker.labels(ref)
            assert labels[images.LABEL_REF] == REF and labels[images.LABEL_CPU] == "AVX2"
            assert labels[images.LABEL_REVISION] == revision and labels[images.LABEL_STANDIN] == "true"
        smoke = subprocess.run([sys.executable, "-m", "ktlegacy", "smoke", "--arch", "sm75", "--image",
                                f"{remote}:{TAG}"], capture_output=True, text=True, cwd=REPO)
        assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-2000:]
    finally:
        docker.run("rmi", f"{remote}:{TAG}", check=False)
        docker.run("rmi", f"{remote}@{digest}", check=False)

    # publishing again is idempotent: same digest, same tags
    again = cli("--registry", registry.arg, "--source-repository", SRC_A, *ALLOW)
    assert again.returncode == 0, again.stderr
    assert f"@{digest} as" in again.stdout
    assert where_tags_point(registry) == {t: digest for t in expected_tags(revision, moving=True)}


def test_dry_run_through_invoke_pushes_nothing(registry, standin_images, docker_config):
    revision = standin_images["revision_A"]
    invoke = REPO / ".venv/bin/invoke"
    base = [str(invoke) if invoke.exists() else "invoke", "publish", "--registry", f"{registry.arg}/team",
            "--source-repository", SRC_A, *ALLOW, "--dry-run", "--cpu-instruct", "avx2", "--arch", "sm75"]
    moving = subprocess.run(base + ["--moving"], capture_output=True, text=True, cwd=REPO)
    plain = subprocess.run(base, capture_output=True, text=True, cwd=REPO)
    assert moving.returncode == 0 and plain.returncode == 0, moving.stderr + plain.stderr
    tags = ", ".join([commit_tag(revision), TAG, MOVING])
    assert f"to {registry.arg}/team/{NAME} as {tags}" in moving.stdout
    assert "latest-" not in plain.stdout
    assert registry.tags(f"{registry.ns}/team/{NAME}") == []


def test_github_output_names_the_image_and_its_tags(tmp_path, registry, standin_images, docker_config):
    """What the workflow's push steps read: one checked image, its repository, its tags."""
    out = tmp_path / "github_output"
    out.write_text("earlier=1\n")
    proc = cli("--registry", "ghcr.io/owner", "--source-repository", SRC_A, *ALLOW, "--dry-run", "--moving",
               "--sha", standin_images["revision_A"].removesuffix("-dirty"), "--github-output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("earlier=1\n")  # appended, as $GITHUB_OUTPUT wants
    assert f"image={SRC_A}:{TAG}\n" in text and f"image-id={standin_images['A']}\n" in text
    assert "repository=ghcr.io/owner/ktransformers\n" in text
    tags = text.split("tags<<KTLEGACY_EOF\n", 1)[1].split("\nKTLEGACY_EOF", 1)[0].splitlines()
    assert tags == [commit_tag(standin_images["revision_A"]), TAG, MOVING]
    assert f"type=raw,value={MOVING}\n" in text
    # two images match: the workflow's step describes one, so this is refused in one line
    proc = cli("--registry", "ghcr.io/owner", "--source-repository", SRC_TWO, *ALLOW, "--dry-run",
               "--github-output", str(tmp_path / "two"))
    assert_one_line_error(proc, "--github-output describes one image, but 2 match")
    assert not (tmp_path / "two").exists()


# --- failures: one line, and the same command run again finishes ---------------------------------

class FailingProxy:
    """HTTP proxy to the registry that forwards everything (request bodies streamed, chunked or not)
    but answers 500 to the first PUT of one path, without forwarding it."""

    def __init__(self, upstream: str, fail_path: str):
        self.upstream, self.fail_path, self.failed = upstream, fail_path, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def body_chunks(self):
                """The request body as it came: chunked framing relayed as is, or Content-Length bytes."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    while True:
                        line = self.rfile.readline()
                        yield line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the empty line
                                trailer = self.rfile.readline()
                                yield trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return
                        yield self.rfile.read(size + 2)  # data + CRLF
                else:
                    left = int(self.headers.get("Content-Length") or 0)
                    while left:
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            return
                        left -= len(chunk)
                        yield chunk

            def forward(self):
                if self.command == "PUT" and self.path == proxy.fail_path and not proxy.failed:
                    for _ in self.body_chunks():
                        pass
                    proxy.failed += 1
                    body = b'{"errors":[{"code":"UNKNOWN","message":"h5 proxy: injected failure"}]}'
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=300)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
                for chunk in self.body_chunks():
                    conn.send(chunk)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    # a HEAD answer's Content-Length is the blob's size (docker reads it): pass it on
                    if key.lower() not in ("transfer-encoding", "connection") and \
                            (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_failed_followed_tag_then_the_same_publish_finishes(registry, docker, docker_config, standin_images):
    """A is published; B (same ref/arch/cpu, another commit) fails on its last followed tag. The
    error names what moved and what did not; running the same publish again puts every tag on B."""
    proc = cli("--registry", registry.arg, "--source-repository", SRC_A, *ALLOW, "--moving")
    assert proc.returncode == 0, proc.stderr
    digest_a = registry.digest_of(TAG)

    proxy = FailingProxy(registry.host, f"/v2/{registry.name}/manifests/{MOVING}")
    try:
        proc = cli("--registry", f"{proxy.host}/{registry.ns}", "--source-repository", SRC_B, *ALLOW, "--moving")
    finally:
        proxy.close()
    assert proxy.failed == 1, proc.stderr
    line = assert_one_line_error(proc, "500", f"moved so far: {proxy.host}/{registry.name}:{TAG}",
                                 f"not moved: {proxy.host}/{registry.name}:{MOVING}", "run the same publish again")
    # B is stored under its commit tag and moved the tag that came first; latest-* still on A
    digest_b = registry.digest_of(commit_tag(SHA_B))
    assert digest_b and digest_b != digest_a and config_digest(registry, digest_b) == standin_images["B"]
    assert registry.digest_of(TAG) == digest_b and registry.digest_of(MOVING) == digest_a, line

    again = cli("--registry", registry.arg, "--source-repository", SRC_B, *ALLOW, "--moving")
    assert again.returncode == 0, again.stderr
    assert f"@{digest_b} as" in again.stdout  # the same image, the same digest
    assert where_tags_point(registry) == {TAG: digest_b, MOVING: digest_b, commit_tag(SHA_B): digest_b,
                                          commit_tag(standin_images["revision_A"]): digest_a}


def test_failure_while_storing_moves_no_followed_tag(registry, docker, docker_config, standin_images):
    """Two images in one run: every image is stored under its commit tag before any followed tag
    moves, so a failure storing the second leaves only the first one's commit tag."""
    revision = standin_images["revision_A"]
    proxy = FailingProxy(registry.host, f"/v2/{registry.name}/manifests/{commit_tag(revision, TAG_512)}")
    try:
        proc = cli("--registry", f"{proxy.host}/{registry.ns}", "--source-repository", SRC_TWO, *ALLOW)
    finally:
        proxy.close()
    assert proxy.failed == 1, proc.stderr
    assert_one_line_error(proc, "500", "no followed tag moved", f"stored so far: {proxy.host}/{registry.name}:{commit_tag(revision)}")
    assert registry.tags() == [commit_tag(revision)]

    again = cli("--registry", registry.arg, "--source-repository", SRC_TWO, *ALLOW)
    assert again.returncode == 0, again.stderr
    tags = where_tags_point(registry)
    assert sorted(tags) == sorted([TAG, commit_tag(revision), TAG_512, commit_tag(revision, TAG_512)])
    assert tags[TAG] == tags[commit_tag(revision)] != tags[TAG_512] == tags[commit_tag(revision, TAG_512)]
    assert config_digest(registry, tags[TAG_512]) == standin_images["avx512"]


def test_auth_refused_without_login_or_with_a_wrong_one(tmp_path, docker, docker_config, standin_images, tiny_image):
    import bcrypt  # the registry's htpasswd takes bcrypt hashes only
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("h5user:" + bcrypt.hashpw(b"h5-secret-pw", bcrypt.gensalt(rounds=5)).decode() + "\n")
    reg = LocalRegistry(tmp_path / "auth-registry", htpasswd=htpasswd).start()
    try:
        args = ("--registry", reg.host, "--source-repository", SRC_TINY, *ALLOW)
        assert_one_line_error(cli(*args), f"registry {reg.host} asks for a login", f"run docker login {reg.host}",
                              "no followed tag moved")

        wrong = base64.b64encode(b"h5user:not-the-password").decode()
        (docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": wrong}}}))
        line = assert_one_line_error(cli(*args), f"registry {reg.host} refused the push",
                                     f"run docker login {reg.host}")
        assert "not-the-password" not in line and wrong not in line
        reg.auth = "h5user:h5-secret-pw"
        assert reg.tags() == []

        # a real docker login, then the same command publishes
        (docker_config / "config.json").unlink()
        login = docker.run("login", reg.host, "-u", "h5user", "--password-stdin", input=b"h5-secret-pw",
                           env=dict(os.environ))
        assert login.returncode == 0
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


@pytest.mark.parametrize("registry_arg, needle", [
    ("http://127.0.0.1:5000", "drop the scheme"),
    ("ghcr.io/Owner", "lower case"),
    ("owner", "is not HOST[:PORT][/NAMESPACE]"),
    ("ghcr.io/own er", "is not HOST[:PORT][/NAMESPACE]"),
])
def test_bad_registry_is_one_line_before_anything_is_read(registry_arg, needle, docker_config):
    # the source repository does not exist: the registry argument is refused before it is looked at
    proc = cli("--registry", registry_arg, "--source-repository", "h5-ktlegacy-never/ktransformers")
    assert_one_line_error(proc, needle)


def test_image_never_built(registry, docker_config, standin_images):
    proc = cli("--registry", registry.arg, "--source-repository", "h5-ktlegacy-never/ktransformers")
    assert_one_line_error(proc, "no image like h5-ktlegacy-never/ktransformers:<ref>-cu118-", "invoke build")
    proc = cli("--registry", registry.arg, "--source-repository", SRC_A, "--ref", "v0.3.2", *ALLOW)
    assert_one_line_error(proc, f"no image like {SRC_A}:v0.3.2-cu118-")
    assert registry.tags() == []


def test_refuses_labels_that_contradict_the_tag(registry, docker, docker_config, standin_images):
    proc = cli("--registry", registry.arg, "--source-repository", SRC_BAD, *ALLOW)
    assert_one_line_error(proc, f"{SRC_BAD}:{TAG} is labelled {images.LABEL_ARCH}=sm70 but its tag says sm75")
    proc = cli("--registry", registry.arg, "--source-repository", SRC_B, *ALLOW, "--sha", "c" * 40)
    assert_one_line_error(proc, f"built from commit {SHA_B[:12]}", f"not --sha {'c' * 12}")
    proc = cli("--registry", registry.arg, "--source-repository", SRC_A, "--allow-dirty")
    assert_one_line_error(proc, "stand-in build without CUDA", "--allow-standin")
    # a stand-in image under a tag without -standin would pass for a CUDA build
    docker.run("tag", standin_images["A"], f"{SRC_BAD}-plain:{TAG.removesuffix('-standin')}")
    try:
        proc = cli("--registry", registry.arg, "--source-repository", f"{SRC_BAD}-plain", *ALLOW)
        assert_one_line_error(proc, "io.ktlegacy.standin=true but its tag does not say -standin")
    finally:
        docker.run("rmi", f"{SRC_BAD}-plain:{TAG.removesuffix('-standin')}", check=False)
    assert registry.tags() == []


def test_refuses_a_native_cpu_image_before_any_other_check():
    """--cpu-instruct NATIVE images run only on the CPU they were built on: never published
    (build --push refused them before publish became the one push path)."""
    from ktlegacy.core.errors import KtlegacyError
    from ktlegacy.publish import LocalImage, check_labels
    arch = get_arch("sm75")
    image = LocalImage("r/ktransformers:0.2.1.post1-cu118-sm75-native", "0.2.1.post1", arch, "NATIVE", "",
                       "sha256:" + "0" * 64, {images.LABEL_ARCH: "sm75", images.LABEL_CPU: "NATIVE"})
    with pytest.raises(KtlegacyError, match="--cpu-instruct NATIVE.*publish AVX2, AVX512 or FANCY"):
        check_labels(image, "a" * 40)
    avx2 = LocalImage(image.tag.replace("native", "avx2"), image.ref, arch, "AVX2", "", image.image_id,
                      dict(image.labels, **{images.LABEL_CPU: "AVX2"}))
    with pytest.raises(KtlegacyError, match="has no label"):   # past the NATIVE check: the next one speaks
        check_labels(avx2, "a" * 40)
