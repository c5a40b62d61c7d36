"""File operations on a tree that survive a kill and never leave the tree.

Used by the overlay engine's commit (``patch``), ``fetch-source`` and ``build-stub``:

* :func:`read_path` / :func:`write_path` resolve a path relative to a tree's root and refuse,
  in one line, one that leaves the tree through a symlink (reads), or that goes through any
  symlink at all (writes: like git's "beyond a symbolic link", a write never follows one);
* :func:`commit` replaces a set of files as one transaction. A journal, written and fsynced
  before the first rename, lists every file with its pristine sha256 (or "absent"), its staged
  copy and its backup (a hard link to the pristine file). :func:`recover` finishes (rolls
  forward) or undoes (rolls back) a commit that was killed; a failed write undoes what was
  written and raises one :class:`KtlegacyError` line naming the file and the reason.

``KTLEGACY_TEST_KILL_AT=KIND:N`` (tests only) makes the process SIGKILL itself right before
its Nth step of that kind (``rename``, ``create``, ``mkdir``, ``unlink``, ``extract``), so
the tests can kill the real process at every rename of a commit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
from pathlib import Path, PurePosixPath
from typing import Callable

from .errors import KtlegacyError

KILL_ENV = "KTLEGACY_TEST_KILL_AT"
# Written first into a tree that fetch-source is still filling, removed last: patch refuses a
# tree that holds it (an interrupted fetch leaves no half tree that patch would accept).
INCOMPLETE_NAME = "ktlegacy-fetch-incomplete"
JOURNAL_VERSION = 1

_steps: dict[str, int] = {}


def step(kind: str) -> None:
    """A point where a test may kill the process (KTLEGACY_TEST_KILL_AT=KIND:N); no-op otherwise."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    _steps[kind] = n = _steps.get(kind, 0) + 1
    if want == f"{kind}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def reason(exc: BaseException) -> str:
    """An OSError's reason without the path (the message names the file itself)."""
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).rstrip(".")


# -- paths ---------------------------------------------------------------------------------------

def real_root(root: Path) -> Path:
    return Path(os.path.realpath(root))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _parts(root: Path, rel: str) -> tuple[str, ...]:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise KtlegacyError(f"{rel!r} is not a path inside the tree {root}; refusing it")
    return parts


def _first_symlink(root: Path, rel: str) -> Path | None:
    path = root
    for part in _parts(root, rel):
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return path
        except (FileNotFoundError, NotADirectoryError):
            return None
    return None


def _link_text(root: Path, link: Path) -> str:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return f"{link.relative_to(root).as_posix()} is a symlink to {target}"


def read_path(root: Path, rel: str, inside: dict | None = None) -> Path:
    """``root/rel`` if it resolves inside ``root`` (a real path); refuse one that leaves it.
    ``inside`` (a dict kept for one pass over a tree) remembers the directories already resolved."""
    path = root / rel
    parts = _parts(root, rel)
    parent = "/".join(parts[:-1])
    if inside is None or parent not in inside:
        ok = _within(os.path.realpath(path.parent), str(root))
        if inside is not None:
            inside[parent] = ok
    else:
        ok = inside[parent]
    if ok and os.path.islink(path):
        ok = _within(os.path.realpath(path), str(root))
    if ok:
        return path
    link = _first_symlink(root, rel) or path
    raise KtlegacyError(f"refusing to read {rel}: {_link_text(root, link)}, outside the tree {root}; "
                        "replace the link with a copy of what it points to; nothing was written")


def glob(root: Path, pattern: str, inside: dict | None = None) -> list[str]:
    """Relative paths (sorted) of the files matching ``pattern`` under ``root``, each resolved
    inside it (:func:`read_path`). ``**`` does not descend into a symlinked directory, so one
    that leaves the tree is refused rather than silently left out."""
    inside = {} if inside is None else inside
    if "**" in pattern:
        base = root.joinpath(*pattern.split("**", 1)[0].split("/"))
        for dirpath, dirnames, _ in os.walk(base):
            for name in dirnames:
                path = Path(dirpath) / name
                if os.path.islink(path):
                    read_path(root, path.relative_to(root).as_posix(), inside)
    found = []
    for path in root.glob(pattern):
        rel = path.relative_to(root).as_posix()
        if read_path(root, rel, inside).is_file():
            found.append(rel)
    return sorted(found)


