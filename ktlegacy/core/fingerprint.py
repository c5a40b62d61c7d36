"""A tree's ref from its content: the sha256 of every file the overlays read or edit, per ref.

Upstream's ``__version__`` does not name its tags (v0.4.1 says "0.3.2", v0.4.2 to v0.7.0 all
say "0.4.1"), so it cannot pick an overlay set: a tree is the supported ref R only if every file
in R's fingerprint (``fingerprints.json`` beside this module) has exactly R's content. A tree
that matches no ref is refused before any overlay runs; ``--ref`` forces a set, and then each
overlay still refuses a file that does not hold its anchors (drift, tree untouched).

The fingerprint of a ref is made by :func:`ktlegacy.core.overlay.record_fingerprint` on its pristine tree: the sha256 of each file
the overlay set edits or reads there (plus ``ktransformers/__init__.py``), except the files it
only scans through a glob (every ``ktransformers/**/*.py`` for the fp16 overlay, every rule
file): those count as one digest over their paths and contents, so an added, removed or changed
file among them is a different tree too. Regenerate after changing an overlay or adding a ref:
``python -m ktlegacy fingerprint --src TREE --ref REF`` (see ``--help``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from .errors import KtlegacyError
from .safefs import glob as safe_glob, read_path, real_root

FINGERPRINTS = Path(__file__).resolve().with_name("fingerprints.json")
ALWAYS = ("ktransformers/__init__.py",)


def sha256_of(root: Path, rel: str) -> str | None:
    path = read_path(real_root(root), rel)  # a symlink out of the tree is refused, not hashed
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def load(path: Path = FINGERPRINTS) -> dict[str, dict[str, str]]:
    """ref name -> {relative path: sha256} of its pristine tree."""
    return json.loads(Path(path).read_text())["refs"]


def scanned_lines(root: Path, patterns) -> list[bytes]:
    """``path NUL sha256`` of every file matching ``patterns`` under ``root``, sorted by path."""
    root, inside = real_root(root), {}
    paths = sorted({rel for pattern in patterns for rel in safe_glob(root, pattern, inside)})
    return [f"{rel}\0{sha256_of(root, rel)}\n".encode() for rel in paths]


def scanned_digest(root: Path, patterns) -> str:
    """sha256 over the sorted paths and contents of every file matching ``patterns`` under ``root``."""
    return hashlib.sha256(b"".join(scanned_lines(root, patterns))).hexdigest()


def added_file(lines: list[bytes], recorded: str) -> str | None:
    """The one file of ``lines`` without which they digest to ``recorded``: a file someone added
    to a ref's tree (an own rule file, say). None if no single file explains the difference."""
    prefix = hashlib.sha256()
    for i, line in enumerate(lines):
        h = prefix.copy()
        h.update(b"".join(lines[i + 1:]))
        if h.hexdigest() == recorded:
            return line.split(b"\0")[0].decode()
        prefix.update(line)
    return None


SCANNED = "(files scanned by glob)"
ADDED = " (added)"


def compare(hash_of: Callable[[str], str | None], scanned_of: Callable[[tuple], str],
            fingerprints: dict[str, dict]):
    """(refs whose fingerprint matches, {ref: sorted paths that differ or are missing}); a ref
    whose scanned files differ lists :data:`SCANNED` among them."""
    differing = {}
    for ref, fp in fingerprints.items():
        diff = sorted(rel for rel, digest in fp["files"].items() if hash_of(rel) != digest)
        if scanned_of(tuple(fp["scanned"]["patterns"])) != fp["scanned"]["sha256"]:
            diff.append(SCANNED)
        differing[ref] = diff
    return [ref for ref, diff in differing.items() if not diff], differing


def name_added(src: Path, ref: str, diff: list[str], fingerprints: dict[str, dict]) -> list[str]:
    """``diff`` (``ref``'s differences from :func:`compare`) with :data:`SCANNED` replaced by
    ``PATH (added)`` where one file added to ``src`` explains it."""
    if SCANNED not in diff:
        return diff
    scanned = fingerprints[ref]["scanned"]
    added = added_file(scanned_lines(src, scanned["patterns"]), scanned["sha256"])
    return [added + ADDED if d == SCANNED and added else d for d in diff]


def version_of(root: Path) -> str:
    init = Path(root) / "ktransformers" / "__init__.py"
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", init.read_text(encoding="utf-8", errors="replace")) \
        if init.is_file() else None
    return m.group(1) if m else "?"


def closest(differing: dict[str, list[str]], fingerprints: dict[str, dict[str, str]]) -> str:
    return min(differing, key=lambda r: (len(differing[r]) / max(len(fingerprints[r]), 1), r))


def describe_mismatch(differing: dict[str, list[str]], fingerprints: dict[str, dict[str, str]]) -> str:
    """'closest: v0.3.2 (3 of 48 overlay files differ, e.g. X)' for a refusal line."""
    ref = closest(differing, fingerprints)
    diff = differing[ref]
    total = len(fingerprints[ref]["files"]) + 1  # + the scanned files' digest
    return f"closest: {ref}, {len(diff)} of {total} checks differ: {', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''}"


def identify(src: Path, fingerprints: dict[str, dict[str, str]] | None = None) -> str:
    """The supported ref whose content ``src`` holds; KtlegacyError (one line) if none or ambiguous."""
    src = Path(src)
    fingerprints = fingerprints if fingerprints is not None else load()
    matches, differing = compare(lambda rel: sha256_of(src, rel), lambda pats: scanned_digest(src, pats),
                                 fingerprints)
    if len(matches) == 1:
        return matches[0]
    if matches:  # two refs with byte-identical overlay files: the fingerprints cannot tell them apart
        raise KtlegacyError(f"{src} matches the fingerprints of {' and '.join(matches)}; "
                            "pass --ref to pick one")
    ref = closest(differing, fingerprints)
    differing[ref] = name_added(src, ref, differing[ref], fingerprints)
    if differing[ref][0].endswith(ADDED) and len(differing[ref]) == 1:  # only a file someone added
        added = differing[ref][0].removesuffix(ADDED)
        raise KtlegacyError(f"{src}: {added} is not part of {ref}, whose files the rest of the tree holds; "
                            f"nothing was patched: if the file is yours, add --ref {ref}")
    raise KtlegacyError(
        f"{src} holds ktransformers (__version__ {version_of(src)!r}) whose content matches no supported ref "
        f"({describe_mismatch(differing, fingerprints)}); nothing was patched: fetch a supported ref with "
        "invoke fetch-source --ref REF, or force an overlay set with --ref REF (files that drifted are still refused)")


def write(fingerprints: dict[str, dict[str, str]], path: Path = FINGERPRINTS) -> None:
    body = {"about": "sha256 of the files the overlays read or edit, per supported ref, in its pristine "
                     "tree (ktlegacy/core/fingerprint.py; regenerate with python -m ktlegacy fingerprint)",
            "refs": {ref: {"files": dict(sorted(fp["files"].items())), "scanned": fp["scanned"]}
                     for ref, fp in sorted(fingerprints.items())}}
    Path(path).write_text(json.dumps(body, indent=1, sort_keys=False) + "\n")
