""".github/workflows/publish.yml: lints clean (actionlint) and runs our own tasks in the right order.

No Docker here: the workflow runs on GitHub's runners; what it calls (invoke build, smoke,
publish --dry-run --github-output) is tested against real components in tests/test_publish.py
and the build's tests; the push is BuildKit's (by digest), the tags docker buildx imagetools'.
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
from ktlegacy.core.arch import ARCHES

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


def _step_using(steps: list, action: str) -> int:
    (i,) = [i for i, step in enumerate(steps) if (step.get("uses") or "").startswith(action + "@")]
    return i


def test_workflow_builds_smokes_checks_then_pushes_by_digest_then_tags():
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
    (check,) = _steps_running(steps, "invoke publish")
    meta, push = _step_using(steps, "docker/metadata-action"), _step_using(steps, "docker/build-push-action")
    (verify,) = _steps_running(steps, "imagetools inspect")
    (tag,) = _steps_running(steps, "imagetools create")
    assert len(build) == len(smoke) == 1
    assert build[0] < smoke[0] < check < meta < push < verify < tag, \
        "smoke, then our checks, then push by digest, then the check that it is the smoke-tested image, then tags"
    assert "--cache-from" in steps[build[0]]["run"] and "--cache-to" in steps[build[0]]["run"]
    assert not any("docker push" in (s.get("run") or "") for s in steps), "BuildKit pushes, by digest"

    # our checks: labels against this commit, the tag list, latest-* from version tags only
    check_run = steps[check]["run"]
    assert "--dry-run" in check_run and "--github-output" in check_run and '--sha "$GITHUB_SHA"' in check_run
    assert "$MOVING" in check_run and "startsWith(github.ref, 'refs/tags/v')" in steps[check]["env"]["MOVING"]
    tags_id = steps[check]["id"]
    assert steps[meta]["with"]["tags"] == f"${{{{ steps.{tags_id}.outputs.metadata-tags }}}}"

    # push by digest, with the build args invoke build uses, from its cache; no provenance index
    # (the pushed manifest must be the single image that is checked and tagged)
    w = steps[push]["with"]
    assert "push-by-digest=true" in w["outputs"] and "push=true" in w["outputs"]
    assert w["file"] == "images/Dockerfile" and w["target"] == "runtime" and w.get("push") in (None, False)
    assert w["build-args"] == f"${{{{ steps.{tags_id}.outputs.build-args }}}}"
    assert w["provenance"] is False and w["sbom"] is False
    push_id = steps[push]["id"]
    for i in (verify, tag):
        assert f"steps.{push_id}.outputs.digest" in steps[i]["env"]["PUSHED"]
        assert steps[i]["if"] == steps[push]["if"]
    assert f"steps.{steps[meta]['id']}.outputs.tags" in steps[tag]["env"]["TAGS"]

    # every flag the workflow passes to a task exists on that task
    invoke = str(REPO / ".venv/bin/invoke") if (REPO / ".venv/bin/invoke").exists() else "invoke"
    checked = set()
    for i in build + smoke + [check]:
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
            ("publish", "--registry"), ("publish", "--sha"), ("publish", "--dry-run"),
            ("publish", "--github-output")} <= checked


def test_verify_step_compares_layers_and_labels(tmp_path):
    """The check between push and tags: run its script with fake docker commands that answer the
    same or different layers, and see it pass or stop the job."""
    wf = yaml.safe_load(WORKFLOW.read_text())
    (job,) = wf["jobs"].values()
    (step,) = [s for s in job["steps"] if "imagetools inspect" in (s.get("run") or "")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a fake docker: "buildx imagetools inspect" answers $REMOTE_<field>, "image inspect" $LOCAL_<field>
    (bin_dir / "docker").write_text(
        "#!/bin/bash\n"
        'fmt="${@: -1}"; case "$fmt" in *Layers*|*DiffIDs*) f=LAYERS ;; *Labels*) f=LABELS ;; *) exit 3 ;; esac\n'
        'if [ "$1" = buildx ]; then v="REMOTE_$f"; else v="LOCAL_$f"; fi\n'
        'echo "${!v}"\n')
    (bin_dir / "docker").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PUSHED="r/k@sha256:1", IMAGE="l:t",
               LOCAL_LAYERS='["sha256:a"]', REMOTE_LAYERS='["sha256:a"]', LOCAL_LABELS='{"k":"v"}',
               REMOTE_LABELS='{"k":"v"}')

    def run(**over):
        return subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], capture_output=True, text=True,
                              env=dict(env, **over))

    assert run().returncode == 0
    bad = run(REMOTE_LAYERS='["sha256:b"]')
    assert bad.returncode != 0 and "differs from the smoke-tested l:t in RootFS.DiffIDs" in bad.stdout
    assert run(REMOTE_LABELS='{"k":"w"}').returncode != 0


def test_build_args_of_the_push_are_those_of_the_build_step(tmp_path):
    """The push by digest rebuilds from the cache with publish's build-args: the same the Build
    step's invoke build passes (else the pushed image would not be the smoke-tested one)."""
    from ktlegacy.publish import ci_build_args
    words = _build_step_words(tmp_path, "sm70", "AVX512")
    built = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--build-arg")
    assert ci_build_args("0.2.1.post1", "sm70", "AVX512") == built
    assert built["ARCH"] == "sm70" and built["CPU_INSTRUCT"] == "AVX512"


def _build_step_words(tmp_path, arch: str, cpu: str) -> list[str]:
    wf = yaml.safe_load(WORKFLOW.read_text())
    (job,) = wf["jobs"].values()
    (step,) = [s for s in job["steps"] if "invoke build" in (s.get("run") or "")]
    script = step["run"].replace("${{ matrix.arch }}", arch).replace("${{ matrix.cpu }}", cpu)
    assert "${{" not in script
    env = dict(os.environ, KT_REF="0.2.1.post1", RUNNER_TEMP=str(tmp_path),
               CACHE=f"ghcr.io/owner/ktransformers-buildcache:{arch}-{cpu}-0.2.1.post1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script.strip() + " --dry-run"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (command,) = proc.stdout.strip().splitlines()  # one image, one docker command
    return shlex.split(command)


def test_workflow_build_step_runs_invoke_build_with_the_cache(tmp_path):
    """The Build step is one `invoke build` with the registry layer cache: run its script here with
    --dry-run appended (no CUDA build on this machine) and read the docker command it would run."""
    words = _build_step_words(tmp_path, "sm70", "AVX512")
    cache = "ghcr.io/owner/ktransformers-buildcache:sm70-AVX512-0.2.1.post1"
    assert "build" in words and f"{REPO}/images/Dockerfile" in words
    assert "ktlegacy/ktransformers:0.2.1.post1-cu118-sm70-avx512" in words
    assert "ARCH=sm70" in words and "CPU_INSTRUCT=AVX512" in words and "TORCH_CUDA_ARCH_LIST=7.0" in words
    i = words.index("--cache-from")
    assert words[i:i + 4] == ["--cache-from", f"type=registry,ref={cache}",
                              "--cache-to", f"type=registry,ref={cache},mode=max"]