def write_path(root: Path, rel: str) -> Path:
    """``root/rel`` if writing it follows no symlink: every existing component a real directory,
    the file itself a regular file or absent. Refuses anything else in one line."""
    path = root
    parts = _parts(root, rel)
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            break
        if stat.S_ISLNK(st.st_mode):
            outside = "" if _within(os.path.realpath(path), str(root)) else ", outside the tree"
            raise KtlegacyError(f"refusing to write {rel}: {_link_text(root, path)}{outside}; patch never writes "
                                "through a symlink (replace it with the real file or directory); nothing was written")
        last = i == len(parts) - 1
        if (not last and not stat.S_ISDIR(st.st_mode)) or (last and not stat.S_ISREG(st.st_mode)):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory" if not last else "not a regular file"
            raise KtlegacyError(f"refusing to write {rel}: {path.relative_to(root).as_posix()} is {kind}; "
                                "nothing was written")
    return root / rel


def regular_file(path: Path, what: str) -> Path | None:
    """``path`` if it is a regular file, None if absent; refuses a symlink or anything else
    (the tree's own metadata: manifest, journal, source record)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise KtlegacyError(f"refusing {path}: the {what} is a symlink (to {os.readlink(path)}), ktlegacy "
                            "writes it as a regular file; remove the link and start from a pristine tree")
    if not stat.S_ISREG(st.st_mode):
        raise KtlegacyError(f"refusing {path}: the {what} is not a regular file")
    return path


def read_json(path: Path, what: str) -> dict | None:
    """The JSON object in ``path`` (a regular file, see :func:`regular_file`); None if absent."""
    if regular_file(path, what) is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KtlegacyError(f"cannot read the {what} {path}: {reason(exc)}") from None
    if not isinstance(data, dict):
        raise KtlegacyError(f"the {what} {path} is not a JSON object")
    return data


# -- writing -------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str | None:
    """sha256 of a regular file, None if absent; "not-a-file" for anything else."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not-a-file"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where it cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist, and is never a symlink followed), write, fsync."""
    step("create")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def remove(path: Path) -> bool:
    """Unlink a file (or a symlink itself) if it is there."""
    if not os.path.lexists(path):
        return False
    step("unlink")
    os.unlink(path)
    return True


def replace_file(tmp: Path, dest: Path) -> None:
    step("rename")
    os.replace(tmp, dest)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` through ``.NAME.tmp`` beside it (a leftover of a killed run is removed
    first) and a rename: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    remove(tmp)
    write_new(tmp, data, mode)
    try:
        replace_file(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)


# -- the journaled commit ------------------------------------------------------------------------

def lock_tree(root: Path, what: str = "ktlegacy patch") -> int | None:
    """Hold an exclusive lock on the tree's root directory until the process ends (or the
    returned descriptor is closed): a second run would otherwise take a commit still in
    progress for a killed one. Refuses in one line when another run holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KtlegacyError(f"another {what} is running on {root}; wait for it to finish") from None
    return fd


class _Stuck(Exception):
    """A journal that cannot be finished in this direction."""


def _journal_tmp(journal: Path) -> Path:
    return journal.with_name(f".{journal.name}.tmp")


def _write_journal(journal: Path, body: dict) -> None:
    write_atomic(journal, (json.dumps(body, indent=1) + "\n").encode())


def _link_or_copy(src: Path, dest: Path) -> None:
    """A backup of ``src``: a hard link (no space, same inode and mode) or, where the file
    system refuses one (an immutable file, no hard links), a copy."""
    step("create")
    try:
        os.link(src, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout)
                os.fchmod(fout.fileno(), os.lstat(src).st_mode & 0o7777)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            os.unlink(dest)
            raise


