"""``invoke build`` / ``python -m ktlegacy build``: the CUDA 11.8 images, one per arch.

:class:`BuildRequest` holds everything a build is asked for, once: its fields with help are the
command's flags (``--arch``, ``--ref``, ...), made into one request from the parsed arguments, and
:meth:`BuildRequest.build_args` maps it onto the Dockerfile's ARGs. :func:`plan` turns a request
into the exact docker commands (checked inputs, build args, the BuildKit secret, the wheelhouse
image); :func:`build` prints or runs them. All input errors
are raised before anything runs, so a bad flag never leaves a half-built image behind:
an arch not in the table (ktlegacy/core/facts.py), an unknown ref, a missing CA bundle or wheelhouse, no Docker
daemon, a daemon without BuildKit.

The image's labels are computed here, before the build, and checked inside it: the overlay
digest of the overlays that apply to (ref, arch) and the upstream commit (git refs, resolved
with ``git ls-remote``) or sdist sha256 (sdist refs) go in as build args; the source stage
refuses a tree that does not carry the same values (images/scripts/check_source.py).

:func:`smoke` runs ``tests/smoke`` inside a built image (``--gpus all`` when the daemon has the
NVIDIA runtime) after checking its labels against what was asked.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import images, preflight
from .core import facts
from .core.arch import Arch, arches_for, get_arch
from .core.command import command
from .core.errors import KtlegacyError
from .core.refs import DEFAULT_REF, REFS, UPSTREAM_GIT_URL, Ref, get_ref

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "images" / "Dockerfile"
WHEELHOUSE_DOCKERFILE = REPO_ROOT / "images" / "wheelhouse.Dockerfile"
DEBIAN_DOCKERFILE = REPO_ROOT / "images" / "debian-cuda.Dockerfile"
# --debian-bases: the CUDA 11.8 devel/runtime bases made from a Debian mirror (debootstrap, then
# Debian bookworm's non-free nvidia-cuda-toolkit 11.8), tagged <repository>:11.8-devel / -runtime.
DEBIAN_BASE_REPOSITORY = "ktlegacy-debian-cuda"

# The bases and the torch pin (why 2.5.1: ktlegacy/core/facts.py, docs/torch-pin.md).
DEFAULT_BASE_IMAGE = facts.BASE_IMAGE
DEFAULT_RUNTIME_IMAGE = facts.RUNTIME_IMAGE
DEFAULT_TORCH_VERSION = facts.TORCH_VERSION
DEFAULT_TORCH_INDEX_URL = facts.TORCH_INDEX_URL
DEFAULT_MAX_JOBS = 4

# Labels for what only a build knows (the keys: ktlegacy/core/facts.py).
LABEL_EXTENSIONS = facts.LABEL_EXTENSIONS     # "build" or "skip" (stand-in: nothing compiled)
LABEL_STANDIN = facts.LABEL_STANDIN           # "true" only on the no-CUDA stand-in test build

CA_SECRET_ID = "ca_cert"


def dockerfile_stages(dockerfile: Path = DOCKERFILE) -> list[str]:
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", dockerfile.read_text(), flags=re.M | re.I)


@dataclass
class Step:
    """One docker invocation: argv, and whether it needs the BuildKit environment. A step with
    ``call`` is not docker: ``argv`` is the equivalent command line (printed), ``call(client)``
    runs it in-process."""
    argv: list[str]
    buildkit: bool = False
    what: str = ""
    call: object = None

    def shell(self, prefix: str) -> str:
        return (prefix if self.buildkit else "") + shlex.join(self.argv)


@dataclass
class Plan:
    arch: Arch
    tag: str
    build_args: dict
    labels: dict             # label key -> value the image must carry
    steps: list[Step] = field(default_factory=list)


def _flag(default, help: str, **argparse_options):
    """A BuildRequest field that is also a flag of ``build`` (its help, and argparse options)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass(frozen=True)
