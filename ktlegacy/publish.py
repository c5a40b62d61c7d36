"""``invoke publish``: push the images ``invoke build`` made to any registry, all tags or none.

For every local image under the tag scheme of :mod:`ktlegacy.images`
(``<repository>:<ref>-cu118-<arch>-<cpu>``), filtered by ``--arch/--cpu-instruct/--ref``:

1. check its labels say what its tag says (arch, ref, CPU set, CUDA, overlay digest, revision);
2. stream ``docker save`` of it, compress each layer (gzip, deterministic: same layer, same
   digest) and upload the blobs, then the image manifest *by digest*: nothing is visible under
   any tag yet, and a failure here leaves no tag at all;
3. once every selected image is stored so, read what each target tag points at now, then put
   each manifest under all its tags (``<ref>-cu118-<arch>-<cpu>``, the same with ``-g<sha7>``,
   and ``latest-<arch>-<cpu>`` with ``--moving``); if one PUT fails, every tag already moved is
   put back (tags that existed get their old manifest again, new ones are deleted), so no
   partial tag set is left behind, for one image or for several.

The Registry API has no multi-tag transaction: if the registry dies *during* step 3 the
rollback cannot reach it either; the error then names the tags left behind.
Nothing here runs the image or needs a GPU. Login stays with ``docker login``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
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
from .registry import MANIFEST_V2, RegistryClient, Target, parse_target
from .source import CACHE_DIR

CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
GZIP_LEVEL = 6       # what docker push uses
_GZIP_CHUNK = 16 << 20                           # one gzip member per 16 MiB of layer
_GZIP_THREADS = max(1, min(4, os.cpu_count() or 1))
_CHUNK = 1 << 20
LABEL_STANDIN = "io.ktlegacy.standin"  # set by images/Dockerfile for no-CUDA test builds
_SMALL = 4 << 20     # archive members below this are read into memory (metadata, tiny layers)


STANDIN_SUFFIX = "-standin"   # ktlegacy/build.py tags stand-in (no CUDA) test builds so
DIRTY_SUFFIX = "-dirty"       # ktlegacy/build.py's revision label for a tree with uncommitted changes


@dataclass
class LocalImage:
    tag: str           # local name:tag
    ref: str
    arch: Arch
    cpu: str           # upper case, as images.CPU_INSTRUCTS
    variant: str       # "" or STANDIN_SUFFIX
    image_id: str
    labels: dict
    diff_ids: list = field(default_factory=list)   # RootFS.Layers of docker image inspect


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
    base = (sha or "").strip().lower().removesuffix(DIRTY_SUFFIX)
    if not re.fullmatch(r"[0-9a-f]{7,40}", base):
        raise KtlegacyError(f"--sha {sha!r} is not a git commit hash (7 to 40 hex digits)")
    return base[:7] + (DIRTY_SUFFIX if sha.strip().lower().endswith(DIRTY_SUFFIX) else "")


def publish_tags(image: LocalImage, sha: str, moving: bool) -> list[str]:
    """The tags one image gets in the registry (images.py's scheme)."""
    suffix = images.tag_suffix(image.ref, image.arch, image.cpu) + image.variant
    tags = [suffix, f"{suffix}-g{short_sha(sha)}"]
    if moving:
        tags.append(f"latest-{image.arch.name}-{image.cpu.lower()}{image.variant}")
    return tags


_TAG = re.compile(r"^(?P<ref>.+)-" + re.escape(images.CUDA_TAG)
                  + r"-(?P<arch>sm[0-9]+)-(?P<cpu>[a-z0-9]+)(?P<variant>" + re.escape(STANDIN_SUFFIX) + ")?$")


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
        cpu = sorted(wanted_cpus)[0] if wanted_cpus else images.DEFAULT_CPU_INSTRUCT
        want = images.image_tag(ref or "<ref>", next(iter(arches.values())), cpu, repository)
        raise KtlegacyError(f"no image like {want} in the local Docker daemon: build it first "
                            f"(invoke build --arch {arch} --cpu-instruct {cpu}"
                            + (f" --ref {ref})" if ref else ")"))
    out = []
    for tag, m in found:
        name = f"{repository}:{tag}"
        info = json.loads(docker.run("image", "inspect", name).stdout)[0]
        out.append(LocalImage(name, m["ref"], arches[m["arch"]], m["cpu"].upper(), m["variant"] or "",
                              info["Id"], (info.get("Config") or {}).get("Labels") or {},
                              list((info.get("RootFS") or {}).get("Layers") or [])))
    return out


def check_labels(image: LocalImage, sha: str | None, allow_standin: bool = False,
                 allow_dirty: bool = False) -> str:
    """Refuse an image whose labels contradict its tag; return the commit to tag it with."""
    labels = image.labels
    standin = labels.get(LABEL_STANDIN) == "true"
    if standin != (image.variant == STANDIN_SUFFIX):
        raise KtlegacyError(f"{image.tag} is labelled {LABEL_STANDIN}={labels.get(LABEL_STANDIN, '(none)')} but "
                            f"its tag {'says' if image.variant else 'does not say'} {STANDIN_SUFFIX}; rebuild it "
                            "with invoke build")
    if standin and not allow_standin:
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
    need(images.LABEL_CUDA, images.CUDA_VERSION)
    need(images.LABEL_OVERLAY_DIGEST, None)
    revision = (labels.get(images.LABEL_REVISION) or "").strip().lower()
    if revision.endswith(DIRTY_SUFFIX) and not allow_dirty:
        raise KtlegacyError(f"{image.tag} was built from uncommitted changes ({images.LABEL_REVISION}="
                            f"{revision[:12]}...{DIRTY_SUFFIX}); commit and rebuild, or pass --allow-dirty")
    if sha:
        sha = sha.strip().lower()
        base = revision.removesuffix(DIRTY_SUFFIX)
        if base and not (base.startswith(sha) or sha.startswith(base)):
            raise KtlegacyError(f"{image.tag} was built from commit {base[:12]} "
                                f"({images.LABEL_REVISION}), not --sha {sha[:12]}; rebuild it at {sha[:12]}")
        return sha + (DIRTY_SUFFIX if revision.endswith(DIRTY_SUFFIX) else "")
    if not revision:
        raise KtlegacyError(f"{image.tag} has no {images.LABEL_REVISION} label; pass --sha COMMIT "
                            "(the commit it was built from)")
    return revision


def plan(registry: str, *, docker, arch: str = "all", cpus: list[str] | None = None, ref: str | None = None,
         sha: str | None = None, moving: bool = False, allow_standin: bool = False, allow_dirty: bool = False,
         source_repository: str = images.DEFAULT_REPOSITORY) -> tuple[Target, str, list[PublishPlan]]:
    """Every check that needs no registry: which images, their labels, their tags."""
    target = parse_target(registry)
    name = source_repository.rsplit("/", 1)[-1]
    plans = []
    for image in local_images(docker, source_repository, arch, cpus, ref):
        commit = check_labels(image, sha, allow_standin, allow_dirty)
        plans.append(PublishPlan(image, target.reference(name), publish_tags(image, commit, moving)))
    return target, name, plans


# --- from the local daemon to registry blobs -----------------------------------------------

@dataclass
class _Blob:
    digest: str
    size: int
    diff_id: str | None   # sha256 of the uncompressed layer


def _gzip_member(data: bytes) -> bytes:
    # mtime=0, no file name: the same bytes always give the same member
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def _gzip_to(src, dst) -> tuple[str, int, str]:
    """Compress a tar stream into ``dst``; return (digest, size, diff_id).

    pigz-style: fixed-size chunks compressed in parallel (zlib releases the GIL), each a gzip
    member; a multi-member stream is one valid gzip file (RFC 1952), which docker, containerd
    and every registry client read. Fixed chunks keep it deterministic: same layer, same digest.
    """
    raw_hash, out_hash = hashlib.sha256(), hashlib.sha256()
    size = 0
    pending: collections.deque = collections.deque()

    def emit(future) -> None:
        nonlocal size
        data = future.result()
        out_hash.update(data)
        dst.write(data)
        size += len(data)

    with concurrent.futures.ThreadPoolExecutor(max_workers=_GZIP_THREADS) as pool:
        first = True
        while True:
            chunk = src.read(_GZIP_CHUNK)
            if not chunk and not first:
                break
            first = False
            raw_hash.update(chunk)
            pending.append(pool.submit(_gzip_member, chunk))
            while len(pending) > 2 * _GZIP_THREADS:
                emit(pending.popleft())
            if not chunk:
                break
        while pending:
            emit(pending.popleft())
    return "sha256:" + out_hash.hexdigest(), size, "sha256:" + raw_hash.hexdigest()


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
            if inflate.eof:  # a multi-member gzip stream: the next member starts here
                inflate = zlib.decompressobj(31)
            raw_hash.update(inflate.decompress(data))
            data = inflate.unused_data
        chunk = src.read(_CHUNK)
    return "sha256:" + out_hash.hexdigest(), size, "sha256:" + raw_hash.hexdigest()


class _Archive:
    """One pass over ``docker save IMAGE``: small members in memory, large ones handed to a callback."""

    def __init__(self, docker, image: LocalImage):
        self.docker, self.image = docker, image
        self.small: dict[str, bytes] = {}
        self.links: dict[str, str] = {}

    def scan(self, on_large: Callable[[str, object], None] | None = None) -> None:
        proc = subprocess.Popen(self.docker.cmd("save", self.image.image_id), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.issym() or member.islnk():
                        base = posixpath.dirname(member.name) if member.issym() else ""
                        self.links[member.name] = posixpath.normpath(posixpath.join(base, member.linkname))
                    elif member.isfile() and member.size < _SMALL:
                        self.small[member.name] = tar.extractfile(member).read()
                    elif member.isfile() and on_large is not None:
                        on_large(member.name, tar.extractfile(member))
                    # else: skipped unread (tarfile reads past it)
            _, err = proc.communicate()
        except tarfile.TarError as exc:
            proc.kill()
            proc.wait()
            raise KtlegacyError(f"docker save {self.image.tag} gave an unreadable archive ({exc})") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            raise KtlegacyError(f"docker save {self.image.tag} failed: {lines[-1] if lines else proc.returncode}")

    def layout(self) -> tuple[bytes, list[str], list[str]]:
        """(config bytes, layer paths bottom-up, their diff_ids) from manifest.json and the config."""
        try:
            entry = json.loads(self.small["manifest.json"])[0]
            config = self.small[self.links.get(entry["Config"], entry["Config"])]
            paths = [self.links.get(p, p) for p in entry["Layers"]]
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KtlegacyError(f"docker save {self.image.tag} gave an archive without a usable "
                                "manifest.json or image config") from None
        if len(paths) != len(diff_ids):
            raise KtlegacyError(f"docker save {self.image.tag}: {len(paths)} layers but {len(diff_ids)} diff_ids "
                                "in the image config; the local image store may be damaged")
        return config, paths, diff_ids


def push_blobs(docker, image: LocalImage, client: RegistryClient,
               log: Callable[[str], None] = lambda s: None) -> tuple[bytes, int, int]:
    """Put the image's config and layers into the registry; return (manifest bytes, uploaded, reused).

    When the local cache (diff_id -> our gzip blob: content-addressed) knows none of the image's
    layers, one pass over ``docker save`` compresses and uploads each layer as it streams by, one
    temporary file at a time. Otherwise pass 1 reads only manifest.json and the config; layers
    whose blob the registry holds (or the blob store has) are not read again, and pass 2, only
    if needed, compresses the rest. Every layer is checked to hash to its diff_id.
    """
    archive = _Archive(docker, image)
    cache, store = _LayerCache(), _blob_store()
    counts = {"uploaded": 0, "reused": 0}
    layers: dict[str, _Blob] = {}
    missing: dict[str, str | None] = {}  # path -> expected diff_id (None: not known yet)

    uploader = _Uploader(client, log, counts)

    def compress(path: str, src, expected: str | None) -> None:
        head = src.read(2)
        tmp = tempfile.TemporaryFile() if store is None else store.new()
        handed_over = False
        try:
            with _removed_on_error(tmp):
                if head == b"\x1f\x8b":  # containerd image store: the layer is gzip already
                    digest, size, diff_id = _copy_gzipped(head, src, tmp)
                else:
                    digest, size, diff_id = _gzip_to(_Prefixed(head, src), tmp)
                if expected is not None and diff_id != expected:
                    raise KtlegacyError(f"docker save {image.tag}: layer {path} hashes to {diff_id[:19]}, not "
                                        f"{expected[:19]} as the image config says; the local image store may be "
                                        "damaged")
                blob = cache.put(_Blob(digest, size, diff_id))
                if store is not None:
                    store.keep(tmp, digest)
            if client.has_blob(digest):
                counts["reused"] += 1
            else:
                uploader.submit(blob, tmp)  # uploads while the next layer compresses; closes tmp
                handed_over = True
        finally:
            if not handed_over:
                tmp.close()
        layers[path] = blob

    try:
        if not any(cache.get(d) for d in image.diff_ids):
            # nothing to reuse (first publish of these layers): one pass, every layer compressed as it
            # streams by; the diff_ids are checked against the config afterwards
            archive.scan(lambda name, src: compress(name, src, None))
            config, paths, diff_ids = archive.layout()
            for path, diff_id in zip(paths, diff_ids):
                if path not in layers and path in archive.small:
                    compress(path, io.BytesIO(archive.small[path]), diff_id)
                if path not in layers:
                    raise KtlegacyError(f"docker save {image.tag}: layer {path} is missing from the archive")
                if layers[path].diff_id != diff_id:
                    raise KtlegacyError(f"docker save {image.tag}: layer {path} hashes to {layers[path].diff_id[:19]}, "
                                        f"not {diff_id[:19]} as the image config says; the local image store may be damaged")
        else:
            archive.scan()
            config, paths, diff_ids = archive.layout()
        for path, diff_id in zip(paths, diff_ids):
            if path in layers or path in missing:
                continue
            known = cache.get(diff_id)
            if known and client.has_blob(known.digest):
                layers[path] = known
                counts["reused"] += 1
            elif known and store is not None and store.has(known.digest):
                uploader.submit(known, open(store.path(known.digest), "rb"))
                layers[path] = known
            elif path in archive.small:  # tiny layer, already in memory
                compress(path, io.BytesIO(archive.small[path]), diff_id)
            else:
                missing[path] = diff_id
        if missing:
            archive.scan(lambda name, src: compress(name, src, missing[name]) if name in missing else None)
            absent = [p for p in missing if p not in layers]
            if absent:
                raise KtlegacyError(f"docker save {image.tag}: layer {absent[0]} is missing from the archive")
        uploader.wait()  # the last upload, and any upload error
    finally:
        uploader.shutdown()
    cache.save()

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
        "layers": [{"mediaType": LAYER_GZIP, "size": layers[p].size, "digest": layers[p].digest} for p in paths],
    }
    return json.dumps(manifest, indent=3).encode(), counts["uploaded"], counts["reused"]


class _Uploader:
    """One blob uploads in a background thread while the next layer compresses: at most one in
    flight, so the disk holds at most two compressed layers. Takes ownership of the file."""

    def __init__(self, client: RegistryClient, log: Callable[[str], None], counts: dict):
        self.client, self.log, self.counts = client, log, counts
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktlegacy-upload")
        self.inflight: concurrent.futures.Future | None = None

    def submit(self, blob: _Blob, fh) -> None:
        try:
            self.wait()
        except BaseException:
            fh.close()
            raise
        self.inflight = self.pool.submit(self._upload, blob, fh)

    def _upload(self, blob: _Blob, fh) -> None:
        try:
            fh.seek(0)
            self.log(f"  uploading layer {blob.digest[:19]} ({blob.size / 1e6:.1f} MB)")
            self.client.upload_blob(blob.digest, fh, blob.size)
            self.counts["uploaded"] += 1
        finally:
            fh.close()

    def wait(self) -> None:
        """Wait for the upload in flight; raise its error."""
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.result()

    def shutdown(self) -> None:
        """On every path out: let the upload in flight end (its error, if any, was or is moot)."""
        if self.inflight is not None:
            concurrent.futures.wait([self.inflight])
            self.inflight = None
        self.pool.shutdown(wait=True)


class _LayerCache:
    """diff_id -> the gzip blob we made of it (digest, size): publishing again skips compressing
    layers the registry already holds. Content-addressed, so it cannot go stale; a cache that
    cannot be read or written only costs time."""

    def __init__(self, path: Path | None = None):
        self.path = path or CACHE_DIR / "publish-layers.json"
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def get(self, diff_id: str) -> _Blob | None:
        entry = self.entries.get(diff_id)
        return _Blob(entry["digest"], entry["size"], diff_id) if entry else None

    def put(self, blob: _Blob) -> _Blob:
        self.entries[blob.diff_id] = {"digest": blob.digest, "size": blob.size}
        self.dirty = True
        return blob

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass


class _BlobStore:
    """Compressed layers kept on disk (``KTLEGACY_BLOB_STORE=DIR``), for pushing one image to several
    registries without compressing it again. Off by default: it holds the whole compressed image."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def new(self):
        return tempfile.NamedTemporaryFile(dir=self.root, prefix=".incoming-", delete=False)

    def keep(self, tmp, digest: str) -> None:
        tmp.flush()
        os.replace(tmp.name, self.path(digest))
        # the open handle still reads the same file; it is closed by the caller's with-block


@contextlib.contextmanager
def _removed_on_error(tmp):
    """A blob-store file that did not make it (bad hash, upload failed) is not left behind."""
    try:
        yield
    except BaseException:
        name = getattr(tmp, "name", None)
        if isinstance(name, str) and os.path.basename(name).startswith(".incoming-"):
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise


def _blob_store() -> _BlobStore | None:
    root = os.environ.get("KTLEGACY_BLOB_STORE")
    return _BlobStore(Path(root)) if root else None


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

@dataclass
class _Stored:
    """An image whose blobs and manifest are in the registry by digest, not yet tagged."""
    plan: PublishPlan
    manifest: bytes
    digest: str
    was_new: bool      # no manifest with this digest was there before this run
    uploaded: int
    reused: int


def before_tagging(plan: PublishPlan, digest: str) -> None:
    """Called for each image once every image is stored by digest, before any tag moves (a seam for tests)."""


def apply_tags(client: RegistryClient, stored: list[_Stored]) -> None:
    """Put each manifest under all its tags or, failing that, put every tag back as it was."""
    try:
        previous = {tag: client.get_manifest(tag) for s in stored for tag in s.plan.tags}
    except KtlegacyError as exc:
        raise KtlegacyError(f"{str(exc).rstrip('.')}; no tag of {client.where} changed") from None
    touched: list[tuple[_Stored, str]] = []
    try:
        for s in stored:
            for tag in s.plan.tags:
                touched.append((s, tag))  # a failed PUT may still have landed: undo it too
                client.put_manifest(tag, s.manifest, MANIFEST_V2)
    except KtlegacyError as exc:
        left = _roll_back(client, touched, previous)
        cause = str(exc).rstrip(".")
        if not left:
            raise KtlegacyError(f"{cause}; rolled back, no tag of {client.where} changed") from None
        raise KtlegacyError(f"{cause}; could not roll back, so tags {', '.join(left)} of {client.where} may "
                            "be left on the new image: re-run publish, or delete them") from None


def _roll_back(client: RegistryClient, touched: list[tuple[_Stored, str]], previous: dict) -> list[str]:
    """Undo the tags; return those that may still point at a new manifest."""
    left: list[tuple[_Stored, str]] = []
    try:
        for s, tag in touched:
            old = previous.get(tag)
            if old is not None:
                client.put_manifest(tag, old[0], old[1])
            elif not client.delete_manifest(tag):
                left.append((s, tag))
        # Registries without tag deletion (distribution 2.x) still delete a manifest by digest,
        # which untags it everywhere: safe only for a digest that nothing pointed at before this run.
        for s in {id(s): s for s, _ in left}.values():
            if s.was_new and client.delete_manifest(s.digest):
                left = [(t_s, t) for t_s, t in left if t_s is not s]
        return [t for _, t in left]
    except KtlegacyError:
        return [t for s, t in touched if not (previous.get(t) and previous[t][2] == s.digest)]


# --- the command --------------------------------------------------------------------------

def publish(registry: str, *, arch: str = "all", cpus: list[str] | None = None, ref: str | None = None,
            sha: str | None = None, moving: bool = False, dry_run: bool = False, allow_standin: bool = False,
            allow_dirty: bool = False, source_repository: str = images.DEFAULT_REPOSITORY, docker=None,
            out: Callable[[str], None] = print) -> list[PushResult]:
    """Publish every matching local image: all checks before the first byte is sent, every image
    stored by digest before the first tag moves, then all tags of all images or none."""
    if docker is None:
        from .docker import client as docker_client
        docker = docker_client()
    target, name, plans = plan(registry, docker=docker, arch=arch, cpus=cpus, ref=ref, sha=sha,
                               moving=moving, allow_standin=allow_standin, allow_dirty=allow_dirty,
                               source_repository=source_repository)
    if dry_run:
        for p in plans:
            out(f"would push {p.image.tag} ({p.image.image_id[:19]}) to {p.repository} as "
                + ", ".join(p.tags))
        return []
    client = RegistryClient(target, target.repository(name))
    client.ping()
    stored: list[_Stored] = []
    try:
        for p in plans:
            out(f"pushing {p.image.tag} to {p.repository}")
            manifest, uploaded, reused = push_blobs(docker, p.image, client, out)
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            was_new = not client.has_manifest(digest)
            reported = client.put_manifest(digest, manifest, MANIFEST_V2)
            if reported != digest:
                raise KtlegacyError(f"registry {target.host} stored the manifest as {reported}, not {digest}")
            stored.append(_Stored(p, manifest, digest, was_new, uploaded, reused))
    except KtlegacyError as exc:
        raise KtlegacyError(f"{str(exc).rstrip('.')}; no tag of {client.where} changed") from None
    for s in stored:
        before_tagging(s.plan, s.digest)
    apply_tags(client, stored)
    results = []
    for s in stored:
        out(f"pushed {s.plan.repository}@{s.digest} ({s.uploaded} blobs uploaded, {s.reused} already there) "
            f"as {', '.join(s.plan.tags)}")
        results.append(PushResult(s.plan, s.digest, s.uploaded, s.reused, list(s.plan.tags)))
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
    p.add_argument("--allow-dirty", action="store_true",
                   help="also publish images built from uncommitted changes (revision label <sha>-dirty)")
    p.add_argument("--source-repository", default=images.DEFAULT_REPOSITORY,
                   help=f"local repository the images are in (default {images.DEFAULT_REPOSITORY})")


def _register() -> None:
    from .cli import command

    @command("publish", "push built images to a registry: by digest, then all tags or none", _publish_args)
    def run(args) -> int:
        publish(args.registry, arch=args.arch, cpus=args.cpu_instruct, ref=args.ref, sha=args.sha,
                moving=args.moving, dry_run=args.dry_run, allow_standin=args.allow_standin,
                allow_dirty=args.allow_dirty,
                source_repository=args.source_repository)
        return 0


_register()
