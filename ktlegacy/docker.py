"""The one way ktlegacy talks to Docker: find a client, run it, read labels, push.

Two clients exist in the wild and on our machines:

* a client with the buildx plugin: ``docker buildx build``;
* an older client with BuildKit built in (Debian's docker.io 20.10): ``DOCKER_BUILDKIT=1 docker build``.

A newer client without buildx refuses BuildKit ("BuildKit is enabled but the buildx component
is missing"), so we probe each candidate instead of trusting the first ``docker`` on PATH.
:func:`client` is the client that builds (BuildKit, reaching a daemon); :func:`daemon_client`
any client that reaches a daemon (serving, publishing and the doctor need no BuildKit);
:func:`build_client` the client a build would use, found without a daemon (``--dry-run``).
Every failure is a one-line :class:`KtlegacyError` saying what to install or start.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .core.errors import KtlegacyError


def _last_line(text: str | bytes | None, default: str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else default


@dataclass(frozen=True)
class DockerClient:
    path: str                     # the docker binary
    buildx: bool                  # True: "docker buildx build"; False: DOCKER_BUILDKIT=1 "docker build"
    env: dict = field(default_factory=dict, hash=False, compare=False)

    def cmd(self, *args: str) -> list[str]:
        return [self.path, *args]

    def build_cmd(self, *args: str) -> list[str]:
        """The build command line (for --dry-run printing and for running)."""
        if self.buildx:
            return [self.path, "buildx", "build", "--load", *args]
        return [self.path, "build", *args]

    def build_env(self) -> dict:
        env = dict(os.environ)
        if not self.buildx:
            env["DOCKER_BUILDKIT"] = "1"
        return env

    def shell_prefix(self) -> str:
        """How a printed build command must be prefixed to run as printed."""
        return "" if self.buildx else "DOCKER_BUILDKIT=1 "

    def run(self, *args: str, check: bool = True, capture: bool = True, input: bytes | None = None,
            env: dict | None = None, cwd: str | Path | None = None, stdin=None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``docker ARGS``; with ``check``, a failure is one line: the command and docker's last line.
        ``stdin``: an open file to stream in (``input``: bytes)."""
        try:
            proc = subprocess.run(self.cmd(*args), capture_output=capture, input=input, env=env, cwd=cwd,
                                  stdin=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KtlegacyError(f"docker {' '.join(args[:2])} did not answer within {timeout:.0f} s; "
                                "check that dockerd is healthy") from None
        if check and proc.returncode != 0:
            raise KtlegacyError(f"docker {' '.join(args[:2])} failed: "
                                f"{_last_line(proc.stderr, 'exit %d' % proc.returncode)}")
        return proc

    # -- images ------------------------------------------------------------------------------

    def inspect(self, image: str) -> dict | None:
        """``docker image inspect IMAGE`` as a dict, or None when the daemon does not hold it."""
        proc = self.run("image", "inspect", image, check=False)
        if proc.returncode != 0:
            return None
        return (json.loads(proc.stdout or b"[]") or [None])[0]

    def labels(self, image: str) -> dict | None:
        """The one reader of image labels: a dict (maybe empty), or None when there is no such image."""
        info = self.inspect(image)
        return None if info is None else labels_of(info)

    def tags(self, repository: str) -> list[str]:
        """The tags the daemon holds for ``repository``, sorted."""
        proc = self.run("images", repository, "--format", "{{.Tag}}")
        return sorted({t for t in proc.stdout.decode().split() if t != "<none>"})

    def runtimes(self) -> tuple[dict | None, str]:
        """The daemon's container runtimes, or (None, why there are none to read)."""
        proc = self.run("info", "--format", "{{json .Runtimes}}", check=False, timeout=60)
        if proc.returncode != 0:
            return None, _last_line(proc.stderr, "docker info failed")
        try:
            return json.loads(proc.stdout or b"{}") or {}, ""
        except ValueError:
            return None, "docker info gave no runtimes"

    # -- registries --------------------------------------------------------------------------

    def push(self, reference: str) -> str:
        """``docker push REFERENCE``; return the manifest digest the registry stored it under.

        The daemon does the transfer (gzip, retries, auth from ``docker login``); a failure is
        one line naming the registry and what to do."""
        proc = self.run("push", reference, check=False)
        out = (proc.stdout or b"").decode("utf-8", "replace")
        if proc.returncode != 0:
            raise KtlegacyError(push_error(reference, _last_line(proc.stderr, _last_line(out, f"exit {proc.returncode}"))))
        m = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
        if not m:
            raise KtlegacyError(f"docker push {reference} printed no digest; is {self.path} a Docker client?")
        return m.group(1)

    # -- compose -----------------------------------------------------------------------------

    def compose(self, *args: str, cwd: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
        """``docker compose ARGS`` from ``cwd`` (text output, never raises on a non-zero exit)."""
        return subprocess.run(self.cmd("compose", *args), cwd=cwd, capture_output=True, text=True, env=env)


def labels_of(info: dict) -> dict:
    """The labels in a ``docker image inspect`` record (an image without labels has null there)."""
    return (info.get("Config") or {}).get("Labels") or {}


def push_error(reference: str, cause: str) -> str:
    """docker push's last line -> our one line: which registry, what went wrong, what to do."""
    host = reference.split("/", 1)[0]
    cause = cause.removeprefix("Error response from daemon: ").strip()
    low = cause.lower()
    if "no basic auth credentials" in low:
        return f"registry {host} asks for a login and docker has none for it ({cause}); run docker login {host}"
    if any(s in low for s in ("unauthorized", "authentication required", "denied", "forbidden")):
        return (f"registry {host} refused the push of {reference} with the login docker has for it ({cause}); "
                f"run docker login {host} with an account that may push there")
    if any(s in low for s in ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                              "connection reset", "eof", "server misbehaving")):
        return f"registry {host} is unreachable ({cause}); check the address and that it is up"
    if "http response to https client" in low:
        return (f"registry {host} speaks plain HTTP and dockerd expects HTTPS ({cause}); add it to "
                "insecure-registries in /etc/docker/daemon.json (loopback addresses are allowed already)")
    return f"docker push {reference} failed: {cause}"


def _candidates() -> list[str]:
    seen, out = set(), []
    for path in (os.environ.get("KTLEGACY_DOCKER"), shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                out.append(path)
    return out


def _ok(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def _daemon_error(path: str) -> str | None:
    """None when ``path`` reaches a daemon, else docker's reason."""
    info = _ok([path, "version", "--format", "{{.Server.Version}}"])
    return None if info.returncode == 0 else _last_line(info.stderr, "?")


def _buildkit(path: str) -> DockerClient | None:
    """``path`` as a BuildKit-capable client, or None (needs no daemon)."""
    if _ok([path, "buildx", "version"]).returncode == 0:
        return DockerClient(path, buildx=True)
    probe = _ok([path, "build", "--help"], env=dict(os.environ, DOCKER_BUILDKIT="1"))
    if probe.returncode == 0 and "--secret" in probe.stdout:
        return DockerClient(path, buildx=False)
    return None


# The exact step that makes a fresh Debian/Ubuntu machine able to build (what tests/run does first).
SETUP_STEP = "sudo tests/host-setup (installs docker.io and starts dockerd; or: sudo apt-get install docker.io)"


def _no_client() -> KtlegacyError:
    return KtlegacyError(f"Docker is not installed: run {SETUP_STEP}")


def _no_daemon(reason: str) -> KtlegacyError:
    """No daemon answers: say whether an engine is there to start at all."""
    if not (shutil.which("dockerd") or Path("/usr/bin/dockerd").is_file()):
        return KtlegacyError(f"no Docker engine on this machine ({reason}): run {SETUP_STEP}")
    return KtlegacyError(f"the Docker engine is installed but not running ({reason}): start it with "
                         "sudo systemctl start docker, or sudo tests/host-setup (starts dockerd; or set DOCKER_HOST)")


@functools.lru_cache(maxsize=1)
def client() -> DockerClient:
    """The first client that reaches a daemon and can do BuildKit builds."""
    paths = _candidates()
    if not paths:
        raise _no_client()
    errors = {}
    for path in paths:
        errors[path] = _daemon_error(path)
        if errors[path] is not None:
            continue
        found = _buildkit(path)
        if found is not None:
            return found
    if all(err is not None for err in errors.values()):
        raise _no_daemon(errors[paths[0]])
    raise KtlegacyError("the Docker client(s) " + ", ".join(paths) + " cannot do BuildKit builds; "
                        "install the buildx plugin or a client with BuildKit built in (Debian docker.io)")


def build_client() -> DockerClient:
    """The client a build would use, found without a daemon (what ``--dry-run`` prints): the
    daemon-reaching BuildKit client when there is one, else the first BuildKit-capable client."""
    try:
        return client()
    except KtlegacyError:
        pass
    paths = _candidates()
    for path in paths:
        found = _buildkit(path)
        if found is not None:
            return found
    if not paths:
        raise _no_client()
    raise KtlegacyError("the Docker client(s) " + ", ".join(paths) + " cannot do BuildKit builds; "
                        "install the buildx plugin or a client with BuildKit built in (Debian docker.io)")


def daemon_client() -> DockerClient:
    """A client that reaches a daemon; BuildKit not needed (publish, doctor, up)."""
    try:
        return client()
    except KtlegacyError as exc:
        why = exc
    for path in _candidates():
        if _daemon_error(path) is None:
            return DockerClient(path, buildx=False)
    raise why
