"""Find a Docker client that can do BuildKit builds, and run it.

Two clients exist in the wild and on our machines:

* a client with the buildx plugin: ``docker buildx build``;
* an older client with BuildKit built in (Debian's docker.io 20.10): ``DOCKER_BUILDKIT=1 docker build``.

A newer client without buildx refuses BuildKit ("BuildKit is enabled but the buildx component
is missing"), so we probe each candidate instead of trusting the first ``docker`` on PATH.
Every failure is a one-line :class:`KtlegacyError` saying what to install or start.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from .errors import KtlegacyError


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
            env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.cmd(*args), capture_output=capture, input=input, env=env)
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
            raise KtlegacyError(f"docker {' '.join(args[:2])} failed: {err[-1] if err else 'exit %d' % proc.returncode}")
        return proc


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


@functools.lru_cache(maxsize=1)
def client() -> DockerClient:
    """The first client that reaches a daemon and can do BuildKit builds."""
    paths = _candidates()
    if not paths:
        raise KtlegacyError("no docker client found; install Docker (e.g. apt-get install docker.io)")
    daemon_error = None
    for path in paths:
        info = _ok([path, "version", "--format", "{{.Server.Version}}"])
        if info.returncode != 0:
            daemon_error = (info.stderr.strip().splitlines() or ["?"])[-1]
            continue
        if _ok([path, "buildx", "version"]).returncode == 0:
            return DockerClient(path, buildx=True)
        env = dict(os.environ, DOCKER_BUILDKIT="1")
        probe = _ok([path, "build", "--help"], env=env)
        if probe.returncode == 0 and "--secret" in probe.stdout:
            return DockerClient(path, buildx=False)
    if daemon_error is not None and not any(_ok([p, "version", "--format", "{{.Server.Version}}"]).returncode == 0 for p in paths):
        raise KtlegacyError(f"no Docker daemon is reachable ({daemon_error}); start dockerd "
                            "(or set DOCKER_HOST) and try again")
    raise KtlegacyError("the Docker client(s) " + ", ".join(paths) + " cannot do BuildKit builds; "
                        "install the buildx plugin or a client with BuildKit built in (Debian docker.io)")
