""".github/workflows/publish.yml: lints clean (actionlint) and runs our own tasks in the right order.

No Docker here: the workflow runs on GitHub's runners; what it calls (invoke build, smoke,
publish) is tested against real components in tests/test_publish.py and the build's tests.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ktlegacy import images
from ktlegacy.arch import ARCHES

REPO = Path(__file__).resolve().parent.parent


def _missing(what: str):
    if os.environ.get("KTLEGACY_ALLOW_SKIP") == "1":
        pytest.skip(what)
    pytest.fail(what + " (run tests/run, which installs it, or KTLEGACY_ALLOW_SKIP=1 to skip)")

# --- the workflow ------------------------------------------------------------------------------

WORKFLOW = REPO / ".github" / "workflows" / "publish.yml"


def _actionlint() -> str:
    for candidate in (Path(sys.executable).parent / "actionlint", shutil.which("actionlint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    _missing("actionlint (pip install -e '.[test]' installs it)")


def test_workflow_passes_actionlint():
    proc = subprocess.run([_actionlint(), "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _steps_running(steps: list, needle: str) -> list[int]:
    return [i for i, step in enumerate(steps) if needle in (step.get("run") or "")]


def test_workflow_builds_smokes_then_publishes_with_our_tasks():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on["push"]["tags"] == ["v*"] and on["push"]["branches"] == ["main"] and "workflow_dispatch" in on
    (job,) = wf["jobs"].values()
    assert job["permissions"]["packages"] == "write"
    matrix = job["strategy"]["matrix"]
    assert matrix["arch"] == ["sm70", "sm75"] and set(matrix["arch"]) <= set(ARCHES)
    assert set(matrix["cpu"]) == {"AVX2", "AVX512"} and set(matrix["cpu"]) <= set(images.CPU_INSTRUCTS)

    steps = job["steps"]
    build, smoke = _steps_running(steps, "invoke build"), _steps_running(steps, "invoke smoke")
    publish = [i for i in _steps_running(steps, "invoke publish") if "--dry-run" not in steps[i]["run"]]
    assert len(build) == len(smoke) == len(publish) == 1
    assert build[0] < smoke[0] < publish[0], "images must pass the smoke tests before they are pushed"
    assert "--cache-from" in steps[build[0]]["run"] and "--cache-to" in steps[build[0]]["run"]
    assert not any("docker push" in (s.get("run") or "") for s in steps), "pushes go through invoke publish"
    push_step = steps[publish[0]]
    assert "--sha" in push_step["run"] and "$MOVING" in push_step["run"]
    assert "startsWith(github.ref, 'refs/tags/v')" in push_step["env"]["MOVING"]  # latest-* from tags only

    # every flag the workflow passes to a task exists on that task
    invoke = str(REPO / ".venv/bin/invoke") if (REPO / ".venv/bin/invoke").exists() else "invoke"
    checked = set()
    for i in build + smoke + _steps_running(steps, "invoke publish"):
        text = steps[i]["run"].replace("\\\n", " ")
        for line in text.split("invoke ")[1:]:
            words = shlex.split(line.split("\n")[0], comments=True)
            task, flags = words[0], {w.split("=")[0] for w in words[1:] if w.startswith("--")}
            helptext = subprocess.run([invoke, "--help", task], capture_output=True, text=True, cwd=REPO).stdout
            assert helptext, f"invoke has no task {task}"
            for flag in flags:
                assert f"{flag}" in helptext, f"invoke {task} has no {flag} (workflow step {steps[i].get('name')})"
                checked.add((task, flag))
    assert {("build", "--arch"), ("build", "--cache-from"), ("build", "--cache-to"), ("smoke", "--arch"),
            ("publish", "--registry"),
            ("publish", "--sha"), ("publish", "--dry-run")} <= checked


def test_workflow_build_step_runs_invoke_build_with_the_cache(tmp_path):
    """The Build step is one `invoke build` with the registry layer cache: run its script here with
    --dry-run appended (no CUDA build on this machine) and read the docker command it would run."""
    wf = yaml.safe_load(WORKFLOW.read_text())
    (job,) = wf["jobs"].values()
    (step,) = [s for s in job["steps"] if "invoke build" in (s.get("run") or "")]
    script = step["run"].replace("${{ matrix.arch }}", "sm70").replace("${{ matrix.cpu }}", "AVX512")
    assert "${{" not in script
    env = dict(os.environ, KT_REF="0.2.1.post1", RUNNER_TEMP=str(tmp_path),
               CACHE="ghcr.io/owner/ktransformers-buildcache:sm70-AVX512-0.2.1.post1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script.strip() + " --dry-run"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (command,) = proc.stdout.strip().splitlines()  # one image, one docker command
    words = shlex.split(command)
    assert "build" in words and f"{REPO}/images/Dockerfile" in words
    assert "ktlegacy/ktransformers:0.2.1.post1-cu118-sm70-avx512" in words
    assert "ARCH=sm70" in words and "CPU_INSTRUCT=AVX512" in words and "TORCH_CUDA_ARCH_LIST=7.0" in words
    i = words.index("--cache-from")
    assert words[i:i + 4] == ["--cache-from", f"type=registry,ref={env['CACHE']}",
                              "--cache-to", f"type=registry,ref={env['CACHE']},mode=max"]
