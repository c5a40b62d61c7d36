"""The facts ktlegacy is built on, in one table.

The torch/Triton pin, the CUDA base images and toolkit version, the GPU arches, the upstream refs
and the default one, the CPU instruction sets and the CPU flags each needs, the pieces of the
image tag scheme and the label names. ``ktlegacy.core.arch``, ``ktlegacy.core.refs``, ``ktlegacy.images``,
``ktlegacy.build``, ``ktlegacy.doctor`` and the overlays import them from here (their public names
stay: they are re-exported).

Code that runs without the library loads this file by path: images/scripts/check_cuda_arch.py holds
the one loader (importlib.util.spec_from_file_location), and compile_extensions.py (the compile
stage) and tests/smoke/smokelib.py (the in-image smoke) import FACTS from it; the Dockerfile copies
this file beside check_cuda_arch.py in both stages. The module
the overlays write into the patched tree (overlays/runtime/ktlegacy_runtime.py) gets its values
written in by overlays/10_runtime.py. What cannot load Python at all (the Dockerfiles' ARG defaults
and header, compose, the workflow) is written from here by `python -m ktlegacy.generate --write`;
its --check runs in the tests (docs/architecture.md, "Where each fact lives").

Standard library only and no ktlegacy import, so any script can load this file by path.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- CUDA, torch, Triton -------------------------------------------------------------------------

CUDA_VERSION = "11.8"     # the CUDA toolkit of the images (nvcc, the runtime; the label io.ktlegacy.cuda)
CUDA_TAG = "cu118"        # how torch wheels and our image tags spell it
BASE_IMAGE = "nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04"       # build stages: nvcc
RUNTIME_IMAGE = "nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04"  # the image users run: no compiler
# Why 2.5.1: its Triton (3.1.0) compiles ktransformers' MLA decode kernel for sm70 and sm75 in
# 52,224 B of shared memory; triton 3.2.0 (torch 2.6) aborts on sm70, 3.3.1 (torch 2.7) fails on
# both (docs/torch-pin.md; the image's kernels stage re-checks it on every build).
TORCH_VERSION = "2.5.1+cu118"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu118"
TRITON_VERSION = "3.1.0"  # the Triton TORCH_VERSION requires (its wheel's Requires-Dist)
# The CPython of each base, whose wheel of TORCH_VERSION the build checks for before it starts
# (ktlegacy/preflight.py): Ubuntu 22.04's for BASE_IMAGE, Debian bookworm's for --debian-bases.
BASE_IMAGE_PYTHON = "3.10"
DEBIAN_BASE_PYTHON = "3.11"


# --- GPU arches ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    name: str                  # "sm70"
    compute_capability: tuple  # (7, 0)
    torch_cuda_arch_list: str  # what TORCH_CUDA_ARCH_LIST gets for a build of this arch
    cuobjdump_name: str        # how cuobjdump --list-elf names its cubins ("sm_70")
    shared_mem_per_block: int  # opt-in maximum dynamic shared memory per block, bytes
    gpus: str                  # the cards users have

    @property
    def cc_string(self) -> str:
        return "%d.%d" % self.compute_capability


# Shared memory: Volta lets a block opt in to 96 KiB, Turing to 64 KiB
# (CUDA C Programming Guide, "Compute Capabilities", table "Technical Specifications").
ARCHES = {
    "sm70": Arch("sm70", (7, 0), "7.0", "sm_70", 96 * 1024, "Tesla V100, Titan V"),
    "sm75": Arch("sm75", (7, 5), "7.5", "sm_75", 64 * 1024, "Tesla T4, RTX 2080 Ti, Quadro RTX"),
}
DEFAULT_ARCH = "sm75"   # images/Dockerfile's ARG ARCH default (a plain `docker build`; invoke build sets it)


def arch_choice(*more: str, cards: bool = False) -> str:
    """The arches, then ``more`` (e.g. "all"), as help and error text name them: "sm70 or sm75",
    "sm70, sm75 or all"; ``cards``: each with its GPUs, "sm70 (Tesla V100, Titan V) or ...". Built
    from ARCHES, so an added arch is named everywhere."""
    names = [f"{a.name} ({a.gpus})" if cards else a.name for a in ARCHES.values()] + list(more)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# --- upstream refs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    name: str         # what users pass to --ref
    version: str      # ktransformers.__version__ as that tree spells it (read at the tag, see below)
    kind: str         # "sdist" (PyPI) or "git"
    sha256: str = ""  # sdist only: the file's hash, verified on every download
    filename: str = ""  # sdist only: the file name on the simple index
    commit: str = ""  # git only: the commit the tag names (fetch-source refuses another one)
    # git only: where the legacy engine lives in the repository at that tag ("" = the top).
    # From v0.4.2 on upstream keeps it under archive/, and its third_party/ there lacks the
    # llama.cpp and pybind11 submodules, which stay at the top: fetch-source puts them back.
    subdir: str = ""
    submodules: tuple = ()  # git only, with subdir: top-level submodules the engine builds from


REFS = {
    "0.2.1.post1": Ref(
        "0.2.1.post1", "0.2.1.post1", "sdist",
        sha256="079ee36fbefe1280455f6cb2d9afaf840a9fed350acecdcf94f03b113aa94199",
        filename="ktransformers-0.2.1.post1.tar.gz",
    ),
    # Upstream did not bump __version__ in step with its tags: the v0.3.1 tree says "0.3", the
    # v0.3.2 tree "0.3.1", v0.4.1 "0.3.2", and every tag from v0.4.2 to v0.7.0 "0.4.1" (read
    # with `git show <tag>:ktransformers/__init__.py`). So the version names no ref: a tree's
    # ref comes from its content (ktlegacy/core/fingerprints.json, see ktlegacy.core.fingerprint).
    "v0.2.4post1": Ref("v0.2.4post1", "0.2.4post1", "git", commit="6617549de0d1f40b0e9254105be7dcc11bf97de5"),
    "v0.3.1": Ref("v0.3.1", "0.3", "git", commit="32f3d7befb906ddc2563e43dda1ad04703272f49"),
    "v0.3.2": Ref("v0.3.2", "0.3.1", "git", commit="495ae374780bff7aeb4c5742b8a6a13ec1eca221"),
    "v0.4.1": Ref("v0.4.1", "0.3.2", "git", commit="e40ba6dfae17ab24212ddcc6ab4b32594258f04d"),
    # The newest legacy engine: archive/ of v0.7.0 (2026-08); its balance_serve submodules
    # (spdlog, xxHash, prometheus-cpp, PhotonLibOS) are gone, so it builds without balance_serve.
    "v0.7.0": Ref("v0.7.0", "0.4.1", "git", commit="e80614fc2d2c3990bd1abe895d5014fc14733fde",
                  subdir="archive", submodules=("third_party/llama.cpp", "third_party/pybind11")),
}

DEFAULT_REF = "0.2.1.post1"   # the sdist: the one ref CI can fetch (PyPI is reachable, GitHub is not)


# --- CPU instruction sets ------------------------------------------------------------------------

# Upstream setup.py's CPU_INSTRUCT values. AVX2 runs on every x86 server that hosts a V100/T4.
CPU_INSTRUCTS = ("AVX2", "AVX512", "FANCY", "NATIVE")
DEFAULT_CPU_INSTRUCT = "AVX2"
# The /proc/cpuinfo flags of the code each build compiles (upstream's CMake options: AVX2 = LLAMA_AVX,
# _AVX2, _FMA, _F16C; AVX512 adds _AVX512 = AVX512F/BW; FANCY adds DQ, VL and VNNI), in the order of
# the gcc -m flags they come from (-m + the flag without "_": -mavx512vnni). NATIVE: whatever the
# build host had, so no table. The doctor checks a host with it, the smoke a container's CPU
# (tests/smoke/smokelib.py's copy), and tests/test_portable_cpu.py checks it against the -m flags
# CMake really generates for each set.
CPU_FLAGS = {
    "AVX2": ("avx", "avx2", "fma", "f16c"),
    "AVX512": ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw"),
    "FANCY": ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"),
}


# --- image tags ----------------------------------------------------------------------------------

# <repository>:<ref>-<CUDA_TAG>-<arch>-<cpu>[-standin] (ktlegacy.images builds and parses it);
# publishing adds <that>-g<sha7> and, from version tags, latest-<arch>-<cpu>.
DEFAULT_REPOSITORY = "ktlegacy/ktransformers"
STANDIN_SUFFIX = "-standin"   # tag suffix of stand-in (no CUDA) test builds: never passes for a CUDA image
DIRTY_SUFFIX = "-dirty"       # revision label (and commit tag) of a build from uncommitted changes
COMMIT_TAG_MARK = "-g"        # <tag>-g<sha7>: the tag that names the commit an image was built from
MOVING_TAG_PREFIX = "latest"  # latest-<arch>-<cpu>: moved by version tags only


# --- labels --------------------------------------------------------------------------------------

# Set by images/Dockerfile from build args (ktlegacy.build computes the values, `publish` checks them).
LABEL_REF = "io.ktlegacy.ktransformers.ref"
LABEL_COMMIT = "io.ktlegacy.ktransformers.commit"
LABEL_OVERLAY_DIGEST = "io.ktlegacy.overlay-digest"
LABEL_ARCH = "io.ktlegacy.arch"
LABEL_CUDA = "io.ktlegacy.cuda"
LABEL_TORCH = "io.ktlegacy.torch"
LABEL_CPU = "io.ktlegacy.cpu-instruct"
LABEL_EXTENSIONS = "io.ktlegacy.extensions"   # "build" or "skip" (stand-in: nothing compiled)
LABEL_STANDIN = "io.ktlegacy.standin"         # "true" only on the no-CUDA stand-in test build
# CI's real-CUDA lanes only: the PyPI torch that stood in for TORCH_VERSION (empty on every other
# build); `publish` refuses an image that carries one.
LABEL_CI_TORCH = "io.ktlegacy.ci-torch"
LABEL_VERSION = "org.opencontainers.image.version"
LABEL_REVISION = "org.opencontainers.image.revision"
LABEL_SOURCE = "org.opencontainers.image.source"
IMAGE_LABELS = (LABEL_REF, LABEL_COMMIT, LABEL_OVERLAY_DIGEST, LABEL_ARCH, LABEL_CUDA, LABEL_TORCH, LABEL_CPU,
                LABEL_EXTENSIONS, LABEL_STANDIN, LABEL_CI_TORCH, LABEL_VERSION, LABEL_REVISION, LABEL_SOURCE)
# On the CUDA bases made from a Debian mirror (images/debian-cuda.Dockerfile): which one it is.
LABEL_BASE = "io.ktlegacy.base"
# On the imported Debian root file system (ktlegacy/standin.py): the mirror debootstrap read.
LABEL_DEBIAN_MIRROR = "io.ktlegacy.debian-mirror"

# --- the server ------------------------------------------------------------------------------------
# The port the server listens on inside the container (compose/serve.sh's --port; compose publishes
# it on KTLEGACY_PORT, by default the same number) and the KV cache length it gets by default
# (upstream config.yaml's cache_lens; KTLEGACY_CACHE_LENS).
SERVER_PORT = 10002
CACHE_LENS = 8192

# --- run-time defaults of the patched engine -------------------------------------------------------
# Prompts of at least this many tokens run the CPU-resident routed experts on the GPU (overlay 68,
# ktlegacy_runtime.experts_prefill_on_gpu; 0: never; "auto": the crossover the engine measures on
# its first long prompt), with at most this many MiB of dequantised expert weights on the GPU at a
# time. Written into the runtime module and compose (ktlegacy.generate).
GPU_PREFILL_MIN_TOKENS = "auto"
GPU_PREFILL_MIB = 1024

# GPU linear layers below sm80 (overlay gguf-linear, KLinearGGUF): "quant" computes from the GGUF
# blocks kept on the GPU, "fp16" dequantizes them at load (upstream's KLinearTorch). Inputs of at
# most MATVEC_MAX_ROWS rows (decode) run the fused dequant-matvec; more rows (prefill) dequantize
# into one reused fp16 scratch buffer per GPU of at most SCRATCH_MIB, then multiply with cuBLAS.
# The overlay writes these into the operator; the doctor counts the scratch.
GPU_LINEAR_MODES = ("quant", "fp16")
GPU_LINEAR = "quant"
GPU_LINEAR_MATVEC_MAX_ROWS = 4
GPU_LINEAR_SCRATCH_MIB = 256

# --- ops the pre-Ampere arches cannot run ------------------------------------------------------------
# Rule-file ops whose kernels need sm80+ (Marlin's tensor-core instructions) or sm89+ (KLinearFP8's fp8
# GEMMs). overlays/20_torch_linear_rules.py replaces them in every rule file; ktlegacy.serving refuses a
# rule file that still selects one (serve.sh in the container, the doctor and the tests on the host).
SM80_ONLY_OPS = ("KLinearMarlin", "VLinearMarlin", "KLinearFP8", "KExpertsMarlin")


# --- compose settings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One KTLEGACY_* variable of compose/.env whose value has a type or a range.

    ``default`` is what compose.yaml's ``${NAME:-default}`` and .env.example say (ktlegacy.generate
    writes both); an empty value means the default, as in compose. ktlegacy.serving.validate
    checks a value by ``kind``: "count" a whole number >= ``minimum`` (or one of ``words``), "port" 1-65535, "address" an
    IP address, "gpu" an nvidia-smi index or UUID (distinct within a profile), "choice" one of
    ``choices``, "args" extra server flags, "text" anything.
    """
    name: str
    kind: str
    default: str
    what: str                # what the value is, for the one-line fix
    minimum: int = 0         # "count" only
    words: tuple = ()        # "count" only: words taken besides a number
    choices: tuple = ()      # "choice" only


