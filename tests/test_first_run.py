"""What a new user meets first (issue 23 item 5): each bad input or missing piece is one line that
names the cause and the fix, before anything is built; invoke's own refusals read like the CLI's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy import docker, standin
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.facts import ARCHES, arch_choice

REPO = Path(__file__).resolve().parent.parent
INVOKE = str(Path(sys.executable).with_name("invoke"))


def run(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, timeout=120)


def one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["build", "--no-such-flag"], "error: No idea what '--no-such-flag' is! (see: invoke build --help)"),
    (["build", "--arch"], "needed value and was not given"),
    (["no-such-task"], "error: No idea what 'no-such-task' is! (see: invoke --help)"),
])
def test_invokes_own_refusals_are_the_clis_one_line_and_exit_2(args, expected):
    assert expected in one_line(run(INVOKE, *args))


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_max_jobs_below_one_is_refused(jobs):
    line = one_line(run(sys.executable, "-m", "ktlegacy", "build", "--arch", "sm75", f"--max-jobs={jobs}", "--dry-run"))
    assert f"--max-jobs {jobs}" in line and "1 or more" in line


def test_an_unknown_arch_names_all_where_all_is_accepted():
    assert f"use {arch_choice('all')}" in one_line(run(sys.executable, "-m", "ktlegacy", "build", "--arch", "sm60",
                                                   "--dry-run"))
    # patch takes one arch: no "all" there
    assert f"use one of {', '.join(ARCHES)}" in one_line(run(sys.executable, "-m", "ktlegacy", "patch", "--src", ".",
                                                   "--arch", "sm60"))


@pytest.mark.parametrize("argv", [["fetch-source", "--ref", "v9.9.9", "--dest", "/nonexistent/h23"],
                                  ["build", "--arch", "sm75", "--ref", "v9", "--dry-run"]])
def test_an_unknown_ref_suggests_flags_that_exist(argv):
    line = one_line(run(sys.executable, "-m", "ktlegacy", *argv))
    assert "unknown ktransformers ref" in line and "--src" not in line
    assert "--git-url URL" in line and "--local DIR" in line


def test_a_file_is_not_a_tree_nor_a_dest(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    assert f"--src {f} is a file" in one_line(run(sys.executable, "-m", "ktlegacy", "patch", "--src", str(f),
                                                   "--arch", "sm75"))
    assert f"--dest {f} is a file" in one_line(run(sys.executable, "-m", "ktlegacy", "fetch-source", "--dest", str(f)))
    assert f.read_text() == ""


def test_no_docker_names_the_install_step(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))                       # no docker, no dockerd on PATH
    monkeypatch.setattr(docker, "_candidates", lambda: [])
    docker.client.cache_clear()
    try:
        with pytest.raises(KtlegacyError, match=r"Docker is not installed: run sudo tests/host-setup"):
            docker.client()
    finally:
        docker.client.cache_clear()
    if not Path("/usr/bin/dockerd").is_file():
        assert "no Docker engine on this machine" in str(docker._no_daemon("Cannot connect"))
    else:   # installed (this machine): the other cause, with its own fix
        assert "installed but not running" in str(docker._no_daemon("Cannot connect"))
    assert "start dockerd" not in str(docker._no_client())


def test_debian_rootfs_says_when_it_does_not_use_the_mirror(tmp_path, capsys):
    tarball = tmp_path / f"standin-{standin.SUITE}-{'-'.join(sorted(standin.PACKAGES))}.tar"
    tarball.write_bytes(b"")
    tarball.with_suffix(".mirror").write_text("http://deb.debian.org/debian\n")
    assert standin.rootfs_tarball(tmp_path, mirror="http://mirror.example/debian") == tarball
    err = capsys.readouterr().err
    assert "note: --mirror http://mirror.example/debian not used" in err and "made from http://deb.debian.org/debian" in err
    standin.rootfs_tarball(tmp_path, mirror="http://deb.debian.org/debian")
    standin.rootfs_tarball(tmp_path)
    assert capsys.readouterr().err == ""

