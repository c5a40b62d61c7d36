"""Invoke tasks: a thin front over the ``ktlegacy`` library (run ``invoke --list``).

Each task parses its flags and calls one library function; errors are the library's
one-line ``KtlegacyError``s, printed as ``error: ...`` with a non-zero exit.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

from invoke import task

from ktlegacy.errors import KtlegacyError


def one_line_errors(fn):
    """Print a KtlegacyError as one line and exit with its code (no traceback).

    Tasks take every argument as a --flag (``positional=[]``); a parameter without a default
    is a required flag, and a missing one is reported here like any other bad input."""
    required = [name for name, p in inspect.signature(fn).parameters.items()
                if p.default is inspect.Parameter.empty and name != "c"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs)
            for name in required:
                if bound.arguments.get(name) is None:
                    raise KtlegacyError(f"--{name.replace('_', '-')} is required (see: invoke {fn.__name__.replace('_', '-')} --help)")
            return fn(*args, **kwargs)
        except KtlegacyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
    return wrapper


@task(positional=[], auto_shortflags=False, help={
    "ref": "supported ref (0.2.1.post1, v0.2.4post1, v0.3.1, v0.3.2) or, with --git-url, any tag/commit",
    "dest": "directory to create with the pristine tree",
    "git-url": "clone this repository instead of the default origin of the ref",
    "local": "copy this local ktransformers tree (a directory or a tar archive of one) instead",
    "index-url": "PyPI simple index for the sdist (a mirror behind a firewall)",
    "force": "replace a non-empty --dest",
})
@one_line_errors
def fetch_source(c, dest, ref=None, git_url=None, local=None, index_url=None, force=False):
    """Get a pristine upstream ktransformers tree (sdist hash-checked, git commit recorded)."""
    from ktlegacy.cli import main
    argv = ["fetch-source", "--dest", dest]
    for flag, value in (("--ref", ref), ("--git-url", git_url), ("--local", local), ("--index-url", index_url)):
        if value:
            argv += [flag, value]
    if force:
        argv.append("--force")
    code = main(argv)
    if code:
        sys.exit(code)


@task(positional=[], auto_shortflags=False, help={
    "src": "upstream tree to patch (from fetch-source)",
    "arch": "sm70 (V100) or sm75 (T4, RTX 2080 Ti)",
    "ref": "force the overlay set of this ref (default: detected from the tree)",
    "check": "say what would change without writing",
})
@one_line_errors
def patch(c, src, arch, ref=None, check=False):
    """Apply the sm70/sm75 overlays to an upstream tree: all or nothing, idempotent."""
    from ktlegacy.arch import get_arch
    from ktlegacy.overlay import patch_tree
    from ktlegacy.refs import get_ref
    patch_tree(Path(src), get_arch(arch), ref=get_ref(ref) if ref else None, check=check)


@task(positional=[], auto_shortflags=False, help={
    "profile": "check one compose profile (v100, t4x4, 2080ti-x2); default: every profile",
    "model-dir": "the model's Hugging Face directory (default: KTLEGACY_MODEL_DIR of compose/.env)",
    "gguf-dir": "the GGUF directory (default: KTLEGACY_GGUF_DIR of compose/.env)",
    "image": "check this image instead of the profile's tag",
    "rules": "rule file to estimate VRAM with (default: the profile's, read from the image)",
    "host-facts": "use host facts recorded by tests/fixtures/hosts/record.sh instead of probing",
})
@one_line_errors
def doctor(c, profile=None, model_dir=None, gguf_dir=None, image=None, rules=None, host_facts=None):
    """Check that this host can serve a compose profile: one table, a fix on each failing row."""
    from ktlegacy.cli import main
    argv = ["doctor"]
    for flag, value in (("--profile", profile), ("--model-dir", model_dir), ("--gguf-dir", gguf_dir),
                        ("--image", image), ("--rules", rules), ("--host-facts", host_facts)):
        if value:
            argv += [flag, value]
    code = main(argv)
    if code:
        sys.exit(code)


@task(positional=[], auto_shortflags=False, help={
    "profile": "compose profile to start: v100, t4x4 or 2080ti-x2",
    "force": "start even if a doctor check fails",
})
@one_line_errors
def up(c, profile, force=False):
    """Run the doctor, then `docker compose --profile P up -d` (refuses on a failing check)."""
    from ktlegacy.up import up as compose_up
    compose_up(profile, force)


@task(positional=[], auto_shortflags=False, iterable=["cpu_instruct"], help={
    "registry": "where to push: HOST[:PORT][/NAMESPACE], e.g. ghcr.io/OWNER; images go to <registry>/ktransformers",
    "arch": "sm70, sm75 or all (default all)",
    "cpu-instruct": "CPU set to publish (AVX2, AVX512, FANCY, NATIVE); repeat for several; default: every one built",
    "ref": "only images of this ktransformers ref (default: every ref built)",
    "sha": "commit the images were built from (default: their org.opencontainers.image.revision label)",
    "moving": "also move latest-<arch>-<cpu> (for release builds from version tags)",
    "dry-run": "check the images' labels and print the tags; push nothing",
    "allow-standin": "also publish stand-in builds (no CUDA, io.ktlegacy.standin=true), for test registries",
    "allow-dirty": "also publish images built from uncommitted changes (revision label <sha>-dirty)",
    "source-repository": "local repository holding the images (default ktlegacy/ktransformers)",
    "github-output": "CI: append the one checked image, its repository and tags to this file ($GITHUB_OUTPUT)",
})
@one_line_errors
def publish(c, registry, arch="all", cpu_instruct=None, ref=None, sha=None, moving=False, dry_run=False,
            allow_standin=False, allow_dirty=False, source_repository=None, github_output=None):
    """docker push built images: commit tag first, then the followed tags. Login stays with `docker login`."""
    from ktlegacy.images import DEFAULT_REPOSITORY
    from ktlegacy.publish import publish as publish_images
    publish_images(registry, arch=arch, cpus=cpu_instruct or None, ref=ref, sha=sha, moving=moving,
                   dry_run=dry_run, allow_standin=allow_standin, allow_dirty=allow_dirty,
                   source_repository=source_repository or DEFAULT_REPOSITORY, github_output_path=github_output)


@task(positional=[], auto_shortflags=False, help={
    "dest": "directory to write the synthetic checkpoint into (model.gguf, config, tokenizer)",
    "preset": "v2 (default: DeepSeek-V2-Lite layout, 6 layers), v3 (DeepSeek-V3 layout, 46 layers) or "
              "v2-lite (DeepSeek-V2-Lite's real dimensions and quant mix, ~9.4 GiB)",
    "layers": "decoder layers: dense first, the rest MoE (default: the preset's)",
    "seed": "seed of the random weights (default 0)",
    "force": "replace a non-empty --dest",
})
@one_line_errors
def make_test_model(c, dest, preset=None, layers=None, seed=None, force=False):
    """Write a synthetic DeepSeek GGUF checkpoint for GPU proofs (same as python -m ktlegacy make-test-model)."""
    from ktlegacy.cli import main
    argv = ["make-test-model", "--dest", dest]
    for flag, value in (("--preset", preset), ("--layers", layers), ("--seed", seed)):
        if value is not None:
            argv += [flag, str(value)]
    if force:
        argv.append("--force")
    code = main(argv)
    if code:
        sys.exit(code)


@task(positional=[], auto_shortflags=False, help={
    "arch": "sm70 (V100), sm75 (T4, RTX 2080 Ti) or all (both)",
    "ref": "upstream ref (default 0.2.1.post1, the PyPI sdist)",
    "cpu-instruct": "AVX2 (portable default), AVX512, FANCY or NATIVE (NATIVE: local builds only)",
    "tag": "image tag, one arch only (default: the tag scheme, e.g. ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-avx2)",
    "base-image": "build base with nvcc (default nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04)",
    "runtime-image": "runtime base (default nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04)",
    "torch-version": "torch pin (default 2.5.1+cu118: its Triton 3.1.0 fits sm70/sm75, see docs/torch-pin.md)",
    "torch-index-url": "torch wheel index (default https://download.pytorch.org/whl/cu118)",
    "pip-index-url": "PyPI mirror for everything else",
    "apt-mirror": "Ubuntu/Debian mirror for the base images' packages",
    "ca-cert": "CA bundle of a TLS-intercepting proxy: a BuildKit secret, in no layer",
    "wheelhouse": "directory of wheels (+ the ktransformers sdist): pip installs only from it",
    "offline": "with --wheelhouse: build with --network none",
    "cache-from": "BuildKit layer cache source, e.g. type=registry,ref=REG/cache:sm75",
    "cache-to": "BuildKit layer cache export (needs buildx), e.g. type=registry,ref=REG/cache:sm75,mode=max",
    "debian-bases": "make the CUDA 11.8 devel/runtime bases from a Debian mirror (debootstrap + Debian's nvidia-cuda-toolkit 11.8; root) instead of pulling nvidia/cuda",
    "target": "Dockerfile stage to build (default runtime)",
    "max-jobs": "parallel compile jobs (default 4)",
    "standin": "tests only: a base without CUDA; nothing compiled, labelled io.ktlegacy.standin=true",
    "push": "docker push each tag after its build",
    "dry-run": "print the exact docker commands and run nothing",
})
@one_line_errors
def build(c, arch=None, ref=None, cpu_instruct=None, tag=None, base_image=None, runtime_image=None,
          torch_version=None, torch_index_url=None, pip_index_url=None, apt_mirror=None, ca_cert=None,
          wheelhouse=None, offline=False, target="runtime", max_jobs=None, standin=False, push=False,
          cache_from=None, cache_to=None, debian_bases=False, dry_run=False):
    """Build the CUDA 11.8 ktransformers image for sm70, sm75 or both (images/Dockerfile)."""
    if not arch:
        raise KtlegacyError("--arch is required: sm70 (V100), sm75 (T4, RTX 2080 Ti) or all")
    from ktlegacy.build import build as build_images
    from ktlegacy.images import DEFAULT_CPU_INSTRUCT
    from ktlegacy.refs import DEFAULT_REF
    build_images(arch, ref=ref or DEFAULT_REF, cpu_instruct=cpu_instruct or DEFAULT_CPU_INSTRUCT, tag=tag,
                 base_image=base_image, runtime_image=runtime_image, torch_version=torch_version,
                 torch_index_url=torch_index_url, pip_index_url=pip_index_url, apt_mirror=apt_mirror,
                 ca_cert=ca_cert, wheelhouse=wheelhouse, offline=offline, target=target,
                 max_jobs=int(max_jobs) if max_jobs else None, standin=standin, push=push,
                 cache_from=cache_from, cache_to=cache_to, debian_bases=debian_bases, dry_run=dry_run)


@task(positional=[], auto_shortflags=False, help={
    "arch": "sm70 or sm75: the arch the image must be labelled with",
    "image": "image to test (default: the tag scheme's image for --arch)",
    "ref": "upstream ref of the default tag",
    "cpu-instruct": "CPU set of the default tag",
})
@one_line_errors
def smoke(c, arch=None, image=None, ref=None, cpu_instruct=None):
    """Run tests/smoke inside a built image (--gpus all when Docker has the NVIDIA runtime)."""
    if not arch:
        raise KtlegacyError("--arch is required: the arch the image was built for (sm70 or sm75)")
    from ktlegacy.build import smoke as run_smoke
    from ktlegacy.images import DEFAULT_CPU_INSTRUCT
    from ktlegacy.refs import DEFAULT_REF
    code = run_smoke(arch, image=image, ref=ref or DEFAULT_REF, cpu_instruct=cpu_instruct or DEFAULT_CPU_INSTRUCT)
    if code:
        raise KtlegacyError(f"smoke tests failed inside the image (exit {code}); see the lines above")


@task(positional=[], auto_shortflags=False, help={
    "src": "patched ktransformers tree (from fetch-source + patch)",
    "arch": "sm70, sm75 or all",
    "python": "interpreter whose Triton compiles the kernels (default: this one; e.g. the image's venv)",
    "json": "also write the results to this file",
})
@one_line_errors
def check_triton(c, src, arch, python=None, json=None):
    """Compile every Triton kernel of a patched tree for sm70/sm75 (no GPU) and check its shared memory."""
    from ktlegacy.arch import arches_for
    from ktlegacy.triton_check import run_check
    run_check(Path(src), arches_for(arch), python=python, json_path=Path(json) if json else None)
