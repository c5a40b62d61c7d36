"""A Debian bookworm root file system as a base image, made without any registry.

``debootstrap`` builds a minimal Debian bookworm root file system from a Debian mirror and
``docker import`` turns it into an image. Two uses:

* as is, the tests' no-CUDA stand-in for the CUDA bases: it exercises every stage of the real
  Dockerfile that needs none (source + overlays, the flash-attn stub, runtime wiring, smoke tests);
* as ``ROOTFS_IMAGE`` of images/debian-cuda.Dockerfile, which adds Debian's CUDA 11.8 toolkit
  (``invoke build --debian-bases``: no Docker Hub, no NVIDIA registry; CI's real compile).

The root file system tarball is cached so later runs only re-import it.
It stays in the library, not in :mod:`ktlegacy.testing`: ``build --debian-bases`` runs it, and it
needs nothing beyond the standard library and ``debootstrap``.
``python -m ktlegacy debian-rootfs [--mirror URL] [--tag T]`` makes it from the command line.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .core import facts
from .core.command import command
from .core.errors import KtlegacyError
from .core.source import CACHE_DIR

STANDIN_IMAGE = "ktlegacy-standin/bookworm:base"
MIRROR_LABEL = facts.LABEL_DEBIAN_MIRROR   # the mirror the imported root file system came from
SUITE = "bookworm"
MIRROR = os.environ.get("KTLEGACY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the real CUDA base images also have (python3 comes from the toolchain stage there too,
# but a python is needed to run the stand-in's smoke tests and the library).
PACKAGES = ["ca-certificates", "python3", "python3-venv", "python3-pip", "git"]
# The Debian CUDA runtime base's own root file system (`--debian-bases`): what the runtime stage needs
# to start from and nothing else (no git, perl or pip; apt's lists and caches left out of the tarball).
RUNTIME_IMAGE = "ktlegacy-standin/bookworm:runtime"
RUNTIME_PACKAGES = ["ca-certificates", "python3", "python3-venv"]


def _mirror_note(made_from: str | None, asked: str | None, what: str) -> None:
    """An explicit --mirror is read only when the root file system is made: say so when it is not."""
    if asked and asked != made_from:
        print(f"note: --mirror {asked} not used: {what} exists already (made from {made_from or 'an unrecorded mirror'}); "
              "remove it to make it again from that mirror", file=sys.stderr)


def rootfs_tarball(cache: Path = CACHE_DIR, mirror: str | None = None, packages: list[str] | None = None) -> Path:
    asked, mirror = mirror, mirror or MIRROR
    packages = packages or PACKAGES
    lean = packages != PACKAGES   # the stand-in's tarball stays as it always was
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{'rootfs' if lean else 'standin'}-{SUITE}-{'-'.join(sorted(packages))}.tar"
    record = tarball.with_suffix(".mirror")
    with open(cache / ".standin.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs build it once
        if tarball.is_file():
            _mirror_note(record.read_text().strip() if record.is_file() else None, asked, f"the cached {tarball}")
            return tarball
        if not shutil.which("debootstrap"):
            raise KtlegacyError("debootstrap is not installed; run tests/host-setup (apt-get install debootstrap)")
        root = Path(tempfile.mkdtemp(prefix="standin-root-", dir=cache))
        try:
            proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                                   SUITE, str(root), mirror], capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
                raise KtlegacyError(f"debootstrap {SUITE} failed: {tail}")
            if lean:  # apt's package lists, caches and debootstrap's .debs: an image's apt step fetches its own
                for sub in ("var/lib/apt/lists", "var/cache/apt", "var/cache/apt/archives"):
                    for entry in (root / sub).glob("*"):
                        if entry.is_file() and entry.name != "lock":
                            entry.unlink()
            tmp = tarball.with_suffix(".tmp")
            subprocess.run(["tar", "-C", str(root), "-cf", str(tmp), "."], check=True)
            record.write_text(mirror + "\n")
            os.replace(tmp, tarball)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return tarball


def ensure_standin_image(docker=None, tag: str = STANDIN_IMAGE, mirror: str | None = None,
                         packages: list[str] | None = None) -> str:
    """Import the stand-in base as ``tag`` unless the daemon already has it; return the tag."""
    if docker is None:
        from .docker import daemon_client
        docker = daemon_client()
    info = docker.inspect(tag)
    if info is not None:
        from .docker import labels_of
        _mirror_note(labels_of(info).get(MIRROR_LABEL), mirror, f"the image {tag}")
        return tag
    tarball = rootfs_tarball(mirror=mirror, packages=packages)
    record = tarball.with_suffix(".mirror")
    made_from = record.read_text().strip() if record.is_file() else ""
    with open(tarball, "rb") as fh:
        proc = docker.run("import", "--change", "CMD [\"/bin/bash\"]", "--change", f"LABEL {MIRROR_LABEL}={made_from}",
                          "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                          "-", tag, stdin=fh, check=False)
    if proc.returncode != 0:
        raise KtlegacyError(f"docker import of the stand-in base failed: {proc.stderr.decode(errors='replace').strip()[-200:]}")
    return tag


def _rootfs_args(p) -> None:
    p.add_argument("--tag", default=STANDIN_IMAGE, help=f"image tag (default {STANDIN_IMAGE})")
    p.add_argument("--mirror", default=None, help=f"Debian mirror for debootstrap (default {MIRROR})")
    p.add_argument("--runtime", action="store_true",
                   help=f"the runtime base's lean root file system ({', '.join(RUNTIME_PACKAGES)} only; tag "
                        f"{RUNTIME_IMAGE} unless --tag)")


@command("debian-rootfs", "debootstrap a Debian bookworm root file system and docker import it (no registry)",
         _rootfs_args)
def rootfs_command(args) -> int:
    tag = RUNTIME_IMAGE if args.runtime and args.tag == STANDIN_IMAGE else args.tag
    print(ensure_standin_image(None, tag, args.mirror, RUNTIME_PACKAGES if args.runtime else None))
    return 0