class BuildRequest:
    """One build, as asked: the ``build`` command's flags (the fields with help, in --help order)
    and the library's own knobs (the rest: tests and CI set them).

    It resolves its ref, arch(es) and CPU set once, at construction (:attr:`upstream`, :attr:`arches`,
    :attr:`cpu`): a bad ``--arch``, ``--ref`` or ``--cpu-instruct`` is refused there, in one line, and
    everything below (:func:`plan`, the digest, the commit, the tags and labels) takes these."""
    arch: str = field(metadata={"help": facts.arch_choice("all", cards=True), "required": True})
    ref: str = _flag(DEFAULT_REF, f"upstream ref: {', '.join(REFS)} (default {DEFAULT_REF})")
    cpu_instruct: str = _flag(images.DEFAULT_CPU_INSTRUCT,
                              "AVX2 (portable default), AVX512, FANCY or NATIVE (NATIVE: local builds only)")
    tag: str | None = _flag(None, "image tag, one arch only (default: the tag scheme, e.g. "
                                  f"{images.image_tag(DEFAULT_REF, get_arch('sm75'))})")
    base_image: str | None = _flag(None, f"build base with nvcc (default {DEFAULT_BASE_IMAGE})")
    runtime_image: str | None = _flag(None, f"runtime base (default {DEFAULT_RUNTIME_IMAGE})")
    torch_version: str | None = _flag(None, f"torch pin (default {DEFAULT_TORCH_VERSION}: its Triton fits "
                                            f"{'/'.join(facts.ARCHES)}, see docs/torch-pin.md)")
    torch_index_url: str | None = _flag(None, f"torch wheel index (default {DEFAULT_TORCH_INDEX_URL})")
    pip_index_url: str | None = _flag(None, "PyPI mirror for everything else")
    apt_mirror: str | None = _flag(None, "Ubuntu/Debian mirror for the base images' packages")
    ca_cert: str | Path | None = _flag(None, "CA bundle of a TLS-intercepting proxy: a BuildKit secret, in no layer")
    wheelhouse: str | Path | None = _flag(None, "directory of wheels (+ the ktransformers sdist): pip installs "
                                                "only from it")
    offline: bool = _flag(False, "with --wheelhouse: build with --network none")
    cache_from: str | None = _flag(None, "BuildKit layer cache source, e.g. type=registry,ref=REG/cache:sm75")
    cache_to: str | None = _flag(None, "BuildKit layer cache export (needs buildx), e.g. "
                                       "type=registry,ref=REG/cache:sm75,mode=max")
    debian_bases: bool = _flag(False, "make the CUDA 11.8 devel/runtime bases from a Debian mirror (debootstrap + "
                                      "Debian's nvidia-cuda-toolkit 11.8; needs root and debootstrap) instead of "
                                      "pulling nvidia/cuda")
    target: str = _flag("runtime", "Dockerfile stage to build (default runtime)")
    max_jobs: int | None = _flag(None, f"parallel compile jobs (default {DEFAULT_MAX_JOBS})", type=int)
    standin: bool = _flag(False, "tests only: a base without CUDA; nothing compiled, labelled "
                                 f"{facts.LABEL_STANDIN}=true")
    triton_version: str | None = _flag(None, "tests only, with --standin: install this Triton so the kernels "
                                             "check runs")
    # gone: it pushed without publish's label and arch checks; kept as a flag to say so
    push: bool = _flag(False, "removed: push with `publish`, which checks each image's labels and arch first")
    dry_run: bool = _flag(False, "print the exact docker commands and run nothing")
    # not flags: where the tags go, and what tests and CI change
    repository: str = images.DEFAULT_REPOSITORY
    debian_base_repository: str = DEBIAN_BASE_REPOSITORY
    # CI's real-CUDA lanes: PyPI's torch of this version stands in for the pin (KTLEGACY_CI_TORCH)
    ci_torch: str | None = None
    extra_build_flags: tuple = ()
    # resolved in __post_init__ from ref, arch and cpu_instruct: not flags, not compared
    upstream: Ref = field(init=False, repr=False, compare=False)     # the table's entry for ``ref``
    arches: tuple = field(init=False, repr=False, compare=False)      # the Arch of each build (``all``: every one)
    cpu: str = field(init=False, repr=False, compare=False)          # the CPU set as the table spells it

    def __post_init__(self) -> None:
        if self.push:   # named before any other flag is looked at
            raise KtlegacyError("build --push is removed: build, then `invoke publish --registry REG` checks the "
                                "images' labels and arch and pushes them (docs/publishing.md)")
        object.__setattr__(self, "arches", tuple(arches_for(self.arch)))
        object.__setattr__(self, "upstream", get_ref(self.ref))
        object.__setattr__(self, "cpu", images.cpu_instruct(self.cpu_instruct))

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The ``build`` command's flags: one per field with help."""
        for f in fields(BuildRequest):
            if "help" not in f.metadata:
                continue
            options = dict(f.metadata)
            if isinstance(f.default, bool):
                options["action"] = "store_true"
            elif not options.get("required"):
                options["default"] = f.default
            p.add_argument("--" + f.name.replace("_", "-"), **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BuildRequest":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if "help" in f.metadata})

    def build_args(self, arch: Arch, *, commit: str, digest: str, revision: str,
                   wheelhouse_image: str | None = None, bases: tuple[str, str] | None = None) -> dict:
        """The Dockerfile's ARGs for one arch of this request: the one place they are named.
        ``bases``: (build base, runtime base) made by the plan (--debian-bases)."""
        from . import __version__
        base_image, runtime_image = bases or (self.base_image, self.runtime_image)
        args = {
            "BASE_IMAGE": base_image or DEFAULT_BASE_IMAGE,
            # the stand-in base serves as its own runtime base unless told otherwise
            "RUNTIME_IMAGE": runtime_image or (base_image if self.standin and base_image
                                               else DEFAULT_RUNTIME_IMAGE),
            "TORCH_VERSION": self.torch_version or DEFAULT_TORCH_VERSION,
            "TORCH_INDEX_URL": self.torch_index_url or DEFAULT_TORCH_INDEX_URL,
            "KTRANSFORMERS_REF": self.upstream.name,
            "KTRANSFORMERS_COMMIT": commit,
            "OVERLAY_DIGEST": digest,
            "ARCH": arch.name,
            "TORCH_CUDA_ARCH_LIST": arch.torch_cuda_arch_list,
            "CPU_INSTRUCT": self.cpu,
            "MAX_JOBS": str(self.max_jobs or DEFAULT_MAX_JOBS),
            "KTLEGACY_VERSION": __version__,
            "KTLEGACY_REVISION": revision,
        }
        if self.pip_index_url:
            args["PIP_INDEX_URL"] = self.pip_index_url
        if self.apt_mirror:
            args["APT_MIRROR"] = self.apt_mirror
        if self.triton_version:
            args["TRITON_VERSION"] = self.triton_version
        if self.ci_torch:
            args["KTLEGACY_CI_TORCH"] = self.ci_torch
        if self.standin:
            args["KTLEGACY_EXTENSIONS"] = "skip"
            args["KTLEGACY_STANDIN"] = "true"
        if wheelhouse_image:
            args["WHEELHOUSE_IMAGE"] = wheelhouse_image
        return args


def overlay_digest(ref: Ref, arch: Arch) -> str:
    """The digest ``patch`` will write for (ref, arch): the same files in the same way
    (ktlegacy.core.overlay.patch_tree), computed without a tree."""
    from .core.overlay import digest, load_overlays
    files = []
    for overlay, path in load_overlays():
        if overlay.applies_to(ref):
            files.append(path)
            files.extend(getattr(overlay, "shipped_files", lambda: [])())
    return digest(files, arch, ref)


def resolve_commit(ref: Ref, dry_run: bool = False) -> str:
    """sdist refs: ``sdist-sha256:<hash>``; git refs: the commit the tag points at."""
    if ref.kind == "sdist":
        return f"sdist-sha256:{ref.sha256}"
    try:
        proc = subprocess.run(["git", "ls-remote", UPSTREAM_GIT_URL, f"refs/tags/{ref.name}^{{}}",
                               f"refs/tags/{ref.name}"], capture_output=True, text=True, timeout=60)
        lines = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()]
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc, lines = None, []
        err = str(exc)
    else:
        err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    peeled = [sha for sha, name in lines if name.endswith("^{}")]
    if peeled or lines:
        return (peeled or [lines[0][0]])[0]
    if dry_run:
        return ""
    raise KtlegacyError(f"cannot resolve {ref.name} at {UPSTREAM_GIT_URL} ({err}); the build fetches it "
                        f"from there too: check the network, or build the sdist ref {DEFAULT_REF}")


