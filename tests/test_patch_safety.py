"""``patch`` all or nothing for real, on the real 0.2.1.post1 sdist (issue 21).

* a kill at every rename of the commit (the real ``python -m ktlegacy patch`` process kills
  itself with SIGKILL right before its Nth rename: KTLEGACY_TEST_KILL_AT=rename:N), and at the
  first, middle and last staged-file creation and backup removal: the next ``patch`` says in one
  line that it finished or undid the interrupted commit, and ends in exactly the tree a clean
  patch gives (every file's hash and mode, every directory, no stray file);
* a write that fails (an immutable file or directory, a read-only directory, a full file
  system): exit 2, one line naming the file and the reason, the tree exactly as it was;
* a symlink that leaves the tree (a file or a directory, at any depth), a write through any
  symlink, a symlinked manifest or journal: refused in one line before anything is written, and
  the files outside keep their hashes.

The failed-write cases that need root (chattr, mounts) skip, saying why, without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ktlegacy.core.overlay import JOURNAL_NAME, MANIFEST_NAME

REPO = Path(__file__).resolve().parent.parent
KILLED = -signal.SIGKILL
LLAMAFILE = "ktransformers/ktransformers_ext/operators/llamafile"


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: files by sha256 and mode, directories by mode, symlinks by target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", st.st_mode)
            else:
                state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode)
    return state


def copy_tree(src: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    return dest


def patch(src: Path, *args: str, kill_at: str | None = None, overlays: Path | None = None):
    env = dict(os.environ)
    env.pop("KTLEGACY_TEST_KILL_AT", None)
    if kill_at:
        env["KTLEGACY_TEST_KILL_AT"] = kill_at
    if overlays:
        env["KTLEGACY_OVERLAYS_DIR"] = str(overlays)
    return subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(src), "--arch", "sm75", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine_state(sdist_tree) -> dict:
    return tree_state(sdist_tree)


@pytest.fixture(scope="module")
def clean(sdist_tree, tmp_path_factory) -> dict:
    """The tree a clean, uninterrupted ``patch`` gives (its state), and what it touched."""
    tree = copy_tree(sdist_tree, tmp_path_factory.mktemp("clean") / "tree")
    proc = patch(tree)
    assert proc.returncode == 0, proc.stderr
    return _changes(tree_state(sdist_tree), tree_state(tree))


def _changes(before: dict, after: dict) -> dict:
    files = sorted(r for r in after if before.get(r) != after[r])
    assert set(before) <= set(after)  # a patch removes nothing
    new = [r for r in files if r not in before]
    regular = [r for r in files if after[r][0] != "dir"]   # new directories are made, not renamed
    return {"state": after, "files": files, "new": new, "regular": regular,
            "new_regular": [r for r in regular if r in new]}


# ---------------------------------------------------------------- killed: the next run finishes it

def _reset(tree: Path, sdist_tree: Path, clean: dict) -> None:
    """A tree in the clean patched state back to pristine: only what the patch changed."""
    for rel in reversed(clean["files"]):  # a new directory after its files
        if rel not in clean["new"]:
            shutil.copy2(sdist_tree / rel, tree / rel)
        elif clean["state"][rel][0] == "dir":
            os.rmdir(tree / rel)
        else:
            os.unlink(tree / rel)


def _kill_then_patch(tree: Path, kill_at: str, clean: dict) -> str:
    """Kill ``patch`` at ``kill_at`` on the pristine ``tree``, run ``patch`` again: the clean
    tree. Returns the line with which the second run reported the recovery ("" if nothing was
    left to recover)."""
    killed = patch(tree, kill_at=kill_at)
    assert killed.returncode == KILLED, (kill_at, killed.returncode, killed.stderr[-2000:])
    again = patch(tree)
    assert again.returncode == 0, (kill_at, again.stderr)
    said = [ln for ln in again.stdout.splitlines() if "interrupted patch" in ln or "killed before" in ln]
    assert len(said) <= 1 and again.stdout.startswith("".join(said)), (kill_at, again.stdout[:2000])
    state = tree_state(tree)
    assert state == clean["state"], (kill_at, sorted(set(state.items()) ^ set(clean["state"].items()))[:6])
    return "".join(said)


def _kill_at_each(sdist_tree: Path, tmp_path: Path, clean: dict, points: list[str]) -> dict[str, str]:
    """:func:`_kill_then_patch` at every point, two at a time (one tree each): {point: recovery line}."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(i: int) -> dict[str, str]:
        tree = copy_tree(sdist_tree, tmp_path / f"tree{i}")
        said = {}
        for point in points[i::2]:
            said[point] = _kill_then_patch(tree, point, clean)
            _reset(tree, sdist_tree, clean)
        return said

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(worker, range(2)))
    return {**results[0], **results[1]}


