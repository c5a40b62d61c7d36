"""``invoke publish``: push the images ``invoke build`` made to any registry with ``docker push``.

What is ours is the checking and the order; the transfer (compression, retries, credentials
from ``docker login``) is dockerd's. For every local image under the tag scheme of
:mod:`ktlegacy.images` (``<repository>:<ref>-<CUDA_TAG>-<arch>-<cpu>``), filtered by
``--arch/--cpu-instruct/--ref``:

1. check its labels say what its tag says (arch, ref, CPU set, CUDA, overlay digest, revision,
   stand-in) - for every selected image before anything is pushed;
2. store every image in the registry under its commit tag ``<ref>-<CUDA_TAG>-<arch>-<cpu>-g<sha7>``
   (one build of one ktlegacy commit: a name no one follows as "the newest"), and note the
   manifest digest the registry stored. ``docker push`` cannot push without a tag; this is its
   push by digest. A failure here has moved no tag anyone follows;
3. only then move the followed tags (``<ref>-<CUDA_TAG>-<arch>-<cpu>``, with ``--moving``
   ``latest-<arch>-<cpu>``) of every image: each a manifest PUT of blobs already there, checked
   to land on the digest of step 2.

A failure in step 3 names the tags already moved. Re-running the same command is safe: it
pushes the same image again (no blob is uploaded twice) and ends with every tag on it. The CI
workflow does steps 2 and 3 with BuildKit (push by digest) and ``docker buildx imagetools
create``; it uses this module for step 1 and the tag list (``--github-output``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import images
from .core import facts
from .core.command import command
from .core.arch import Arch, arches_for
from .docker import labels_of
from .core.errors import KtlegacyError

IMAGE_NAME = "ktransformers"   # the image goes to <registry>/ktransformers


@dataclass
class LocalImage:
    tag: str           # local name:tag
    ref: str
    arch: Arch
    cpu: str           # upper case, as images.CPU_INSTRUCTS
    variant: str       # "" or images.STANDIN_SUFFIX
    image_id: str
    labels: dict


@dataclass
class PublishPlan:
    image: LocalImage
    repository: str    # reference users pull: host[/namespace]/ktransformers
    tags: list[str]    # the commit tag first, then the followed tags

    @property
    def commit_tag(self) -> str:
        return self.tags[0]

    @property
    def followed_tags(self) -> list[str]:
        return self.tags[1:]


@dataclass
class PushResult:
    plan: PublishPlan
    digest: str
    tags: list[str] = field(default_factory=list)


def short_sha(sha: str) -> str:
    dirty = images.DIRTY_SUFFIX
    base = (sha or "").strip().lower().removesuffix(dirty)
    if not re.fullmatch(r"[0-9a-f]{7,40}", base):
        raise KtlegacyError(f"--sha {sha!r} is not a git commit hash (7 to 40 hex digits)")
    return base[:7] + (dirty if sha.strip().lower().endswith(dirty) else "")


def publish_tags(image: LocalImage, sha: str, moving: bool) -> list[str]:
    """The tags one image gets in the registry (images.py's scheme): the commit tag first."""
    suffix = images.tag_suffix(image.ref, image.arch, image.cpu) + image.variant
    tags = [images.commit_tag(suffix, short_sha(sha)), suffix]
    if moving:
        tags.append(images.moving_tag(image.arch, image.cpu, image.variant))
    return tags


_REGISTRY = re.compile(r"^(?P<host>[a-z0-9.-]+(?::[0-9]+)?)(?P<path>(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)$")


def repository_for(registry: str, name: str = IMAGE_NAME) -> str:
    """``--registry HOST[:PORT][/NAMESPACE...]`` -> the repository users pull, or one line saying why not."""
    value = (registry or "").strip().rstrip("/")
    if "://" in value:
        raise KtlegacyError(f"--registry {registry!r}: drop the scheme; dockerd picks HTTPS, or plain HTTP for "
                            "loopback addresses and its insecure-registries (/etc/docker/daemon.json)")
    if value != value.lower():
        raise KtlegacyError(f"--registry {registry!r}: registries want lower case (e.g. ghcr.io/{value.split('/')[-1].lower()})")
    host = value.split("/")[0]
    # without a dot, a port or "localhost", docker would read the first part as a Docker Hub namespace
    if not _REGISTRY.match(value) or not ("." in host or ":" in host or host == "localhost"):
        raise KtlegacyError(f"--registry {registry!r} is not HOST[:PORT][/NAMESPACE] (e.g. ghcr.io/OWNER, "
                            "harbor.example.com/project, 127.0.0.1:5000)")
    return f"{value}/{name}"


def local_images(docker, repository: str = images.DEFAULT_REPOSITORY, arch: str = "all",
                 cpus: list[str] | None = None, ref: str | None = None) -> list[LocalImage]:
    """Images the local daemon holds under the tag scheme, filtered; refuse if there are none."""
    arches = {a.name: a for a in arches_for(arch)}
    wanted_cpus = {images.cpu_instruct(c) for c in cpus} if cpus else None
    found = []
    for tag in docker.tags(repository):
        parts = images.parse_tag(tag)
        if parts is None or parts.arch not in arches:
            continue
        if (wanted_cpus and parts.cpu not in wanted_cpus) or (ref and parts.ref != ref):
            continue
        found.append((tag, parts))
    if not found:
        cpu = sorted(wanted_cpus)[0] if wanted_cpus else images.DEFAULT_CPU_INSTRUCT
        want = images.image_tag(ref or "<ref>", next(iter(arches.values())), cpu, repository)
        raise KtlegacyError(f"no image like {want} in the local Docker daemon: build it first "
                            f"(invoke build --arch {arch} --cpu-instruct {cpu}"
                            + (f" --ref {ref})" if ref else ")"))
    out = []
    for tag, parts in found:
        name = f"{repository}:{tag}"
        info = docker.inspect(name)
        if info is None:
            raise KtlegacyError(f"{name} disappeared from the local Docker daemon while publishing; run again")
        out.append(LocalImage(name, parts.ref, arches[parts.arch], parts.cpu,
                              images.STANDIN_SUFFIX if parts.standin else "",
                              info["Id"], labels_of(info)))
    return out


def check_labels(image: LocalImage, sha: str | None, allow_standin: bool = False,
                 allow_dirty: bool = False) -> str:
    """Refuse an image whose labels contradict its tag; return the commit to tag it with."""
    labels, dirty = image.labels, images.DIRTY_SUFFIX
    standin = labels.get(images.LABEL_STANDIN) == "true"
    if standin != (image.variant == images.STANDIN_SUFFIX):
        raise KtlegacyError(f"{image.tag} is labelled {images.LABEL_STANDIN}={labels.get(images.LABEL_STANDIN, '(none)')} "
                            f"but its tag {'says' if image.variant else 'does not say'} {images.STANDIN_SUFFIX}; "
                            "rebuild it with invoke build")
    if standin and not allow_standin:
        raise KtlegacyError(f"{image.tag} is a stand-in build without CUDA ({images.LABEL_STANDIN}=true), "
                            "made for tests; pass --allow-standin to publish it anyway")
    if labels.get(images.LABEL_CI_TORCH):
        raise KtlegacyError(f"{image.tag} was built by CI with PyPI's torch {labels[images.LABEL_CI_TORCH]} standing in "
                            f"for the pin ({images.LABEL_CI_TORCH}); it is never published: build it with "
                            "invoke build, which installs the pin")

    if image.cpu == "NATIVE":
        raise KtlegacyError(f"{image.tag} was built with --cpu-instruct NATIVE, which bakes in the build machine's CPU; "
                            "it is for local use only: publish AVX2, AVX512 or FANCY images")

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
    if revision.endswith(dirty) and not allow_dirty:
        raise KtlegacyError(f"{image.tag} was built from uncommitted changes ({images.LABEL_REVISION}="
                            f"{revision[:12]}...{dirty}); commit and rebuild, or pass --allow-dirty")
    if sha:
        sha = sha.strip().lower()
        base = revision.removesuffix(dirty)
        if base and not (base.startswith(sha) or sha.startswith(base)):
            raise KtlegacyError(f"{image.tag} was built from commit {base[:12]} "
                                f"({images.LABEL_REVISION}), not --sha {sha[:12]}; rebuild it at {sha[:12]}")
        return sha + (dirty if revision.endswith(dirty) else "")
    if not revision:
        raise KtlegacyError(f"{image.tag} has no {images.LABEL_REVISION} label; pass --sha COMMIT "
                            "(the commit it was built from)")
    return revision


def plan(registry: str, *, docker, arch: str = "all", cpus: list[str] | None = None, ref: str | None = None,
         sha: str | None = None, moving: bool = False, allow_standin: bool = False, allow_dirty: bool = False,
         source_repository: str = images.DEFAULT_REPOSITORY) -> list[PublishPlan]:
    """Every check that needs no registry: which images, their labels, their tags."""
    repository = repository_for(registry)
    plans = []
    for image in local_images(docker, source_repository, arch, cpus, ref):
        commit = check_labels(image, sha, allow_standin, allow_dirty)
        plans.append(PublishPlan(image, repository, publish_tags(image, commit, moving)))
    return plans


def ci_build_args(ref: str, arch: str, cpu: str) -> dict:
    """The build args ``invoke build --arch A --cpu-instruct C --ref R`` passes (ktlegacy/build.py's
    plan): the workflow's push by digest rebuilds with them from the warm cache, then checks
    that the pushed image has the smoke-tested layers and labels."""
    from .build import BuildRequest, plan as build_plan
    (build,) = build_plan(BuildRequest(arch, ref=ref, cpu_instruct=cpu, dry_run=True))
    return dict(build.build_args)


def github_output(plans: list[PublishPlan], path: Path) -> None:
    """What the CI workflow needs of one checked image, appended to ``$GITHUB_OUTPUT``: the local
    image and its id, the repository, the tags (bare, and as docker/metadata-action input), the
    build args of its CUDA build."""
    if len(plans) != 1:
        raise KtlegacyError(f"--github-output describes one image, but {len(plans)} match: narrow with --arch, "
                            "--cpu-instruct and --ref")
    (p,) = plans
    lines = [f"image={p.image.tag}", f"image-id={p.image.image_id}", f"repository={p.repository}",
             "tags<<KTLEGACY_EOF", *p.tags, "KTLEGACY_EOF",
             "metadata-tags<<KTLEGACY_EOF", *(f"type=raw,value={t}" for t in p.tags), "KTLEGACY_EOF",
             "build-args<<KTLEGACY_EOF",
             *(f"{k}={v}" for k, v in ci_build_args(p.image.ref, p.image.arch.name, p.image.cpu).items()),
             "KTLEGACY_EOF"]
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")


def _push(docker, image: LocalImage, repository: str, tag: str) -> str:
    """Tag the checked image (by id, so a tag moved since the check cannot slip in) and push it."""
    reference = f"{repository}:{tag}"
    docker.run("tag", image.image_id, reference)
    try:
        return docker.push(reference)
    finally:
        docker.run("rmi", reference, check=False)   # only the local name we added; the image stays


def publish(registry: str, *, arch: str = "all", cpus: list[str] | None = None, ref: str | None = None,
            sha: str | None = None, moving: bool = False, dry_run: bool = False, allow_standin: bool = False,
            allow_dirty: bool = False, source_repository: str = images.DEFAULT_REPOSITORY,
            github_output_path: str | Path | None = None, docker=None,
            out: Callable[[str], None] = print) -> list[PushResult]:
    """Publish every matching local image: all checks first, every image stored under its commit
    tag before the first followed tag moves, each tag checked to land on that digest."""
    if docker is None:
        from .docker import daemon_client
        docker = daemon_client()
    plans = plan(registry, docker=docker, arch=arch, cpus=cpus, ref=ref, sha=sha, moving=moving,
                 allow_standin=allow_standin, allow_dirty=allow_dirty, source_repository=source_repository)
    if github_output_path:
        github_output(plans, Path(github_output_path))
    if dry_run:
        for p in plans:
            out(f"would push {p.image.tag} ({p.image.image_id[:19]}) to {p.repository} as " + ", ".join(p.tags))
        return []

    stored: list[tuple[PublishPlan, str]] = []
    for p in plans:
        out(f"pushing {p.image.tag} to {p.repository}:{p.commit_tag}")
        try:
            stored.append((p, _push(docker, p.image, p.repository, p.commit_tag)))
        except KtlegacyError as exc:
            done = ", ".join(f"{s.repository}:{s.commit_tag}" for s, _ in stored)
            raise KtlegacyError(f"{str(exc).rstrip('.')}; no followed tag moved"
                                + (f" (stored so far: {done})" if done else "")
                                + "; fix that and run the same publish again") from None

    moved: list[str] = []
    for p, digest in stored:
        for tag in p.followed_tags:
            try:
                landed = _push(docker, p.image, p.repository, tag)
            except KtlegacyError as exc:
                left = [f"{q.repository}:{t}" for q, _ in stored for t in q.followed_tags
                        if f"{q.repository}:{t}" not in moved]
                raise KtlegacyError(f"{str(exc).rstrip('.')}; moved so far: {', '.join(moved) or 'none'}; "
                                    f"not moved: {', '.join(left)}; run the same publish again to finish "
                                    "(safe: it only moves these tags to the same images)") from None
            if landed != digest:
                raise KtlegacyError(f"{p.repository}:{tag} landed on {landed}, not on {digest} that "
                                    f"{p.commit_tag} holds; the registry re-compressed a layer: run the same "
                                    "publish again")
            moved.append(f"{p.repository}:{tag}")

    results = []
    for p, digest in stored:
        out(f"pushed {p.repository}@{digest} as {', '.join(p.tags)}")
        results.append(PushResult(p, digest, list(p.tags)))
    return results


def _publish_args(p) -> None:
    p.add_argument("--registry", required=True,
                   help="where to push: HOST[:PORT][/NAMESPACE] (ghcr.io/OWNER, harbor.example.com/proj, "
                        "127.0.0.1:5000); the image is pushed as <registry>/ktransformers")
    p.add_argument("--arch", default="all", help=f"{facts.arch_choice('all')} (default all)")
    p.add_argument("--cpu-instruct", action="append", default=None,
                   help=f"CPU set to publish ({', '.join(images.CPU_INSTRUCTS)}); repeat for several; "
                        "default: every one built")
    p.add_argument("--ref", default=None, help="only images of this ktransformers ref (default: every ref built)")
    p.add_argument("--sha", default=None,
                   help="commit the images were built from (default: their org.opencontainers.image.revision label)")
    p.add_argument("--moving", action="store_true",
                   help="also move latest-<arch>-<cpu> (for release builds from version tags)")
    p.add_argument("--dry-run", action="store_true", help="check the images' labels and print the tags; push nothing")
    p.add_argument("--allow-standin", action="store_true",
                   help=f"also publish stand-in builds (no CUDA, {images.LABEL_STANDIN}=true): for test registries")
    p.add_argument("--allow-dirty", action="store_true",
                   help="also publish images built from uncommitted changes (revision label <sha>-dirty)")
    p.add_argument("--source-repository", default=images.DEFAULT_REPOSITORY,
                   help=f"local repository holding the images (default {images.DEFAULT_REPOSITORY})")
    p.add_argument("--github-output", default=None,
                   help="CI: append the one checked image, its repository and tags to this file ($GITHUB_OUTPUT)")


@command("publish", "docker push built images: commit tag first, then the followed tags "
         "(login stays with `docker login`)", _publish_args)
def publish_command(args) -> int:
    publish(args.registry, arch=args.arch, cpus=args.cpu_instruct, ref=args.ref, sha=args.sha,
            moving=args.moving, dry_run=args.dry_run, allow_standin=args.allow_standin,
            allow_dirty=args.allow_dirty, source_repository=args.source_repository,
            github_output_path=args.github_output)
    return 0
