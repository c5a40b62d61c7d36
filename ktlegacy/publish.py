"""``invoke publish``: push the images ``invoke build`` made to any registry, all tags or none.

For every local image under the tag scheme of :mod:`ktlegacy.images`
(``<repository>:<ref>-cu118-<arch>-<cpu>``), filtered by ``--arch/--cpu-instruct/--ref``:

1. check its labels say what its tag says (arch, ref, CPU set, CUDA, overlay digest, revision);
2. stream ``docker save`` of it, compress each layer (gzip, deterministic: same layer, same
   digest) and upload the blobs, then the image manifest *by digest*: nothing is visible under
   any tag yet, and a failure here leaves no tag at all;
3. read what each target tag points at now, then put the manifest under every tag
   (``<ref>-cu118-<arch>-<cpu>``, the same with ``-g<sha7>``, and ``latest-<arch>-<cpu>`` with
   ``--moving``); if one of them fails, the tags already moved are put back (tags that existed
   get their old manifest again, new ones are deleted), so no partial tag set is left behind.

The Registry API has no multi-tag transaction: if the registry dies *during* step 3 the
rollback cannot reach it either; the error then names the tags left behind.
Nothing here runs the image or needs a GPU. Login stays with ``docker login``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import images
from .arch import Arch, arches_for
from .errors import KtlegacyError
from .source import CACHE_DIR
from .registry import MANIFEST_V2, RegistryClient, RegistryUnreachable, Target, parse_target

CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
GZIP_LEVEL = 6       # what docker push uses
_CHUNK = 1 << 20
LABEL_STANDIN = "io.ktlegacy.standin"  # set by images/Dockerfile for no-CUDA test builds
_SMALL = 4 << 20     # archive members below this are read into memory (metadata, tiny layers)


@dataclass
class LocalImage:
    tag: str           # local name:tag
    ref: str
    arch: Arch
    cpu: str           # upper case, as images.CPU_INSTRUCTS
    image_id: str
    labels: dict


@dataclass
class PublishPlan:
    image: LocalImage
    repository: str    # reference users pull: host[/namespace]/name
    tags: list[str]


@dataclass
class PushResult:
    plan: PublishPlan
    digest: str
    uploaded: int = 0
    reused: int = 0
    tags: list[str] = field(default_factory=list)


def short_sha(sha: str) -> str:
    sha = (sha or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{7,40}", sha):
        raise KtlegacyError(f"--sha {sha!r} is not a git commit hash (7 to 40 hex digits)")
    return sha[:7]


def publish_tags(image: LocalImage, sha: str, moving: bool) -> list[str]:
    """The tags one image gets in the registry (images.py's scheme)."""
    suffix = images.tag_suffix(image.ref, image.arch, image.cpu)
    tags = [suffix, f"{suffix}-g{short_sha(sha)}"]
    if moving:
        tags.append(f"latest-{image.arch.name}-{image.cpu.lower()}")
    return tags


_TAG = re.compile(r"^(?P<ref>.+)-" + re.escape(images.CUDA_TAG) + r"-(?P<arch>sm[0-9]+)-(?P<cpu>[a-z0-9]+)$")


def local_images(docker, repository: str = images.DEFAULT_REPOSITORY, arch: str = "all",
                 cpus: list[str] | None = None, ref: str | None = None) -> list[LocalImage]:
    """Images the local daemon holds under the tag scheme, filtered; refuse if there are none."""
    arches = {a.name: a for a in arches_for(arch)}
    wanted_cpus = {images.cpu_instruct(c) for c in cpus} if cpus else None
    proc = docker.run("images", repository, "--format", "{{.Tag}}")
    found = []
    for tag in sorted(set(proc.stdout.decode().split())):
        m = _TAG.match(tag)
        if not m or m["arch"] not in arches or m["cpu"].upper() not in images.CPU_INSTRUCTS:
            continue
        if (wanted_cpus and m["cpu"].upper() not in wanted_cpus) or (ref and m["ref"] != ref):
            continue
        found.append((tag, m))
    if not found:
        want = images.image_tag(ref or "<ref>", next(iter(arches.values())),
                                next(iter(wanted_cpus)) if wanted_cpus else images.DEFAULT_CPU_INSTRUCT,
                                repository)
        raise KtlegacyError(f"no image like {want} in the local Docker daemon: build it first "
                            f"(invoke build --arch {arch} --cpu-instruct "
                            f"{next(iter(wanted_cpus)) if wanted_cpus else images.DEFAULT_CPU_INSTRUCT})")
    out = []
    for tag, m in found:
        name = f"{repository}:{tag}"
        info = json.loads(docker.run("image", "inspect", name).stdout)[0]
        out.append(LocalImage(name, m["ref"], arches[m["arch"]], m["cpu"].upper(), info["Id"],
                              (info.get("Config") or {}).get("Labels") or {}))
    return out


def check_labels(image: LocalImage, sha: str | None, allow_standin: bool = False) -> str:
    """Refuse an image whose labels contradict its tag; return the commit sha to tag it with."""
    labels = image.labels
    if labels.get(LABEL_STANDIN) == "true" and not allow_standin:
        raise KtlegacyError(f"{image.tag} is a stand-in build without CUDA ({LABEL_STANDIN}=true), "
                            "made for tests; pass --allow-standin to publish it anyway")

    def need(key: str, expected: str | None, same=lambda a, b: a == b) -> None:
        value = labels.get(key)
        if not value:
            raise KtlegacyError(f"{image.tag} has no label {key}: it was not built by invoke build; "
                                "rebuild it")
        if expected is not None and not same(value, expected):
            raise KtlegacyError(f"{image.tag} is labelled {key}={value} but its tag says {expected}; "
                                "rebuild it or fix its tag")

    need(images.LABEL_ARCH, image.arch.name)
    need(images.LABEL_REF, image.ref)
    need(images.LABEL_CPU, image.cpu, lambda a, b: a.upper() == b)
    need(images.LABEL_OVERLAY_DIGEST, None)
    if labels.get(images.LABEL_CUDA) and labels[images.LABEL_CUDA] != images.CUDA_VERSION:
        raise KtlegacyError(f"{image.tag} is labelled {images.LABEL_CUDA}={labels[images.LABEL_CUDA]} but its "
                            f"tag says {images.CUDA_TAG}; rebuild it")
    revision = (labels.get(images.LABEL_REVISION) or "").strip().lower()
    if sha:
        sha = sha.strip().lower()
        if revision and not (revision.startswith(sha) or sha.startswith(revision)):
            raise KtlegacyError(f"{image.tag} was built from commit {revision[:12]} "
                                f"({images.LABEL_REVISION}), not --sha {sha[:12]}; rebuild it at {sha[:12]}")
        return sha
    if not revision:
        raise KtlegacyError(f"{image.tag} has no {images.LABEL_REVISION} label; pass --sha COMMIT "
                            "(the commit it was built from)")
    return revision


def plan(registry: str, *, docker, arch: str = "all", cpus: list[str] | None = None, ref: str | None = None,
         sha: str | None = None, moving: bool = False, allow_standin: bool = False,
         source_repository: str = images.DEFAULT_REPOSITORY) -> tuple[Target, str, list[PublishPlan]]:
    target = parse_target(registry)
    name = source_repository.rsplit("/", 1)[-1]
    plans = []
    for image in local_images(docker, source_repository, arch, cpus, ref):
        commit = check_labels(image, sha, allow_standin)
        plans.append(PublishPlan(image, target.reference(name), publish_tags(image, commit, moving)))
    return target, name, plans


# --- from the local daemon to registry blobs -----------------------------------------------

@dataclass
class _Blob:
    digest: str
    size: int
    diff_id: str | None   # sha256 of the uncompressed layer


def _gzip_to(src, dst) -> tuple[str, int, str]:
    """Compress a tar stream into ``dst`` (deterministic header); return (digest, size, diff_id)."""
    raw_hash, out_hash = hashlib.sha256(), hashlib.sha256()

    class _Hashing:
        size = 0

        def write(self, data):
            out_hash.update(data)
            _Hashing.size += len(data)
            return dst.write(data)

        def flush(self):
            dst.flush()

    with gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=_Hashing(), mtime=0) as gz:
        while chunk := src.read(_CHUNK):
            raw_hash.update(chunk)
            gz.write(chunk)
    return "sha256:" + out_hash.hexdigest(), _Hashing.size, "sha256:" + raw_hash.hexdigest()