def _revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ktlegacy", "overlays", "images",
                                "tests/smoke"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + (facts.DIRTY_SUFFIX if dirty else "")
    except OSError:
        return ""


def _wheelhouse_tag(wheelhouse: Path) -> str:
    """A tag naming the wheelhouse's content (file names, sizes, mtimes), so a changed
    wheelhouse is a new image and an unchanged one is reused."""
    h = hashlib.sha256()
    for path in sorted(p for p in wheelhouse.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(wheelhouse)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return f"ktlegacy-wheelhouse:{h.hexdigest()[:16]}"


def check_wheelhouse(wheelhouse: Path, ref: Ref) -> Path:
    wheelhouse = Path(wheelhouse).resolve()
    if not wheelhouse.is_dir():
        raise KtlegacyError(f"wheelhouse {wheelhouse} does not exist; create it with pip download -d DIR ... "
                            "or drop --wheelhouse")
    if not any(wheelhouse.glob("*.whl")):
        raise KtlegacyError(f"wheelhouse {wheelhouse} holds no .whl file; fill it with pip download -d {wheelhouse} ...")
    if ref.kind == "sdist" and not (wheelhouse / ref.filename).is_file():
        raise KtlegacyError(f"wheelhouse {wheelhouse} lacks {ref.filename}: a --wheelhouse build has no network, "
                            f"copy it there (python -m ktlegacy fetch-source caches it in ~/.cache/ktlegacy)")
    return wheelhouse


def plan(request: BuildRequest) -> list[Plan]:
    """Validate every input of ``request`` and return the docker steps for each arch; runs nothing.
    The ref, arches and CPU set were resolved when the request was made."""
    r = request
    arches, ref, cpu = r.arches, r.upstream, r.cpu
    if r.tag and len(arches) > 1:
        raise KtlegacyError("--tag names one image; with --arch all the tags follow the scheme "
                            f"({images.image_tag(ref.name, arches[0], cpu, r.repository)}, ...)")
    stages = dockerfile_stages()
    if r.target not in stages:
        raise KtlegacyError(f"unknown --target {r.target!r}: stages are {', '.join(stages)}")
    secret = None
    if r.ca_cert is not None:
        secret = Path(r.ca_cert).resolve()
        if not secret.is_file() or secret.stat().st_size == 0:
            raise KtlegacyError(f"--ca-cert {r.ca_cert}: no such file (or empty); pass your proxy's CA bundle, "
                                "e.g. /etc/ssl/certs/ca-certificates.crt")
    wheelhouse = None
    if r.wheelhouse is not None:
        wheelhouse = check_wheelhouse(Path(r.wheelhouse), ref)
    if r.max_jobs is not None and r.max_jobs < 1:
        raise KtlegacyError(f"--max-jobs {r.max_jobs}: give the number of parallel compile jobs, 1 or more "
                            f"(default {DEFAULT_MAX_JOBS})")
    if r.torch_version and not r.ci_torch:
        preflight.check_torch_cuda(r.torch_version, standin=r.standin)
    if r.triton_version and not r.standin:
        raise KtlegacyError("--triton-version is for stand-in builds (CPU torch); a CUDA build gets the "
                            "Triton its torch requires: change --torch-version instead")
    if r.offline and wheelhouse is None:
        raise KtlegacyError("an offline build (--network none) needs --wheelhouse DIR with every package")
    base_steps, bases = [], None
    if r.debian_bases:
        if r.base_image or r.runtime_image:
            raise KtlegacyError("--debian-bases makes the base images itself: drop --base-image/--runtime-image")
        if r.standin:
            raise KtlegacyError("--debian-bases makes real CUDA 11.8 bases; --standin is the no-CUDA test base: pick one")
        devel, runtime, base_steps = debian_base_steps(r.apt_mirror, secret, r.debian_base_repository)
        bases = (devel, runtime)

    commit = resolve_commit(ref, dry_run=r.dry_run)
    from . import __version__
    revision = _revision()
    plans = []
    for a in arches:
        digest = overlay_digest(ref, a)
        image = r.tag or images.image_tag(ref.name, a, cpu, r.repository) + (facts.STANDIN_SUFFIX if r.standin else "")
        if r.target != "runtime" and not r.tag:
            image += f"-{r.target}"
        steps = list(base_steps) if a is arches[0] else []
        wh_tag = None
        if wheelhouse is not None:
            wh_tag = _wheelhouse_tag(wheelhouse)
            steps.append(Step(["docker", "build", "--progress", "plain", "-f", str(WHEELHOUSE_DOCKERFILE),
                               "-t", wh_tag, str(wheelhouse)], buildkit=True, what="wheelhouse image"))
        args = r.build_args(a, commit=commit, digest=digest, revision=revision, wheelhouse_image=wh_tag,
                            bases=bases)
        labels = {
            images.LABEL_REF: ref.name, images.LABEL_COMMIT: commit, images.LABEL_OVERLAY_DIGEST: digest,
            images.LABEL_ARCH: a.name, images.LABEL_CUDA: images.CUDA_VERSION,
            images.LABEL_TORCH: args["TORCH_VERSION"], images.LABEL_CPU: cpu,
            images.LABEL_VERSION: __version__, images.LABEL_REVISION: revision,
            LABEL_EXTENSIONS: "skip" if r.standin else "build", LABEL_STANDIN: "true" if r.standin else "false",
            facts.LABEL_CI_TORCH: r.ci_torch or "",
        }
        if r.ci_torch:
            labels[images.LABEL_TORCH] = r.ci_torch
        argv = ["docker", "build", "--progress", "plain", "-f", str(DOCKERFILE), "--target", r.target]
        for k, v in args.items():
            argv += ["--build-arg", f"{k}={v}"]
        if secret is not None:
            argv += ["--secret", f"id={CA_SECRET_ID},src={secret}"]
        if r.offline:
            argv += ["--network", "none"]
        # BuildKit layer cache, e.g. type=registry,ref=REG/cache:sm75 (CI keeps the compile stage
        # there); --cache-to needs buildx, checked in build() once the client is known.
        if r.cache_from:
            argv += ["--cache-from", r.cache_from]
        if r.cache_to:
            argv += ["--cache-to", r.cache_to]
        argv += list(r.extra_build_flags)
        argv += ["-t", image, str(REPO_ROOT)]
        steps.append(Step(argv, buildkit=True, what=f"{a.name} {r.target}"))
        plans.append(Plan(arch=a, tag=image, build_args=args, labels=labels, steps=steps))
    return plans


def debian_base_steps(apt_mirror: str | None, secret: Path | None,
                      repository: str = DEBIAN_BASE_REPOSITORY) -> tuple[str, str, list[Step]]:
    """(devel tag, runtime tag, steps) for the CUDA 11.8 bases made from a Debian mirror: a
    debootstrapped bookworm root file system, then images/debian-cuda.Dockerfile's two stages."""
    from .standin import MIRROR, RUNTIME_IMAGE, RUNTIME_PACKAGES, STANDIN_IMAGE, ensure_standin_image
    devel, runtime = f"{repository}:{facts.CUDA_VERSION}-devel", f"{repository}:{facts.CUDA_VERSION}-runtime"
    mirror = ["--mirror", apt_mirror or MIRROR]
    steps = [Step(["python", "-m", "ktlegacy", "debian-rootfs", "--tag", STANDIN_IMAGE, *mirror],
                  what="Debian bookworm root file system (debootstrap)",
                  call=lambda client: ensure_standin_image(client, STANDIN_IMAGE, apt_mirror)),
             # the runtime base starts from a lean one: no git, perl or pip in the image users pull
             Step(["python", "-m", "ktlegacy", "debian-rootfs", "--runtime", "--tag", RUNTIME_IMAGE, *mirror],
                  what="lean Debian bookworm root file system for the runtime base (debootstrap)",
                  call=lambda client: ensure_standin_image(client, RUNTIME_IMAGE, apt_mirror, RUNTIME_PACKAGES))]
    for stage, tag, rootfs in (("devel", devel, STANDIN_IMAGE), ("runtime", runtime, RUNTIME_IMAGE)):
        argv = ["docker", "build", "--progress", "plain", "-f", str(DEBIAN_DOCKERFILE), "--target", stage,
                "--build-arg", f"ROOTFS_IMAGE={rootfs}"]
        if apt_mirror:
            argv += ["--build-arg", f"APT_MIRROR={apt_mirror}"]
        if secret is not None:
            argv += ["--secret", f"id={CA_SECRET_ID},src={secret}"]
        argv += ["-t", tag, str(REPO_ROOT)]
        steps.append(Step(argv, buildkit=True, what=f"Debian CUDA 11.8 {stage} base"))
    return devel, runtime, steps


def _client_argv(client, step: Step) -> list[str]:
    argv = list(step.argv)
    if step.call is not None:
        return argv
    if argv[:2] == ["docker", "build"] and client.buildx:
        return client.build_cmd(*argv[2:])
    return client.cmd(*argv[1:])


def printable(plans: list[Plan], client=None) -> list[str]:
    """The commands exactly as a shell would run them (with the client's real path/prefix)."""
    from .docker import DockerClient
    client = client or DockerClient("docker", buildx=False)
    return [Step(_client_argv(client, s), s.buildkit).shell(client.shell_prefix()) for p in plans for s in p.steps]


@dataclass
class BuildResult:
    tags: list[str]
    logs: dict            # tag -> combined build output


def build(request: BuildRequest, *, out=print, echo: bool = True) -> BuildResult:
    """Plan, then print (``request.dry_run``) or run every step; return the tags built and their logs."""
    from .docker import DockerClient, build_client, client as docker_client
    plans = plan(request)
    wheel = preflight.torch_wheel(request)
    if request.dry_run:
        if wheel is not None:
            print(f"note: the image installs {wheel.describe()} (a build checks first that it is there; "
                  "--torch-index-url or --wheelhouse DIR change where from)", file=sys.stderr)
        try:
            client = build_client()   # the client that would build, found with or without a daemon
        except KtlegacyError as exc:
            print(f"note: {exc}; printing the commands for a Debian docker.io client", file=sys.stderr)
            client = DockerClient("docker", buildx=False)
        for line in printable(plans, client):
            out(line)
        return BuildResult([p.tag for p in plans], {})
    client = docker_client()
    if request.cache_to and not client.buildx:
        raise KtlegacyError(f"--cache-to exports the layer cache, which needs docker buildx; {client.path} has "
                            "BuildKit without buildx: install the buildx plugin or drop --cache-to")
    if wheel is not None:  # before anything runs: the pin must be there for the image's Python
        found = preflight.check_torch_wheel(wheel, Path(request.ca_cert).resolve() if request.ca_cert else None)
        out(f"torch: {wheel.describe()}: {found}")
    logs = {}
    for p in plans:
        chunks = []
        for step in p.steps:
            argv = _client_argv(client, step)
            out(f"$ {Step(argv, step.buildkit).shell(client.shell_prefix())}")
            if step.call is not None:
                step.call(client)
                continue
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=client.build_env() if step.buildkit else None,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
            for line in proc.stdout:
                chunks.append(line)
                if echo:
                    sys.stdout.write(line)
            if proc.wait() != 0:
                error = KtlegacyError(f"{step.what} for {p.tag} failed (exit {proc.returncode}): "
                                      f"{_failure_line(chunks)}{_failure_hint(chunks)}")
                error.log = "".join(chunks)  # for callers that did not echo it (tests)
                raise error
        logs[p.tag] = "".join(chunks)
        out(f"built {p.tag}")
    return BuildResult([p.tag for p in plans], logs)


def _failure_line(lines: list[str]) -> str:
    """The most useful line of a failed build log: our scripts' 'error: ...', else apt's 'E: ...',
    else a Python exception, else the last line."""
    # "#12 3.4 error: ..." is a line our scripts printed (BuildKit prefixes step and time)
    for pattern in (r"^(?:#\d+ [\d.]+ )?(smoke FAIL .+)$", r"^(?:#\d+ [\d.]+ )?error: (.+)$", r"^(?:#\d+ [\d.]+ )?E: (.+)$",
                    r"^#\d+ [\d.]+ (\w+(?:Error|Exception): .+)$", r"\bERROR: (.+)$"):
        for line in reversed(lines):
            m = re.search(pattern, line.strip())
            if m and "executor failed" not in line:
                return m.group(1).strip()[:300]
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:300]
    return "(no output)"