def test_a_kill_at_every_rename_is_finished_by_the_next_patch(sdist_tree, clean, tmp_path):
    """The commit's renames: the journal (staging), the journal (staged: the commit point), then
    one per file, the manifest last. Killed before the first two, the next run undoes the staging
    and patches; killed after, it rolls the commit forward."""
    n_files = len(clean["regular"])
    assert MANIFEST_NAME in clean["files"] and n_files > 20
    renames = n_files + 2
    said = _kill_at_each(sdist_tree, tmp_path, clean, [f"rename:{n}" for n in range(1, renames + 1)])
    assert len(said) == renames
    for n in range(1, renames + 1):
        want = "removed .ktlegacy-patch-journal.json.tmp" if n == 1 else "undid" if n == 2 else "finished"
        assert want in said[f"rename:{n}"], (n, said[f"rename:{n}"])
    # killed before the last rename: every file is patched but the manifest is not there yet
    tree = copy_tree(sdist_tree, tmp_path / "tree")
    assert patch(tree, kill_at=f"rename:{renames}").returncode == KILLED
    assert not (tree / MANIFEST_NAME).exists() and (tree / JOURNAL_NAME).is_file()
    # one more than the renames counted: the hook saw every rename, and the run completes
    tree = copy_tree(sdist_tree, tmp_path / "tree")
    done = patch(tree, kill_at=f"rename:{renames + 1}")
    assert done.returncode == 0, done.stderr
    assert tree_state(tree) == clean["state"]


