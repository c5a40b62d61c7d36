"""The tag scheme of ktlegacy/images.py: every tag image_tag makes, parse_tag reads back."""

from __future__ import annotations

import pytest

from ktlegacy import images
from ktlegacy.core.arch import ARCHES
from ktlegacy.core.refs import REFS


@pytest.mark.parametrize("standin", [False, True])
def test_parse_tag_reads_back_every_tag_of_the_scheme(standin):
    for ref in REFS:
        for arch in ARCHES.values():
            for cpu in images.CPU_INSTRUCTS:
                tag = images.image_tag(ref, arch, cpu, "127.0.0.1:5000/team/ktransformers")
                tag += images.STANDIN_SUFFIX if standin else ""
                assert images.parse_tag(tag) == images.TagParts(ref, arch.name, cpu, standin), tag
                bare = tag.rsplit(":", 1)[1]
                assert images.parse_tag(bare) == images.parse_tag(tag)


@pytest.mark.parametrize("tag", [
    "ktlegacy/ktransformers:latest",
    "ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-sse4",     # not a CPU set of ours
    "ktlegacy/ktransformers:0.2.1.post1-cu121-sm75-avx2",     # another CUDA
    "ktlegacy/ktransformers:0.2.1.post1-cu118-sm75-avx2-dirty",
    "127.0.0.1:5000/ktransformers",                           # a port is not a tag
])
def test_parse_tag_refuses_what_the_scheme_does_not_make(tag):
    assert images.parse_tag(tag) is None