def _failure_hint(lines: list[str]) -> str:
    """How to fix the failures users meet most: a base image that cannot be pulled."""
    text = "".join(lines[-60:])
    if "load metadata for" in text and ("failed to do request" in text or "not found" in text
                                        or "pull access denied" in text or "no such host" in text):
        return ("; the base image cannot be pulled from here: pass --debian-bases (CUDA 11.8 bases made from a "
                "Debian mirror), or pull it through a mirror you can reach and pass --base-image/--runtime-image "
                "(see docs/images.md)")
    return ""


# -- smoke ----------------------------------------------------------------------------------------

def has_nvidia_runtime(client) -> bool:
    runtimes, _ = client.runtimes()
    return bool(runtimes and "nvidia" in runtimes)


def smoke(arch: str = "sm75", *, image: str | None = None, ref: str = DEFAULT_REF,
          cpu_instruct: str = images.DEFAULT_CPU_INSTRUCT, gpus: bool | None = None,
          name_prefix: str = "ktlegacy-smoke", out=print) -> int:
    """Check the image's labels against ``arch``, then run tests/smoke inside it; return its exit code."""
    from .docker import client as docker_client
    a = get_arch(arch)
    image = image or images.image_tag(ref, a, cpu_instruct)
    client = docker_client()
    labels = client.labels(image)
    if labels is None:
        how = (f"invoke build --arch {a.name} --cpu-instruct {images.cpu_instruct(cpu_instruct)} --ref {ref}"
               if image == images.image_tag(ref, a, cpu_instruct) else f"invoke build --arch {a.name} --tag {image}")
        raise KtlegacyError(f"image {image} not found; build it first: {how}")
    if labels.get(images.LABEL_ARCH) != a.name:
        raise KtlegacyError(f"image {image} is labelled for arch {labels.get(images.LABEL_ARCH)!r}, not {a.name}")
    if labels.get(images.LABEL_CUDA) != images.CUDA_VERSION:
        raise KtlegacyError(f"image {image} is labelled CUDA {labels.get(images.LABEL_CUDA)!r}, not {images.CUDA_VERSION}")
    if gpus is None:
        gpus = has_nvidia_runtime(client)
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    argv = ["run", "--rm", "--name", name]
    if gpus:
        argv += ["--gpus", "all"]
    argv += [image, "python", "/ktlegacy/smoke/run.py"]
    out(f"$ {shlex.join(client.cmd(*argv))}")
    return client.run(*argv, check=False, capture=False).returncode


# -- command line ---------------------------------------------------------------------------------

@command("build", f"build the CUDA {facts.CUDA_VERSION} ktransformers image for {facts.arch_choice('all')} "
                  "(images/Dockerfile)",
         BuildRequest.add_arguments)
def build_command(args) -> int:
    build(BuildRequest.from_args(args))
    return 0


def _smoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help=f"{facts.arch_choice()}: the arch the image must be labelled with")
    p.add_argument("--image", default=None, help="image to test (default: the tag scheme's image for --arch)")
    p.add_argument("--ref", default=DEFAULT_REF, help=f"upstream ref of the default tag (default {DEFAULT_REF})")
    p.add_argument("--cpu-instruct", default=images.DEFAULT_CPU_INSTRUCT,
                   help=f"CPU set of the default tag (default {images.DEFAULT_CPU_INSTRUCT})")


@command("smoke", "run tests/smoke inside a built image (--gpus all when Docker has the NVIDIA runtime)",
         _smoke_args)
def smoke_command(args) -> int:
    code = smoke(args.arch, image=args.image, ref=args.ref, cpu_instruct=args.cpu_instruct)
    if code:
        print(f"error: smoke tests failed in the image (exit {code})", file=sys.stderr)
    return code