def test_a_kill_while_staging_or_cleaning_up_is_finished_by_the_next_patch(sdist_tree, clean, tmp_path):
    """Staged copies and backups (hard links of the pristine files) are created before the
    commit point, backups removed after it: first, middle and last of each, and one past the
    last (the run completes: the hook counted them all)."""
    n, existing = len(clean["regular"]), len(clean["regular"]) - len(clean["new_regular"])
    creates = 2 + n + existing       # the journal twice, a staged copy per file, a backup per existing file
    unlinks = existing + 1           # the backups, then the journal
    points = [f"{kind}:{k}" for kind, total in (("create", creates), ("unlink", unlinks))
              for k in sorted({1, 2, total // 2, total})]
    said = _kill_at_each(sdist_tree, tmp_path, clean, points)
    assert said.pop("create:1") == ""  # killed before the journal existed: nothing was written
    for point, line in said.items():  # a staged copy, a backup, the "staged" journal: before the commit point
        assert ("finished" if point.startswith("unlink") else "undid") in line, (point, line)
    for kind, total in (("create", creates), ("unlink", unlinks)):
        tree = copy_tree(sdist_tree, tmp_path / "tree")
        assert patch(tree, kill_at=f"{kind}:{total + 1}").returncode == 0
        assert tree_state(tree) == clean["state"]


NEW_FILES_OVERLAY = '''
from ktlegacy.core.overlay import Overlay

class NewFiles(Overlay):
    name = "test-new-files"
    summary = "writes files that do not exist yet, in directories that do not exist yet, and edits setup.py"

    def apply(self, tree, ctx):
        tree.write("ktransformers/ktransformers_ext/cuda/ktlegacy_test/sm75/kernel.cu", "// new\\n", "new kernel")
        tree.write("ktransformers/ktransformers_ext/cuda/ktlegacy_test/README", "new\\n", "new readme")
        tree.replace("setup.py", "import os", "import os  # ktlegacy test")

OVERLAY = NewFiles()
'''


@pytest.fixture(scope="module")
def new_files_overlay(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("overlays")
    (directory / "10_new_files.py").write_text(textwrap.dedent(NEW_FILES_OVERLAY))
    return directory


def test_files_and_directories_a_commit_creates_are_rolled_back_or_forward(sdist_tree, pristine_state,
                                                                          new_files_overlay, tmp_path):
    """New files (journal: "absent") in new directories: killed before the commit point, the
    next ``patch --check`` removes them and the directories (the untouched tree); after it,
    finishes them. Then ``patch`` gives the clean result."""
    tree = copy_tree(sdist_tree, tmp_path / "tree")
    assert patch(tree, overlays=new_files_overlay).returncode == 0
    want = _changes(pristine_state, tree_state(tree))
    assert {"ktransformers/ktransformers_ext/cuda/ktlegacy_test",
            "ktransformers/ktransformers_ext/cuda/ktlegacy_test/sm75"} <= set(want["new"])
    _reset(tree, sdist_tree, want)
    for kill_at, rolled in [("mkdir:1", "undid"), ("mkdir:2", "undid"), ("create:4", "undid"),
                            ("rename:2", "undid"), ("rename:3", "finished"), ("rename:4", "finished"),
                            ("rename:6", "finished"), ("unlink:1", "finished")]:
        assert patch(tree, kill_at=kill_at, overlays=new_files_overlay).returncode == KILLED, kill_at
        check = patch(tree, "--check", overlays=new_files_overlay)
        assert check.returncode == 0 and rolled in check.stdout.splitlines()[0], (kill_at, check.stdout[:500])
        assert tree_state(tree) == (pristine_state if rolled == "undid" else want["state"]), kill_at
        assert patch(tree, overlays=new_files_overlay).returncode == 0
        assert tree_state(tree) == want["state"], kill_at
        _reset(tree, sdist_tree, want)


def test_the_hook_sits_before_every_rename_the_process_makes(sdist_tree, clean, tmp_path):
    """strace counts the rename system calls of a clean run: as many as the hook counts."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (apt-get install strace)")
    tree = copy_tree(sdist_tree, tmp_path / "tree")
    log = tmp_path / "strace.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=rename,renameat,renameat2", "-o", str(log),
                           sys.executable, "-m", "ktlegacy", "patch", "--src", str(tree), "--arch", "sm75"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    calls = [ln for ln in log.read_text().splitlines() if "rename" in ln]
    assert len(calls) == len(clean["regular"]) + 2, calls
    assert calls[-1].count(MANIFEST_NAME) == 2  # the manifest, which says "patched", is the last rename


# ---------------------------------------------------------------- a failed write is undone

def _chattr(flag: str, path: Path):
    proc = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here ({proc.stderr.strip()}): needs root on ext4/xfs/btrfs")


@pytest.fixture
def tree(sdist_tree, tmp_path):
    root = copy_tree(sdist_tree, tmp_path / "tree")
    yield root
    subprocess.run(["chattr", "-R", "-i", str(root)], capture_output=True)


@pytest.mark.parametrize("rel", ["setup.py", "ktransformers/server/main.py", "ktransformers/operators/linear.py"])
def test_an_immutable_file_is_refused_and_the_files_already_replaced_are_put_back(tree, pristine_state, rel):
    _chattr("+i", tree / rel)
    line = one_error_line(patch(tree))
    assert line.startswith(f"error: cannot replace {rel}: Operation not permitted; ") and "put back" in line, line
    subprocess.run(["chattr", "-i", str(tree / rel)], check=True)
    assert tree_state(tree) == pristine_state


def test_a_failed_write_removes_the_files_and_directories_it_created(tree, pristine_state, new_files_overlay):
    _chattr("+i", tree / "setup.py")  # renamed after the new files: they are in place, then undone
    line = one_error_line(patch(tree, overlays=new_files_overlay))
    assert line.startswith("error: cannot replace setup.py: Operation not permitted; the 2 files already "
                           "replaced were put back"), line
    subprocess.run(["chattr", "-i", str(tree / "setup.py")], check=True)
    assert tree_state(tree) == pristine_state


def test_an_immutable_directory_is_refused_untouched(tree, pristine_state):
    _chattr("+i", tree / "ktransformers/server")
    line = one_error_line(patch(tree))
    # the first file the commit writes in that directory (args.py, main.py: overlays 80)
    assert re.match(r"error: cannot write ktransformers/server/[\w.]+\.py: Operation not permitted; ", line), line
    subprocess.run(["chattr", "-i", str(tree / "ktransformers/server")], check=True)
    assert tree_state(tree) == pristine_state


@contextlib.contextmanager
def _read_only(directory: Path):
    """``directory`` read-only: a read-only bind mount as root (root ignores mode bits), else mode 555."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            directory.chmod(0o755)
        return
    mount = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {mount.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("rel", ["ktransformers/operators", "."])
def test_a_read_only_directory_is_refused_untouched(tree, pristine_state, rel):
    with _read_only(tree / rel) as why:
        line = one_error_line(patch(tree))
    if rel == ".":  # the tree's root: not even the journal can be written
        assert line.startswith(f"error: cannot write the patch journal {tree / JOURNAL_NAME}: {why}; "), line
    else:
        assert line.startswith(f"error: cannot write {rel}/") and f": {why}; " in line, line
    assert tree_state(tree) == pristine_state


def test_a_full_file_system_is_refused_untouched(sdist_tree, pristine_state, tmp_path):
    """A tmpfs just large enough for the tree and 200 KiB more: the staged copies do not fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = sum(p.stat().st_size // 4096 * 4096 + 8192 for p in sdist_tree.rglob("*")) + (1 << 20)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        tree = copy_tree(sdist_tree, mnt / "tree")
        st = os.statvfs(mnt)
        with open(mnt / "filler", "wb") as fh:  # leave 200 KiB: the journal fits, the staged files do not
            fh.write(b"\0" * max(st.f_bavail * st.f_frsize - 200 * 1024, 0))
        line = one_error_line(patch(tree))
        assert line.startswith("error: cannot write ") and ": No space left on device; " in line, line
        assert tree_state(tree) == pristine_state
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------- nothing outside the tree

def _outside_copy(tree: Path, rel: str, outside: Path) -> Path:
    """Move ``rel`` out of the tree and leave a symlink to it in its place."""
    target = outside / Path(rel).name
    shutil.move(str(tree / rel), str(target))
    os.symlink(target, tree / rel)
    return target


@pytest.mark.parametrize("rel, read", [
    ("setup.py", "setup.py"),                                                  # a file, at the top
    ("ktransformers/operators/linear.py", "ktransformers/operators/linear.py"),  # a file, deeper
    ("ktransformers/server", "ktransformers/server/"),                         # a directory
    (LLAMAFILE, f"{LLAMAFILE}/moe.cpp"),                                       # a directory, 4 deep
])
@pytest.mark.parametrize("ref", [None, "0.2.1.post1"])  # detected (fingerprint) or forced (overlays read it)
def test_a_symlink_out_of_the_tree_is_refused_before_anything_is_written(tree, tmp_path, rel, read, ref):
    outside = tmp_path / "outside"
    outside.mkdir()
    _outside_copy(tree, rel, outside)
    before_out, before_in = hashes(outside), tree_state(tree)
    line = one_error_line(patch(tree, *(["--ref", ref] if ref else [])))
    assert line.startswith(f"error: refusing to read {read}") and f": {rel} is a symlink to {outside}" in line \
        and "outside the tree" in line, line
    assert hashes(outside) == before_out
    assert tree_state(tree) == before_in


def test_a_write_through_a_symlink_inside_the_tree_is_refused(tree):
    (tree / "setup.py").rename(tree / "setup-real.py")
    os.symlink("setup-real.py", tree / "setup.py")
    before = tree_state(tree)
    for args in ((), ("--check",)):
        line = one_error_line(patch(tree, *args))
        assert line == ("error: refusing to write setup.py: setup.py is a symlink to setup-real.py; patch never "
                        "writes through a symlink (replace it with the real file or directory); nothing was written")
        assert tree_state(tree) == before


def test_a_new_file_under_a_symlinked_directory_is_refused(tree, tmp_path, new_files_overlay):
    outside = tmp_path / "outside"
    outside.mkdir()
    _outside_copy(tree, "ktransformers/ktransformers_ext/cuda", outside)
    before_out, before_in = tree_state(outside), tree_state(tree)
    line = one_error_line(patch(tree, overlays=new_files_overlay))
    assert line.startswith("error: refusing to read ktransformers/ktransformers_ext/cuda: "
                           f"ktransformers/ktransformers_ext/cuda is a symlink to {outside}/cuda, outside the tree"), line
    assert tree_state(outside) == before_out and tree_state(tree) == before_in


@pytest.mark.parametrize("name", [MANIFEST_NAME, JOURNAL_NAME])
def test_a_symlinked_manifest_or_journal_is_refused(tree, tmp_path, name):
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({"ref": "0.2.1.post1", "arch": "sm75", "version": 1, "state": "staged",
                                   "dirs": [], "files": []}))
    os.symlink(planted, tree / name)
    before, planted_hash = tree_state(tree), hashlib.sha256(planted.read_bytes()).hexdigest()
    for args in ((), ("--check",)):
        line = one_error_line(patch(tree, *args))
        assert line.startswith(f"error: refusing {tree / name}: the ") and f"is a symlink (to {planted})" in line, line
    assert tree_state(tree) == before
    assert hashlib.sha256(planted.read_bytes()).hexdigest() == planted_hash


@pytest.mark.parametrize("path", ["../outside.py", "/etc/hostname", "ktransformers/link/x.py"])
def test_a_journal_naming_a_path_outside_the_tree_is_refused(tree, tmp_path, path):
    (tmp_path / "outside.py").write_text("outside\n")
    os.symlink(tmp_path, tree / "ktransformers/link")
    journal = {"version": 1, "state": "staged", "dirs": [],
               "files": [{"path": path, "before": None, "after": "0" * 64, "staged": "x.new", "backup": None}]}
    (tree / JOURNAL_NAME).write_text(json.dumps(journal))
    before = tree_state(tree)
    line = one_error_line(patch(tree))
    assert f"{path!r} is not a path inside the tree" in line or "is a symlink" in line, line
    assert tree_state(tree) == before and (tmp_path / "outside.py").read_text() == "outside\n"


def test_a_second_patch_is_refused_while_one_runs(tree, pristine_state):
    """A run holds the tree's lock from before it reads a journal to after its commit: a second
    run (which would otherwise take the first one's commit in progress for a killed one) is
    refused in one line."""
    import fcntl
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        line = one_error_line(patch(tree))
        assert line == f"error: another ktlegacy patch is running on {tree}; wait for it to finish", line
    finally:
        os.close(fd)
    assert tree_state(tree) == pristine_state
    assert patch(tree).returncode == 0
