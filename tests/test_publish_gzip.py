"""The layer compression of ktlegacy/publish.py, without Docker: parallel gzip members that
decompress to the layer, the same bytes every time, and a reader for gzip layers that follows
members across read boundaries (the docker round trip is in tests/test_publish.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os

import pytest

from ktlegacy import publish


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("payload", [b"", b"abc", os.urandom(5 << 20) * 8 + b"tail"],
                         ids=["empty", "tiny", "three-members"])
def test_gzip_to_is_gzip_of_the_layer_and_deterministic(payload):
    out = io.BytesIO()
    digest, size, diff_id = publish._gzip_to(io.BytesIO(payload), out)
    blob = out.getvalue()
    assert gzip.decompress(blob) == payload
    assert (digest, size, diff_id) == (sha(blob), len(blob), sha(payload))
    again = io.BytesIO()
    assert publish._gzip_to(io.BytesIO(payload), again)[0] == digest and again.getvalue() == blob


def test_copy_gzipped_follows_members_across_read_boundaries():
    first, second = gzip.compress(os.urandom(3000), mtime=0), gzip.compress(b"y" * 5000, mtime=0)
    blob = first + second

    class Reader:  # the first member ends exactly at the end of a read
        def __init__(self):
            self.buf = io.BytesIO(blob)

        def read(self, n):
            return self.buf.read(len(first) - 2 if self.buf.tell() == 2 else n)

    src = Reader()
    out = io.BytesIO()
    digest, size, diff_id = publish._copy_gzipped(src.read(2), src, out)
    assert out.getvalue() == blob and (digest, size) == (sha(blob), len(blob))
    assert diff_id == sha(gzip.decompress(blob))