def commit(root: Path, files: list[tuple[str, bytes]], journal_name: str) -> None:
    """Replace (or create) every ``(rel, data)`` of ``files`` under ``root``, in that order (put
    the file that says "done" last), all or nothing. A kill at any instant leaves a journal
    that :func:`recover` finishes; a failed write is undone and raised as one line."""
    root = real_root(root)
    for rel, _ in files:
        write_path(root, rel)  # refuses before anything is written
    journal = root / journal_name
    if regular_file(journal, "patch journal") is not None:
        raise KtlegacyError(f"{journal} exists: an interrupted patch is pending; run patch again to finish it")
    token = secrets.token_hex(4)
    entries, dirs = [], []
    for rel, data in files:
        dest = root / rel
        missing, parent = [], dest.parent
        while not os.path.lexists(parent):
            missing.append(parent.relative_to(root).as_posix())
            parent = parent.parent
        dirs.extend(d for d in reversed(missing) if d not in dirs)
        try:
            before = sha256_of(dest)
        except OSError as exc:
            raise KtlegacyError(f"cannot read {rel}: {reason(exc)}; nothing was written") from None
        side = (dest.parent / f".ktlegacy-{token}-{dest.name}").relative_to(root).as_posix()
        entries.append({"path": rel, "before": before, "after": hashlib.sha256(data).hexdigest(),
                        "staged": side + ".new", "backup": side + ".old" if before else None})
    body = {"about": "ktlegacy patch journal: the next `ktlegacy patch` (or patch --check) on this tree "
                     "finishes or undoes the interrupted commit it records",
            "version": JOURNAL_VERSION, "state": "staging", "dirs": dirs, "files": entries}
    try:
        _write_journal(journal, body)
    except OSError as exc:
        remove_quietly(_journal_tmp(journal))
        raise KtlegacyError(f"cannot write the patch journal {journal}: {reason(exc)}; nothing was written") from None

    current = "?"
    try:
        for d in dirs:
            current = d
            step("mkdir")
            os.mkdir(root / d)
        for entry, (rel, data) in zip(entries, files):
            current, dest = rel, root / rel
            mode = os.lstat(dest).st_mode & 0o7777 if entry["before"] else 0o644
            write_new(root / entry["staged"], data, mode)
            if entry["backup"]:
                _link_or_copy(dest, root / entry["backup"])
        for d in {(root / e["staged"]).parent for e in entries}:
            fsync_dir(d)
        body["state"] = "staged"
        current = journal_name
        _write_journal(journal, body)
    except OSError as exc:
        undone = _undo_or_say(root, journal, body)
        raise KtlegacyError(f"cannot write {current}: {reason(exc)}; {undone}") from None

    done = 0
    for entry in entries:
        try:
            replace_file(root / entry["staged"], root / entry["path"])
        except OSError as exc:
            undone = _undo_or_say(root, journal, body, replaced=done)
            raise KtlegacyError(f"cannot replace {entry['path']}: {reason(exc)}; {undone}") from None
        done += 1
    try:
        _finish(root, journal, body)
    except OSError as exc:
        raise KtlegacyError(f"every file was written, but removing the backups failed ({reason(exc)}); "
                            f"the next patch finishes it from {journal}") from None


def remove_quietly(path: Path) -> None:
    try:
        if os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


def _undo_or_say(root: Path, journal: Path, body: dict, replaced: int = 0) -> str:
    """Roll back after a failed write; the end of the error line says how that went."""
    try:
        _roll_back(root, journal, body)
    except (OSError, _Stuck) as exc:
        return (f"undoing it failed too ({reason(exc)}): {journal} records what is left; fix the cause "
                "and run patch again")
    if replaced:
        return f"the {replaced} files already replaced were put back, {root} is as it was"
    return f"{root} is as it was, nothing was written"


def _dirs_of(root: Path, body: dict) -> set[Path]:
    return {(root / e["path"]).parent for e in body["files"] if os.path.isdir((root / e["path"]).parent)}


def _finish(root: Path, journal: Path, body: dict) -> None:
    for d in _dirs_of(root, body):
        fsync_dir(d)
    for entry in body["files"]:
        if entry["backup"]:
            remove(root / entry["backup"])
    remove(journal)
    fsync_dir(root)