def _copy_gzipped(head: bytes, src, dst) -> tuple[str, int, str]:
    """A layer that is gzip already (containerd image store): keep it, hash both forms."""
    out_hash, raw_hash, size = hashlib.sha256(), hashlib.sha256(), 0
    inflate = zlib.decompressobj(31)
    chunk = head
    while chunk:
        out_hash.update(chunk)
        size += len(chunk)
        dst.write(chunk)
        data = chunk
        while data:
            raw_hash.update(inflate.decompress(data))
            data = inflate.unused_data
            if data:  # a multi-member gzip stream
                inflate = zlib.decompressobj(31)
        chunk = src.read(_CHUNK)
    return "sha256:" + out_hash.hexdigest(), size, "sha256:" + raw_hash.hexdigest()


def push_blobs(docker, image: LocalImage, client: RegistryClient,
               log: Callable[[str], None] = lambda s: None) -> tuple[bytes, int, int]:
    """Stream ``docker save`` into the registry; return (manifest bytes, uploaded, reused).

    Large members are layers: compressed into a temporary file and uploaded while the archive
    streams on, so the disk holds one compressed layer at a time. Small members (metadata,
    and small layers) stay in memory until manifest.json says which is which.
    """
    proc = subprocess.Popen(docker.cmd("save", image.image_id), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    blobs: dict[str, _Blob] = {}
    small: dict[str, bytes] = {}
    links: dict[str, str] = {}
    counts = {"uploaded": 0, "reused": 0}
    cache = _LayerCache()

    def store(src, head: bytes) -> _Blob:
        with tempfile.TemporaryFile() as tmp:
            if head == b"\x1f\x8b":
                digest, size, diff_id = _copy_gzipped(head, src, tmp)
            else:
                digest, size, diff_id = _gzip_to(_Prefixed(head, src), tmp)
            if client.has_blob(digest):
                counts["reused"] += 1
            else:
                log(f"  uploading layer {digest[:19]} ({size / 1e6:.1f} MB)")
                client.upload_blob(digest, tmp, size)
                counts["uploaded"] += 1
        return _Blob(digest, size, diff_id)

    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.issym() or member.islnk():
                    base = posixpath.dirname(member.name) if member.issym() else ""
                    links[member.name] = posixpath.normpath(posixpath.join(base, member.linkname))
                elif member.isfile() and member.size < _SMALL:
                    small[member.name] = tar.extractfile(member).read()
                elif member.isfile():
                    known = cache.get(member.name, member.size)
                    if known and client.has_blob(known.digest):
                        blobs[member.name] = known  # tarfile skips the unread member
                        counts["reused"] += 1
                        continue
                    src = tar.extractfile(member)
                    blobs[member.name] = cache.put(member.name, member.size, store(src, src.read(2)))
        _, err = proc.communicate()
    except tarfile.TarError as exc:
        proc.kill()
        proc.wait()
        raise KtlegacyError(f"docker save {image.tag} gave an unreadable archive ({exc})") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise KtlegacyError(f"docker save {image.tag} failed: {lines[-1] if lines else proc.returncode}")

    try:
        entry = json.loads(small["manifest.json"])[0]
        config = small[links.get(entry["Config"], entry["Config"])]
        layer_paths = [links.get(p, p) for p in entry["Layers"]]
    except (KeyError, IndexError, ValueError, TypeError):
        raise KtlegacyError(f"docker save {image.tag} gave an archive without a usable manifest.json") from None
    layers = []
    for path in layer_paths:
        if path not in blobs and path in small:
            data = io.BytesIO(small[path])
            blobs[path] = store(data, data.read(2))
        if path not in blobs:
            raise KtlegacyError(f"docker save {image.tag}: layer {path} is missing from the archive")
        layers.append(blobs[path])
    diff_ids = json.loads(config).get("rootfs", {}).get("diff_ids", [])
    if [b.diff_id for b in layers] != diff_ids:
        cache.forget([p for p in layer_paths if p in blobs])
        raise KtlegacyError(f"docker save {image.tag}: the layers do not match the image config's diff_ids; "
                            "the local image store may be damaged")
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    if client.has_blob(config_digest):
        counts["reused"] += 1
    else:
        client.upload_blob(config_digest, config, len(config))
        counts["uploaded"] += 1
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": LAYER_GZIP, "size": b.size, "digest": b.digest} for b in layers],
    }
    cache.save()
    return json.dumps(manifest, indent=3).encode(), counts["uploaded"], counts["reused"]