MAX_GPUS = 4   # the most GPUs a compose profile reserves (t4x4): KTLEGACY_GPU_0..3
SETTINGS = {s.name: s for s in (
    # the server's flags (serve.sh passes them on; the container validates them again)
    Setting("KTLEGACY_CPU_INFER", "count", "10", "the CPU threads for the experts (about one NUMA node's "
            "physical cores minus 2)", minimum=1),
    Setting("KTLEGACY_MAX_NEW_TOKENS", "count", "2000", "the most tokens one completion may generate", minimum=1),
    Setting("KTLEGACY_CACHE_LENS", "count", str(CACHE_LENS), "the KV cache length in tokens (prompt + answer)", minimum=1),
    Setting("KTLEGACY_MODEL_NAME", "text", "DeepSeek-V3", "the model name the server reports"),
    Setting("KTLEGACY_SERVER_ARGS", "args", "", "extra upstream server flags"),
    # read by the patched engine (overlays/runtime/ktlegacy_runtime.py) on every long prompt
    Setting("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "count", str(GPU_PREFILL_MIN_TOKENS),
            "the prompt length from which the routed experts run on the GPU (0: never; auto: measured "
            "on the first long prompt)", words=("auto",)),
    Setting("KTLEGACY_GPU_PREFILL_MIB", "count", str(GPU_PREFILL_MIB),
            "the MiB of expert weights on the GPU at a time"),
    # read by the patched engine's GPU linears (overlays/gguf_linear/ktlegacy_gguf_linear.py) at load
    Setting("KTLEGACY_GPU_LINEAR", "choice", GPU_LINEAR, "how the GPU linears hold their weights (quant: as "
            "GGUF blocks; fp16: dequantized at load, as upstream's KLinearTorch)", choices=GPU_LINEAR_MODES),
    # read by compose only
    Setting("KTLEGACY_BIND", "address", "127.0.0.1", "the host address the port is published on (127.0.0.1: "
            "this host only; the server has no authentication)"),
    Setting("KTLEGACY_PORT", "port", str(SERVER_PORT), "a free TCP port of the host"),
    Setting("KTLEGACY_SMOKE_PORT", "port", "10012", "a free TCP port of the host"),
    *(Setting(f"KTLEGACY_GPU_{i}", "gpu", str(i), "an nvidia-smi index or UUID of a GPU of this host")
      for i in range(MAX_GPUS)),
    Setting("KTLEGACY_REF", "choice", DEFAULT_REF, "the upstream ref the image was built from", choices=tuple(REFS)),
    Setting("KTLEGACY_CPU", "choice", DEFAULT_CPU_INSTRUCT.lower(), "the image's CPU instruction set",
            choices=tuple(c.lower() for c in CPU_INSTRUCTS)),
    Setting("KTLEGACY_RESTART", "choice", "unless-stopped", "Docker's restart policy",
            choices=("no", "on-failure", "always", "unless-stopped")),
)}
