"""Get a pristine upstream ktransformers tree: from the PyPI sdist, a git ref, or a local directory.

Every tree this module produces carries ``ktlegacy-source.json`` at its root, recording
where it came from (ref, origin, sha256 or resolved commit). The overlay engine reads it to
pick the overlay set, and the image build turns it into OCI labels.

Failures (hash mismatch, unknown ref, network) are one-line :class:`KtlegacyError`s and leave
``dest`` as it was: everything is fetched into a temporary directory next to ``dest``
(``.DEST.fetch-*``) and renamed into place only when complete. A tree being filled holds
``ktlegacy-fetch-incomplete`` (:data:`ktlegacy.core.safefs.INCOMPLETE_NAME`) from before its first
file until after its last, and a tree being removed gets it back before its first file goes:
``patch`` refuses such a tree, so a killed fetch leaves no half tree it would accept. The next
fetch-source for the same ``dest`` removes what a killed one left.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from . import safefs
from .errors import KtlegacyError
from .refs import DEFAULT_REF, PYPI_SIMPLE_URL, REFS, UPSTREAM_GIT_URL, Ref, get_ref

RECORD_NAME = "ktlegacy-source.json"
CACHE_DIR = Path(os.environ.get("KTLEGACY_CACHE", Path.home() / ".cache" / "ktlegacy"))


def read_record(tree: Path) -> dict:
    path = Path(tree) / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


# -- sdist -------------------------------------------------------------------------------------

def _simple_index_url(project: str, filename: str, index: str) -> str:
    """Find ``filename``'s download URL on a PEP 691 (JSON) or PEP 503 (HTML) simple index."""
    url = f"{index.rstrip('/')}/{project}/"
    req = urllib.request.Request(url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read().decode("utf-8", "replace")
            ctype = resp.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError) as exc:
        raise KtlegacyError(f"cannot reach the package index {url}: {exc}; "
                            "set --index-url / PIP_INDEX_URL to a mirror you can reach") from None
    if "json" in ctype:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == filename:
                return urllib.parse.urljoin(url, entry["url"])
    else:
        import re
        for href in re.findall(r'href="([^"]+)"', body):
            if href.split("#")[0].rsplit("/", 1)[-1] == filename:
                return urllib.parse.urljoin(url, href.split("#")[0])
    raise KtlegacyError(f"{filename} is not listed on {url}; is the index a full PyPI mirror?")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(ref: Ref, index: str = PYPI_SIMPLE_URL, cache: Path = CACHE_DIR) -> Path:
    """The ref's sdist, from the cache if its hash matches, else from the index (then verified)."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / ref.filename
    if target.is_file() and _sha256(target) == ref.sha256:
        return target
    url = _simple_index_url("ktransformers", ref.filename, index)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=300) as resp:
            shutil.copyfileobj(resp, out)
        got = _sha256(Path(tmp))
        if got != ref.sha256:
            raise KtlegacyError(f"{ref.filename} from {url} has sha256 {got}, expected {ref.sha256}; "
                                "the mirror serves a different file, refusing it")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise KtlegacyError(f"downloading {url} failed: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _mark_incomplete(tree: Path) -> None:
    """Create ``tree`` (or reuse an empty one) holding the incomplete-tree marker."""
    tree.mkdir(parents=True, exist_ok=True)
    marker = tree / safefs.INCOMPLETE_NAME
    if not os.path.lexists(marker):
        safefs.write_new(marker, f"fetch-source (pid {os.getpid()}) is filling this tree; ktlegacy patch "
                                 "refuses it until it is complete\n".encode())


def _extract_sdist(archive: Path, into: Path) -> None:
    """Unpack ``archive`` (one top-level directory) as ``into``, which holds the incomplete
    marker while it fills. Absolute and '..' members are refused, and so is what the "data"
    extraction filter refuses (where Python has no filters: every link and device)."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        top = {m.name.split("/", 1)[0] for m in members}
        if len(top) != 1:
            raise KtlegacyError(f"{archive} does not have a single top-level directory")
        prefix = top.pop() + "/"
        _mark_incomplete(into)

        def strip(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            if not member.name.startswith(prefix):
                return None  # the top-level directory itself
            parts = Path(member.name).parts
            filtered = hasattr(tarfile, "data_filter")  # else: files and directories only
            if member.name.startswith("/") or ".." in parts or not (filtered or member.isfile() or member.isdir()):
                raise KtlegacyError(f"{archive}: unsafe member {member.name!r} (absolute, '..', link or device)")
            if parts[-1] == safefs.INCOMPLETE_NAME:
                raise KtlegacyError(f"{archive}: member {member.name!r} has the name of ktlegacy's own marker")
            safefs.step("extract")
            stripped = copy.copy(member)  # (TarInfo.replace came with the filters)
            stripped.name = member.name[len(prefix):]
            if member.islnk() and member.linkname.startswith(prefix):
                stripped.linkname = member.linkname[len(prefix):]
            return tarfile.data_filter(stripped, path) if filtered else stripped

        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter=strip)
        else:
            # Python without extraction filters (Debian bookworm's 3.11.2, used by the image
            # build's stand-in base): the same checks, then the members one by one.
            for m in members:
                stripped = strip(m, str(into))
                if stripped is not None:
                    tar.extract(stripped, into)


