"""One naming scheme for images, shared by build, compose, doctor and publish.

Tag: ``<repository>:<ref>-<CUDA_TAG>-<arch>-<cpu>``, the CPU set in lower case (for the default
ref, sm75 and AVX2: ``ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-avx2``); stand-in test builds
add ``-standin``. Publishing adds the same tag with ``-g<short sha>`` (:func:`commit_tag`) and,
from version tags only, a moving ``latest-<arch>-<cpu>`` (:func:`moving_tag`). Labels: OCI
standard keys plus ``io.ktlegacy.*`` for what users need to match an image to their hardware.
The pieces (CUDA_TAG, suffixes, label keys, CPU sets) are in :mod:`ktlegacy.core.facts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .core.arch import Arch
from .core.errors import KtlegacyError
# the pieces of the scheme and the label keys, re-exported (their one place is ktlegacy/core/facts.py)
from .core.facts import (COMMIT_TAG_MARK, CPU_INSTRUCTS, CUDA_TAG, CUDA_VERSION, DEFAULT_CPU_INSTRUCT,  # noqa: F401
                    DEFAULT_REPOSITORY, DIRTY_SUFFIX, LABEL_ARCH, LABEL_COMMIT, LABEL_CPU, LABEL_CUDA,
                    LABEL_CI_TORCH, LABEL_EXTENSIONS, LABEL_OVERLAY_DIGEST, LABEL_REF, LABEL_REVISION, LABEL_SOURCE,
                    LABEL_STANDIN, LABEL_TORCH, LABEL_VERSION, MOVING_TAG_PREFIX, STANDIN_SUFFIX)


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


def commit_tag(tag: str, short_sha: str) -> str:
    """The tag that names the commit an image was built from: ``<tag>-g<sha7>``."""
    return f"{tag}{COMMIT_TAG_MARK}{short_sha}"


def moving_tag(arch: Arch, cpu: str, variant: str = "") -> str:
    """The tag version tags move: ``latest-<arch>-<cpu>`` (plus ``-standin`` on stand-in builds)."""
    return f"{MOVING_TAG_PREFIX}-{arch.name}-{cpu_instruct(cpu).lower()}{variant}"


@dataclass(frozen=True)
class TagParts:
    """What a tag of the scheme says: ``<ref>-<CUDA_TAG>-<arch>-<cpu>[-standin]``."""
    ref: str
    arch: str          # e.g. "sm75" (not checked against ktlegacy.core.arch: callers decide)
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
