"""One naming scheme for images, shared by build, compose, doctor and publish.

Tag: ``<repository>:<ref>-cu118-<arch>-<cpu>`` e.g. ``ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-avx2``;
publishing adds the same tag with ``-g<short sha>`` and, from version tags only, a moving
``latest-<arch>-<cpu>``. Labels: OCI standard keys plus ``io.ktlegacy.*`` for what users need
to match an image to their hardware.
"""

from __future__ import annotations

from .arch import Arch
from .errors import KtlegacyError

DEFAULT_REPOSITORY = "ktlegacy/ktransformers"
CUDA_VERSION = "11.8"
CUDA_TAG = "cu118"
CPU_INSTRUCTS = ("AVX2", "AVX512", "FANCY", "NATIVE")
DEFAULT_CPU_INSTRUCT = "AVX2"

# label keys (values are set by the Dockerfile from build args)
LABEL_REF = "io.ktlegacy.ktransformers.ref"
LABEL_COMMIT = "io.ktlegacy.ktransformers.commit"
LABEL_OVERLAY_DIGEST = "io.ktlegacy.overlay-digest"
LABEL_ARCH = "io.ktlegacy.arch"
LABEL_CUDA = "io.ktlegacy.cuda"
LABEL_TORCH = "io.ktlegacy.torch"
LABEL_CPU = "io.ktlegacy.cpu-instruct"
LABEL_VERSION = "org.opencontainers.image.version"
LABEL_REVISION = "org.opencontainers.image.revision"
LABEL_SOURCE = "org.opencontainers.image.source"


def cpu_instruct(name: str) -> str:
    key = (name or "").strip().upper()
    if key not in CPU_INSTRUCTS:
        raise KtlegacyError(f"unknown CPU instruction set {name!r}: use one of {', '.join(CPU_INSTRUCTS)}")
    return key


def image_tag(ref: str, arch: Arch, cpu: str = DEFAULT_CPU_INSTRUCT, repository: str = DEFAULT_REPOSITORY) -> str:
    """The image tag for (ref, arch, cpu); the same everywhere in ktlegacy."""
    return f"{repository}:{tag_suffix(ref, arch, cpu)}"


def tag_suffix(ref: str, arch: Arch, cpu: str = DEFAULT_CPU_INSTRUCT) -> str:
    return f"{ref}-{CUDA_TAG}-{arch.name}-{cpu_instruct(cpu).lower()}"
