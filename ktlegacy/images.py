"""One naming scheme for images, shared by build, compose, doctor and publish.

Tag: ``<repository>:<ref>-cu118-<arch>-<cpu>`` e.g. ``ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-avx2``;
publishing adds the same tag with ``-g<short sha>`` and, from version tags only, a moving
``latest-<arch>-<cpu>``. Labels: OCI standard keys plus ``io.ktlegacy.*`` for what users need
to match an image to their hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
LABEL_STANDIN = "io.ktlegacy.standin"       # "true" only on the no-CUDA stand-in test build

STANDIN_SUFFIX = "-standin"   # tag suffix of stand-in (no CUDA) test builds: never passes for a CUDA image
DIRTY_SUFFIX = "-dirty"       # revision label (and commit tag) of a build from uncommitted changes


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


@dataclass(frozen=True)
class TagParts:
    """What a tag of the scheme says: ``<ref>-cu118-<arch>-<cpu>[-standin]``."""
    ref: str
    arch: str          # e.g. "sm75" (not checked against ktlegacy.arch: callers decide)
    cpu: str           # upper case, one of CPU_INSTRUCTS
    standin: bool


_TAG = re.compile(r"^(?P<ref>.+)-" + re.escape(CUDA_TAG) + r"-(?P<arch>sm[0-9]+)-(?P<cpu>[a-z0-9]+)"
                  r"(?P<standin>" + re.escape(STANDIN_SUFFIX) + r")?$")


def parse_tag(image: str) -> TagParts | None:
    """The one parser of the tag scheme: ``repo:tag`` or a bare tag -> its parts, or None."""
    tag = image.rsplit("/", 1)[-1].split("@", 1)[0]
    tag = tag.split(":", 1)[1] if ":" in tag else tag
    m = _TAG.match(tag)
    if not m or m["cpu"].upper() not in CPU_INSTRUCTS:
        return None
    return TagParts(m["ref"], m["arch"], m["cpu"].upper(), bool(m["standin"]))