def _discard(path: Path) -> None:
    """Remove a fetch's work directory (or anything left in it). A directory that may be a tree
    gets the incomplete marker back first and loses it last, so no half-removed tree is ever
    without it."""
    if path.is_symlink() or not path.is_dir():
        safefs.remove(path)
        return
    try:
        _mark_incomplete(path)
    except OSError:
        pass  # a full disk: remove it all the same
    for child in sorted(os.scandir(path), key=lambda e: e.name):
        if child.name == safefs.INCOMPLETE_NAME:
            continue
        safefs.step("unlink")
        if child.is_dir(follow_symlinks=False):
            shutil.rmtree(child.path)
        else:
            os.unlink(child.path)
    safefs.remove(path / safefs.INCOMPLETE_NAME)
    os.rmdir(path)


def _discard_work(work: Path) -> None:
    for child in sorted(work.iterdir()):
        _discard(child)
    work.rmdir()


def _remove_leftovers(parent: Path, name: str) -> None:
    """Work directories of earlier fetches into the same ``dest`` whose process is gone."""
    for work in parent.glob(f".{glob.escape(name)}.fetch-*"):
        if work.is_symlink() or not work.is_dir():
            continue
        try:
            pid = int((work / "owner").read_text().strip())
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):  # no owner recorded: died before writing it, or just starting
            if time.time() - work.stat().st_mtime < 60:
                continue
        _discard_work(work)


# -- git ---------------------------------------------------------------------------------------