class _LayerCache:
    """What each archive member compressed to, so publishing again skips the compression.

    ``docker save`` names a layer by content: ``blobs/sha256/<diff_id>`` (OCI layout) or
    ``<v1 id>/layer.tar``, where the v1 id hashes the chain of layer digests below it. The same
    name and size therefore mean the same bytes; the registry must still hold the blob, and the
    diff_ids are still checked against the image config.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or CACHE_DIR / "publish-layers.json"
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def get(self, name: str, size: int) -> _Blob | None:
        entry = self.entries.get(f"{name}:{size}")
        if not entry:
            return None
        return _Blob(entry["digest"], entry["size"], entry["diff_id"])

    def put(self, name: str, size: int, blob: _Blob) -> _Blob:
        self.entries[f"{name}:{size}"] = {"digest": blob.digest, "size": blob.size, "diff_id": blob.diff_id}
        self.dirty = True
        return blob

    def forget(self, names: list[str]) -> None:
        self.entries = {k: v for k, v in self.entries.items() if k.rsplit(":", 1)[0] not in names}
        self.dirty = True
        self.save()

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time


class _Prefixed:
    """A reader that yields ``head`` first, then the rest of ``src``."""

    def __init__(self, head: bytes, src):
        self.head, self.src = head, src

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data, self.head = self.head, b""
            return data + (self.src.read(n - len(data)) if n > len(data) else b"")
        return self.src.read(n)


# --- tags, all or none --------------------------------------------------------------------

def before_tagging(plan: PublishPlan, digest: str) -> None:
    """Called once the manifest is stored by digest and before any tag moves (a seam for tests)."""


def apply_tags(client: RegistryClient, tags: list[str], manifest: bytes, digest: str,
               digest_was_new: bool) -> None:
    """Put ``manifest`` under every tag or, failing that, put every tag back as it was."""
    try:
        previous = {tag: client.get_manifest(tag) for tag in tags}
    except KtlegacyError as exc:
        raise KtlegacyError(f"{str(exc).rstrip('.')}; no tag of {client.where} changed") from None
    touched: list[str] = []
    try:
        for tag in tags:
            touched.append(tag)  # a failed PUT may still have landed: undo it too
            client.put_manifest(tag, manifest, MANIFEST_V2)
    except KtlegacyError as exc:
        left = _roll_back(client, touched, previous, digest, digest_was_new)
        cause = str(exc).rstrip(".")
        if not left:
            raise KtlegacyError(f"{cause}; rolled back, no tag of {client.where} changed") from None
        raise KtlegacyError(f"{cause}; could not roll back, so tags {', '.join(left)} of {client.where} may "
                            f"point at {digest[:19]}: re-run publish or delete them") from None


def _roll_back(client: RegistryClient, touched: list[str], previous: dict, digest: str,
               digest_was_new: bool) -> list[str]:
    left = []
    try:
        for tag in touched:
            old = previous.get(tag)
            if old is not None:
                client.put_manifest(tag, old[0], old[1])
            elif not client.delete_manifest(tag):
                left.append(tag)
        # Registries without tag deletion (distribution 2.x) still delete a manifest by digest,
        # untagging it everywhere; safe only for a digest that no tag knew before this run.
        if left and digest_was_new and client.delete_manifest(digest):
            left = []
        return left
    except KtlegacyError:
        return [t for t in touched if not (previous.get(t) and previous[t][2] == digest)]


# --- the command --------------------------------------------------------------------------

def publish(registry: str, *, arch: str = "all", cpus: list[str] | None = None, ref: str | None = None,
            sha: str | None = None, moving: bool = False, dry_run: bool = False, allow_standin: bool = False,
            source_repository: str = images.DEFAULT_REPOSITORY, docker=None,
            out: Callable[[str], None] = print) -> list[PushResult]:
    """Publish every matching local image; all checks pass before the first byte is sent."""
    if docker is None:
        from .docker import client as docker_client
        docker = docker_client()
    target, name, plans = plan(registry, docker=docker, arch=arch, cpus=cpus, ref=ref, sha=sha,
                               moving=moving, allow_standin=allow_standin, source_repository=source_repository)
    if dry_run:
        for p in plans:
            out(f"would push {p.image.tag} ({p.image.image_id[:19]}) to {p.repository} as "
                + ", ".join(p.tags))
        return []
    client = RegistryClient(target, target.repository(name))
    client.ping()
    results = []
    for p in plans:
        out(f"pushing {p.image.tag} to {p.repository}")
        try:
            manifest, uploaded, reused = push_blobs(docker, p.image, client, out)
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            was_new = not client.has_manifest(digest)
            stored = client.put_manifest(digest, manifest, MANIFEST_V2)
            if stored != digest:
                raise KtlegacyError(f"registry {target.host} stored the manifest as {stored}, not {digest}")
        except KtlegacyError as exc:
            done = f" ({len(results)} image(s) before it were published)" if results else ""
            raise KtlegacyError(f"{str(exc).rstrip('.')}; no tag of {client.where} changed{done}") from None
        before_tagging(p, digest)
        apply_tags(client, p.tags, manifest, digest, was_new)
        out(f"pushed {p.repository}@{digest} ({uploaded} blobs uploaded, {reused} already there) "
            f"as {', '.join(p.tags)}")
        results.append(PushResult(p, digest, uploaded, reused, list(p.tags)))
    return results


def _publish_args(p) -> None:
    p.add_argument("--registry", required=True,
                   help="where to push: HOST[:PORT][/NAMESPACE] (ghcr.io/OWNER, harbor.example.com/proj, "
                        "127.0.0.1:5000); the image is pushed as <registry>/ktransformers")
    p.add_argument("--arch", default="all", help="sm70, sm75 or all (default all)")
    p.add_argument("--cpu-instruct", action="append", default=None,
                   help=f"CPU set(s) to publish ({', '.join(images.CPU_INSTRUCTS)}); repeat; default: every one built")
    p.add_argument("--ref", default=None, help="only images of this ktransformers ref (default: every ref built)")
    p.add_argument("--sha", default=None,
                   help="commit the images were built from (default: their org.opencontainers.image.revision label)")
    p.add_argument("--moving", action="store_true", help="also move latest-<arch>-<cpu> (release builds only)")
    p.add_argument("--dry-run", action="store_true", help="check images and print the tags; push nothing")
    p.add_argument("--allow-standin", action="store_true",
                   help="also publish stand-in builds (no CUDA, io.ktlegacy.standin=true): for test registries")
    p.add_argument("--source-repository", default=images.DEFAULT_REPOSITORY,
                   help=f"local repository the images are in (default {images.DEFAULT_REPOSITORY})")


def _register() -> None:
    from .cli import command

    @command("publish", "push built images to a registry: by digest, then all tags or none", _publish_args)
    def run(args) -> int:
        publish(args.registry, arch=args.arch, cpus=args.cpu_instruct, ref=args.ref, sha=args.sha,
                moving=args.moving, dry_run=args.dry_run, allow_standin=args.allow_standin,
                source_repository=args.source_repository)
        return 0


_register()