def _roll_forward(root: Path, journal: Path, body: dict) -> None:
    for entry in body["files"]:  # all of it can be done, or none of it is tried
        if not os.path.lexists(root / entry["staged"]) and sha256_of(root / entry["path"]) != entry["after"]:
            raise _Stuck(f"{entry['path']} has neither its staged copy nor its patched content")
    for entry in body["files"]:
        if os.path.lexists(root / entry["staged"]):
            replace_file(root / entry["staged"], root / entry["path"])
    _finish(root, journal, body)


def _roll_back(root: Path, journal: Path, body: dict) -> int:
    """Put every file back as the journal found it; returns how many had been replaced."""
    restored = 0
    for entry in reversed(body["files"]):
        dest, backup = root / entry["path"], root / entry["backup"] if entry["backup"] else None
        now = sha256_of(dest)
        if now == entry["after"]:
            if backup is not None and os.path.lexists(backup):
                replace_file(backup, dest)
            elif entry["before"] is None:
                remove(dest)
            else:
                raise _Stuck(f"{entry['path']} is patched and its pristine copy {entry['backup']} is gone")
            restored += 1
        elif now == entry["before"]:
            if backup is not None:
                remove(backup)
        else:
            raise _Stuck(f"{entry['path']} holds neither its pristine nor its patched content")
        remove(root / entry["staged"])
    for d in reversed(body["dirs"]):
        try:
            step("unlink")
            os.rmdir(root / d)
        except FileNotFoundError:
            pass
    for d in {root} | _dirs_of(root, body):
        fsync_dir(d)
    remove(journal)
    fsync_dir(root)
    return restored


def _check_journal(root: Path, journal: Path, body: dict) -> None:
    """Every path a journal names: inside the tree, through no symlink (a planted journal
    cannot make recovery write elsewhere)."""
    try:
        ok = body.get("version") == JOURNAL_VERSION and body.get("state") in ("staging", "staged") \
            and isinstance(body.get("dirs"), list) and isinstance(body.get("files"), list)
        for entry in body["files"]:
            for key in ("path", "staged", "backup"):
                if entry[key] is not None or key == "path":
                    write_path(root, entry[key])
            ok = ok and isinstance(entry["after"], str)
        for d in body["dirs"]:
            _parts(root, d)
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise KtlegacyError(f"{journal} is not a patch journal this ktlegacy wrote; refusing to act on it "
                            "(start again from a pristine tree: invoke fetch-source)")


def recover(root: Path, journal_name: str, out: Callable[[str], None]) -> bool:
    """Finish (or undo) a commit a kill interrupted, before anything else touches the tree.
    Says what it did in one line; returns whether there was anything to do."""
    root = real_root(root)
    journal = root / journal_name
    leftover = _journal_tmp(journal)
    killed_early = os.path.lexists(leftover)
    if killed_early:  # a journal killed while being written; the old one (if any) stands
        try:
            os.unlink(leftover)
        except OSError as exc:
            raise KtlegacyError(f"cannot remove {leftover}, left by a killed patch: {reason(exc)}") from None
    body = read_json(journal, "patch journal")
    if body is None:
        if killed_early:
            out(f"{root}: removed {leftover.name}, left by a patch killed before it wrote anything")
        return killed_early
    _check_journal(root, journal, body)
    n = len(body["files"])
    try:
        if body["state"] == "staged":
            try:
                _roll_forward(root, journal, body)
                out(f"{root}: finished an interrupted patch from its journal ({n} files rolled forward, "
                    "temporary files removed)")
                return True
            except _Stuck:
                pass
        _roll_back(root, journal, body)
    except (OSError, _Stuck) as exc:
        raise KtlegacyError(f"cannot finish or undo the interrupted patch recorded in {journal}: {reason(exc)}; "
                            "fix the cause and run patch again, or start from a pristine tree") from None
    out(f"{root}: undid an interrupted patch from its journal ({n} files put back as they were, "
        "temporary files removed)")
    return True