def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise KtlegacyError(f"git is not installed; install it or fetch the sdist ref {DEFAULT_REF}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KtlegacyError(f"git {' '.join(args[:2])} failed: {last}")
    return proc.stdout.strip()


def _clone(url: str, rev: str, into: Path, submodules: tuple = (), subdir: str = "") -> str:
    """Clone ``url`` at tag/branch/commit ``rev`` with submodules (all, or only ``submodules``);
    return the resolved commit. ``into`` (and its ``subdir``, the engine) hold the incomplete
    marker while the checkout fills them."""
    _mark_incomplete(into)
    if subdir:
        _mark_incomplete(into / subdir)
    _git("init", "-q", str(into))
    _git("remote", "add", "origin", url, cwd=into)
    _git("fetch", "-q", "--depth", "1", "origin", rev, cwd=into)
    _git("checkout", "-q", "FETCH_HEAD", cwd=into)
    _git("submodule", "update", "-q", "--init", "--recursive", "--depth", "1", "--", *submodules, cwd=into)
    return _git("rev-parse", "HEAD", cwd=into)


def engine_tree(repo: Path, ref: Ref, into: Path) -> dict:
    """Move the legacy engine of a checkout of ``ref`` to ``into``: the checkout itself, or its
    ``ref.subdir`` with the top-level submodules it builds from placed in its ``third_party/``
    (v0.7.0: ``archive/third_party`` holds llamafile but not llama.cpp/pybind11, which its
    CMakeLists expect there). Returns what to add to the record."""
    if not ref.subdir:
        os.replace(repo, into)
        return {}
    engine = repo / ref.subdir
    if not (engine / "ktransformers" / "__init__.py").is_file():
        raise KtlegacyError(f"{ref.name}: {ref.subdir}/ktransformers/__init__.py is missing in the checkout; "
                            "is this the right tag?")
    placed = {}
    for sub in ref.submodules:
        src, dest = repo / sub, engine / sub
        if not (src.is_dir() and any(src.iterdir())):
            raise KtlegacyError(f"{ref.name}: submodule {sub} is empty in the checkout; fetch it with its "
                                "submodules (git submodule update --init)")
        if dest.exists() and any(dest.iterdir()):
            raise KtlegacyError(f"{ref.name}: {ref.subdir}/{sub} already exists; refusing to overwrite it")
        if dest.exists():
            dest.rmdir()
        shutil.rmtree(src / ".git", ignore_errors=True)
        if (src / ".git").is_file():
            (src / ".git").unlink()
        os.replace(src, dest)
        placed[sub] = f"top-level {sub} moved into {ref.subdir}/{sub}"
    os.replace(engine, into)
    return {"subdir": ref.subdir, "submodules": sorted(placed)}


# -- front -------------------------------------------------------------------------------------

def fetch_source(dest: Path, ref: str | None = None, *, git_url: str | None = None,
                 local: Path | None = None, index: str = PYPI_SIMPLE_URL,
                 force: bool = False) -> dict:
    """Make ``dest`` a pristine upstream tree and return its record.

    Exactly one origin: ``local`` (copy a directory), ``git_url`` (clone at ``ref``, which may be
    a tag or a commit), or a supported ``ref`` (sdist refs from PyPI, git refs from upstream).
    """
    dest = Path(dest)
    if dest.is_symlink():
        raise KtlegacyError(f"--dest {dest} is a symlink (to {os.readlink(dest)}); fetch-source replaces --dest "
                            "as a whole and never writes through a link: pass the real directory")
    if dest.exists() and not dest.is_dir() and not force:
        raise KtlegacyError(f"--dest {dest} is a file, not a directory; pass a directory path (it is created)")
    occupied = dest.is_file() or (dest.is_dir() and any(dest.iterdir()))
    if occupied and not force:
        raise KtlegacyError(f"{dest} already exists and is not empty; pick another --dest or pass --force")
    parent = dest.parent if str(dest.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, dest.name)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=parent))
    (work / "owner").write_text(f"{os.getpid()}\n")
    tree = work / "tree"
    try:
        if local is not None:
            local = given = Path(local)
            archive_sha = ""
            if local.is_file():  # a tarball of a tree (one top-level directory), e.g. carried to a machine offline
                if not tarfile.is_tarfile(local):
                    raise KtlegacyError(f"{local} is neither a directory nor a tar archive of a ktransformers tree")
                archive_sha = _sha256(local)
                _extract_sdist(local, tree)
                local = tree
            if not (local / "ktransformers" / "__init__.py").is_file():
                hint = ""
                if (local / "archive" / "ktransformers" / "__init__.py").is_file():
                    hint = (f"; its legacy engine is {given / 'archive'}, which needs the top-level "
                            "third_party/llama.cpp and third_party/pybind11 in archive/third_party/ "
                            "(fetch-source --ref v0.7.0 does that)")
                raise KtlegacyError(f"{given} is not a ktransformers source tree (no ktransformers/__init__.py){hint}")
            if local != tree:
                if os.path.lexists(local / safefs.INCOMPLETE_NAME):
                    raise KtlegacyError(f"{given} is an incomplete tree ({safefs.INCOMPLETE_NAME}: a fetch-source was "
                                        "interrupted while filling it); copy a whole tree")
                _mark_incomplete(tree)
                shutil.copytree(local, tree, symlinks=True, dirs_exist_ok=True,
                                ignore=lambda d, names: [safefs.INCOMPLETE_NAME] if Path(d) == local else [])
            record = {"ref": ref or "", "origin": "local", "path": str(given.resolve())}
            if archive_sha:
                record["sha256"] = archive_sha
        elif git_url is not None:
            if not ref:
                raise KtlegacyError("--git-url needs --ref with a tag or commit to check out")
            commit = _clone(git_url, ref, tree)
            record = {"ref": ref, "origin": "git", "url": git_url, "commit": commit}
        else:
            r = get_ref(ref or "")
            if r.kind == "sdist":
                archive = download_sdist(r, index)
                _extract_sdist(archive, tree)
                record = {"ref": r.name, "origin": "sdist", "file": r.filename, "sha256": r.sha256,
                          "commit": ""}
            else:
                checkout = work / "checkout"
                try:
                    commit = _clone(UPSTREAM_GIT_URL, r.name, checkout, r.submodules, r.subdir)
                except KtlegacyError as exc:
                    raise KtlegacyError(f"{exc}; if {UPSTREAM_GIT_URL} is out of reach, pass a mirror with --git-url URL "
                                        f"--ref {r.name}, or a checked-out tree with --local DIR") from None
                if r.commit and commit != r.commit:
                    raise KtlegacyError(f"tag {r.name} of {UPSTREAM_GIT_URL} resolves to {commit}, not {r.commit} "
                                        "as recorded in ktlegacy/core/refs.py; refusing a moved tag")
                extra = engine_tree(checkout, r, tree)
                record = {"ref": r.name, "origin": "git", "url": UPSTREAM_GIT_URL, "commit": commit, **extra}
        if record["ref"] and record["ref"] not in REFS:
            # A commit or an unsupported tag: keep it, patch will detect the version itself.
            record["note"] = "not a supported ref; patch recognises the tree by its content or refuses it"
        (tree / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        safefs.remove(tree / safefs.INCOMPLETE_NAME)
        if os.path.lexists(dest):
            safefs.replace_file(dest, work / "old")  # --force: the old tree goes aside, then away
        safefs.replace_file(tree, dest)
    except OSError as exc:
        raise KtlegacyError(f"fetching into {dest} failed: {safefs.reason(exc)} ({getattr(exc, 'filename', '') or dest}); "
                            f"{dest} was left as it was") from None
    finally:
        try:
            _discard_work(work)
        except OSError:
            pass  # the next fetch-source into dest removes it
    return record
