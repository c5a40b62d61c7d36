"""The overlay engine: code that edits a pristine upstream ktransformers tree at build time.

An overlay (one per file under ``overlays/``) is a small class that reads files of the
tree and states its edits as anchored replacements. The engine guarantees, for the whole
set of overlays:

* **anchored**: every edit names the exact text it expects; a missing or ambiguous anchor
  is *drift* and raises :class:`Drift`, one line naming the overlay, the file and the
  expected text;
* **all-or-nothing**: every edit is staged in memory first; if any overlay drifts, not a
  byte of the tree is written. The commit is journaled (:func:`ktlegacy.core.safefs.commit`): a
  kill at any instant is finished or undone by the next ``patch`` (or ``patch --check``), a
  failed write is undone, and the manifest, which says "patched", is written last;
* **inside the tree**: every path read or written is resolved; one that leaves the tree
  through a symlink (or a write through any symlink) is refused in one line before anything
  is written;
* **idempotent**: an edit whose result is already in the file is a no-op, so a second
  ``patch`` on a patched tree changes nothing;
* **reported**: each overlay's changes are printed; ``check=True`` reports without writing;
* **digested**: the applied set has a content digest, written into the tree as
  ``ktlegacy-overlays.json`` and later used as an image label.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .arch import Arch
from .errors import KtlegacyError
from . import fingerprint, safefs
from .refs import REFS, Ref

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAYS_DIR = Path(os.environ.get("KTLEGACY_OVERLAYS_DIR", REPO_ROOT / "overlays"))
MANIFEST_NAME = "ktlegacy-overlays.json"
JOURNAL_NAME = "ktlegacy-patch-journal.json"  # present only while a commit runs (or was killed)


class Drift(KtlegacyError):
    """Upstream is not what an overlay expects; the tree was left untouched."""


@dataclass
class Change:
    overlay: str
    path: str
    what: str


@dataclass
class PatchContext:
    arch: Arch
    ref: Ref


class StagedTree:
    """A view of an upstream tree whose writes stay in memory until :meth:`commit`."""

    def __init__(self, root: Path):
        self.root = safefs.real_root(root)
        self._inside: dict[str, bool] = {}  # directories resolved inside the root (safefs.read_path)
        self._staged: dict[str, str] = {}
        self._original: dict[str, str | None] = {}
        self._newline: dict[str, str] = {}  # files whose line ends are CRLF on disk
        self.changes: list[Change] = []
        self.current_overlay = "?"
        self.read_by_name: set[str] = set()  # files read from disk (record_fingerprint)
        self.globbed: set[str] = set()       # files a glob listed (scanned, not asked for by name)
        self.glob_patterns: set[str] = set()

    # -- reading -----------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return rel in self._staged or safefs.read_path(self.root, rel, self._inside).is_file()

    def one_of(self, candidates: tuple, what: str) -> str:
        """The one of ``candidates`` (a file's paths at different refs) the tree holds; Drift if
        it holds none or several."""
        found = [rel for rel in candidates if self.exists(rel)]
        if len(found) != 1:
            raise self.drift(" or ".join(candidates), f"exactly one {what}")
        return found[0]

    def read(self, rel: str) -> str:
        if rel in self._staged:
            return self._staged[rel]
        path = safefs.read_path(self.root, rel, self._inside)
        if not path.is_file():
            raise self.drift(rel, "the file to exist")
        self.read_by_name.add(rel)
        try:
            raw = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise KtlegacyError(f"cannot read {rel} in {self.root}: {safefs.reason(exc)}; nothing was written") from None
        # Overlays see "\n" line ends; a CRLF file is written back as CRLF (see commit), so
        # an edit never rewrites the line ends of lines it did not touch. A file mixing both
        # is shown as it is: anchors with "\n" then miss and the overlay reports drift.
        crlf, lf = raw.count("\r\n"), raw.count("\n")
        if crlf and crlf == lf:
            self._newline[rel] = "\r\n"
            return raw.replace("\r\n", "\n")
        return raw

    def glob(self, pattern: str) -> list[str]:
        """Relative paths (sorted) of files matching ``pattern`` under the root."""
        found = safefs.glob(self.root, pattern, self._inside)  # a symlink out of the tree is refused
        self.globbed.update(found)
        self.glob_patterns.add(pattern)
        return found

    # -- writing (staged) --------------------------------------------------------------
    def write(self, rel: str, text: str, what: str) -> None:
        """Stage ``text`` as the new content of ``rel``; a write that changes nothing is no change."""
        old = self.read(rel) if self.exists(rel) else None
        if old == text:
            return
        if rel not in self._original:
            self._original[rel] = old
        self._staged[rel] = text
        self.changes.append(Change(self.current_overlay, rel, what))

    def replace(self, rel: str, old: str, new: str, *, count: int = 1, what: str | None = None) -> bool:
        """Replace the anchor ``old`` by ``new`` in ``rel``, exactly ``count`` times.

        Returns True if it edited, False if the edit was already there. Raises Drift if the
        file holds neither ``count`` anchors nor the finished edit, or both forms at once.
        """
        if old == new:
            raise ValueError("an edit must change something")
        text = self.read(rel)
        if new in text:
            # Already applied. The unpatched form may not linger beside it.
            rest = text.replace(new, "\0")
            if old in rest:
                raise self.drift(rel, f"either {_short(old)} or {_short(new)}, found both")
            return False
        found = text.count(old)
        if found != count:
            raise self.drift(rel, f"{count} occurrence(s) of {_short(old)}, found {found}")
        self.write(rel, text.replace(old, new), what or f"{_short(old)} -> {_short(new)}")
        return True

    def sub(self, rel: str, pattern: str, repl, *, count: int | None = None, applied: str | None = None,
            what: str) -> bool:
        """Regex form of :meth:`replace` for anchors with variable whitespace.

        ``count`` is the number of matches expected (None: at least one). ``applied`` is a
        regex that, when it matches and ``pattern`` does not, means the edit is already there.
        """
        text = self.read(rel)
        matches = list(re.finditer(pattern, text, flags=re.M))
        if not matches and applied and re.search(applied, text, flags=re.M):
            return False
        if not matches or (count is not None and len(matches) != count):
            raise self.drift(rel, f"{count or 'at least 1'} match(es) of /{pattern}/, found {len(matches)}")
        self.write(rel, re.sub(pattern, repl, text, flags=re.M), what)
        return True

    def insert_line(self, rel: str, line: str, *, after: str, what: str | None = None) -> bool:
        """Insert ``line`` (one line or a block of lines) after the first line matching the
        regex ``after`` (an import after ``^import torch$``, say). Returns False if ``line``
        is already in the file, as whole lines.
        Raises Drift if no line matches ``after``."""
        text = self.read(rel)
        if re.search(r"^" + re.escape(line) + r"$", text, flags=re.M):
            return False
        m = re.search(after, text, flags=re.M)
        if not m:
            raise self.drift(rel, f"a line matching /{after}/ to insert {_short(line)} after")
        end = text.find("\n", m.end())
        end = len(text) if end < 0 else end + 1
        prefix = text[:end] if text[:end].endswith("\n") or not text[:end] else text[:end] + "\n"
        self.write(rel, prefix + line + "\n" + text[end:], what or f"added {_short(line)}")
        return True

    def drift(self, rel: str, expected: str) -> Drift:
        return Drift(f"overlay {self.current_overlay}: {rel}: expected {expected}; "
                     "upstream drifted, tree left untouched (update the overlay or pick a supported --ref)")

    # -- committing --------------------------------------------------------------------
    @property
    def changed_paths(self) -> list[str]:
        return sorted(self._staged)

    def check_writes(self) -> None:
        """Refuse (one line) a staged path that would be written through a symlink."""
        for rel in self._staged:
            safefs.write_path(self.root, rel)

    def commit(self) -> None:
        """Write every staged file as one journaled transaction (:func:`ktlegacy.core.safefs.commit`):
        the manifest last; a kill is finished or undone by the next ``patch``; a failed write is
        undone and raised as one line. CRLF files are written back with CRLF line ends."""
        order = [rel for rel in self.changed_paths if rel != MANIFEST_NAME]
        order += [MANIFEST_NAME] if MANIFEST_NAME in self._staged else []
        files = []
        for rel in order:
            text = self._staged[rel]
            if self._newline.get(rel) == "\r\n":
                text = text.replace("\n", "\r\n")
            files.append((rel, text.encode("utf-8")))
        safefs.commit(self.root, files, JOURNAL_NAME)


def _short(text: str, limit: int = 60) -> str:
    one = " ".join(text.split())
    return repr(one if len(one) <= limit else one[: limit - 3] + "...")


class Overlay:
    """Base class of an overlay. Subclasses set the attributes and implement :meth:`apply`.

    An overlay applies to every supported ref (``REFS``) but those in ``not_applicable``: a ref
    added to the table is applied by default, and an overlay whose anchors it lacks refuses it
    (drift); it is never skipped without the reason ``patch`` prints."""

    name: str = ""          # short id, e.g. "torch-linear-rules"
    summary: str = ""       # one line: what it does and why
    not_applicable: dict = {}  # ref name -> why the overlay has nothing to do there (printed when skipped)

    @property
    def refs(self) -> tuple:
        """The supported refs it applies to: all of them less ``not_applicable``."""
        return tuple(name for name in REFS if name not in self.not_applicable)

    def applies_to(self, ref: Ref) -> bool:
        return ref.name not in self.not_applicable

    def apply(self, tree: StagedTree, ctx: PatchContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def load_overlays(directory: Path = OVERLAYS_DIR) -> list[tuple[Overlay, Path]]:
    """Import every ``overlays/*.py`` and return its ``OVERLAY`` with its source file, in
    file-name order (files are numbered where order matters)."""
    found = []
    for path in sorted(Path(directory).glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"ktlegacy_overlays.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        overlay = getattr(module, "OVERLAY", None)
        if not isinstance(overlay, Overlay):
            raise KtlegacyError(f"{path}: an overlay file must define OVERLAY = <Overlay subclass>()")
        bad = sorted(ref for ref, why in overlay.not_applicable.items()
                     if ref not in REFS or not isinstance(why, str) or not why.strip())
        if bad:
            raise KtlegacyError(f"{path}: not_applicable must map supported refs ({', '.join(REFS)}) to a "
                                f"one-line reason; not so for {', '.join(map(repr, bad))}")
        found.append((overlay, path))
    if not found:
        raise KtlegacyError(f"no overlays found in {directory}")
    return found


def detect_ref(src: Path) -> Ref:
    """The supported ref of an upstream tree, from its content (never from ``__version__``).

    A tree ``patch`` already wrote keeps the ref of its manifest (its files are no longer
    pristine; re-applying is a no-op or drift). Otherwise every file of a ref's fingerprint must
    hold that ref's content (:mod:`ktlegacy.core.fingerprint`), and the ref ``fetch-source`` recorded,
    if any, must be that one."""
    src = Path(src)
    manifest = read_manifest(src)
    if manifest is not None:
        name = manifest.get("ref", "")
        if name not in REFS:
            raise KtlegacyError(f"{src} was patched for ref {name!r}, which this ktlegacy does not support; "
                                "start again from a pristine tree (invoke fetch-source)")
        return REFS[name]
    if not (src / "ktransformers" / "__init__.py").is_file():
        hint = ""
        if (src / "archive" / "ktransformers" / "__init__.py").is_file():
            hint = f" (this is a newer upstream repository: its legacy engine is {src / 'archive'}; " \
                   "invoke fetch-source --ref v0.7.0 sets it up with its submodules)"
        raise KtlegacyError(f"{src} is not a ktransformers source tree (no ktransformers/__init__.py){hint}; "
                            "fetch one with: invoke fetch-source --ref REF --dest DIR")
    name = fingerprint.identify(src)
    recorded = (safefs.read_json(src / "ktlegacy-source.json", "source record") or {}).get("ref", "")
    if recorded in REFS and recorded != name:
        raise KtlegacyError(f"{src}: fetch-source recorded ref {recorded} but the content is {name}'s; "
                            f"nothing was patched (pass --ref {name} or --ref {recorded} to force one)")
    return REFS[name]


def forced_ref_differences(src: Path, ref: Ref) -> list[str]:
    """Files of ``ref``'s fingerprint whose content in ``src`` is not that ref's (for --ref)."""
    fp = fingerprint.load().get(ref.name)
    if fp is None:
        return []
    _, differing = fingerprint.compare(lambda rel: fingerprint.sha256_of(src, rel),
                                       lambda pats: fingerprint.scanned_digest(src, pats), {ref.name: fp})
    return fingerprint.name_added(src, ref.name, differing[ref.name], {ref.name: fp})


def record_fingerprint(src: Path, ref: Ref, arch: Arch) -> dict:
    """The fingerprint of the pristine tree ``src`` for ``ref``: run the overlay set in check mode;
    hash every file it edited or read outside its globs (plus :data:`fingerprint.ALWAYS`), and
    digest what its globs listed."""
    result = patch_tree(Path(src), arch, ref=ref, check=True, out=lambda line: None)
    paths = set(result.fingerprint_paths) | set(fingerprint.ALWAYS)
    hashes = {rel: fingerprint.sha256_of(src, rel) for rel in sorted(paths)}
    patterns = sorted(result.glob_patterns)
    return {"files": {rel: digest for rel, digest in hashes.items() if digest is not None},
            "scanned": {"patterns": patterns, "sha256": fingerprint.scanned_digest(src, patterns)}}


def digest(overlay_files: Iterable[Path], arch: Arch, ref: Ref) -> str:
    """sha256 over the applied overlays' source (plus the files they ship), arch and ref.

    The engine's own source is hashed too: its edit helpers shape what an overlay writes,
    so a change there is a change of the applied set."""
    h = hashlib.sha256()
    h.update(f"arch={arch.name}\nref={ref.name}\n".encode())
    for path in sorted(set(Path(p) for p in overlay_files)) + [Path(__file__).resolve()]:
        if path.is_relative_to(OVERLAYS_DIR):
            rel = path.relative_to(OVERLAYS_DIR)
        elif path.is_relative_to(REPO_ROOT):
            rel = path.relative_to(REPO_ROOT)
        else:
            rel = Path(path.name)
        h.update(f"\0{rel.as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class PatchResult:
    ref: Ref
    arch: Arch
    digest: str
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    written: bool = False
    fingerprint_paths: list[str] = field(default_factory=list)  # pristine files edited or read by name
    glob_patterns: list[str] = field(default_factory=list)  # what the overlays scanned


def patch_tree(src: Path, arch: Arch, *, ref: Ref | None = None, check: bool = False,
               overlays: list[tuple[Overlay, Path]] | None = None,
               out: Callable[[str], None] = print) -> PatchResult:
    """Apply every overlay to the tree at ``src`` but those ``not_applicable`` to ``ref``, all or nothing."""
    src = Path(src)
    if src.exists() and not src.is_dir():
        raise KtlegacyError(f"--src {src} is a file; pass the directory of an upstream tree (invoke fetch-source --dest DIR)")
    if not src.is_dir():
        raise KtlegacyError(f"source tree {src} does not exist; fetch one with: invoke fetch-source --dest {src}")
    if os.path.lexists(src / safefs.INCOMPLETE_NAME):
        raise KtlegacyError(f"{src} is an incomplete tree ({safefs.INCOMPLETE_NAME}: fetch-source was interrupted "
                            "while filling or removing it); fetch a tree again: invoke fetch-source --dest DIR")
    lock = safefs.lock_tree(src)
    try:
        safefs.recover(src, JOURNAL_NAME, out)  # a killed commit is finished (or undone) before anything else
        return _patch_locked(src, arch, ref, check, overlays, out)
    finally:
        if lock is not None:
            os.close(lock)


def _patch_locked(src: Path, arch: Arch, ref: Ref | None, check: bool,
                  overlays: list[tuple[Overlay, Path]] | None, out: Callable[[str], None]) -> PatchResult:
    if ref is None:
        ref = detect_ref(src)
    elif read_manifest(src) is None:
        differ = forced_ref_differences(src, ref)
        if differ:
            out(f"--ref {ref.name}: {len(differ)} overlay files differ from {ref.name}'s ({', '.join(differ[:3])}"
                f"{', ...' if len(differ) > 3 else ''}); each overlay still refuses a file without its anchors")
    overlays = overlays if overlays is not None else load_overlays()
    ctx = PatchContext(arch=arch, ref=ref)
    tree = StagedTree(src)
    applied, skipped, files = [], [], []
    for overlay, path in overlays:
        if not overlay.applies_to(ref):
            skipped.append(overlay.name)
            continue
        tree.current_overlay = overlay.name
        overlay.apply(tree, ctx)  # raises Drift before anything is written
        applied.append(overlay.name)
        files.append(path)
        files.extend(getattr(overlay, "shipped_files", lambda: [])())
    result = PatchResult(ref=ref, arch=arch, digest=digest(files, arch, ref),
                         applied=applied, skipped=skipped)
    pristine = {rel for rel, old in tree._original.items() if old is not None}
    result.fingerprint_paths = sorted(pristine | (tree.read_by_name - tree.globbed))
    result.glob_patterns = sorted(tree.glob_patterns)

    manifest = {
        "ktlegacy_version": _version(),
        "ref": ref.name,
        "arch": arch.name,
        "overlay_digest": result.digest,
        "overlays": applied,
    }
    tree.current_overlay = "manifest"
    tree.write(MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n", f"overlay digest {result.digest[:12]}")
    result.changes = list(tree.changes)
    tree.check_writes()  # a path through a symlink is refused before anything is written
    if not check and tree.changed_paths:
        tree.commit()
        result.written = True

    verb = "would change" if check else "changed"
    for name in applied:
        mine = [c for c in tree.changes if c.overlay == name]
        if not mine:
            out(f"{name}: already applied, nothing to change")
        for c in mine:
            out(f"{name}: {verb} {c.path}: {c.what}")
    reasons = {o.name: o.not_applicable[ref.name] for o, _ in overlays if not o.applies_to(ref)}
    for name in skipped:
        out(f"{name}: not for ref {ref.name}, skipped ({reasons[name]})")
    code_changes = [c for c in tree.changes if c.overlay != "manifest"]
    summary = "would change" if check else "changed"
    out(f"ref {ref.name}, arch {arch.name}: {len(applied)} overlays, {summary} "
        f"{len({c.path for c in code_changes})} files; overlay digest {result.digest}")
    return result


def read_manifest(src: Path) -> dict | None:
    """The manifest ``patch`` wrote last (None on a tree it did not patch); a symlinked or
    unreadable manifest is refused in one line."""
    return safefs.read_json(Path(src) / MANIFEST_NAME, "overlay manifest")


def _version() -> str:
    from .. import __version__
    return __version__
