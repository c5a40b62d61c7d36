"""compose/serve.sh starts every profile's default rule file at every supported ref, and refuses each
bad setting in one line; the doctor says the same from compose/.env (issue 20).

serve.sh runs outside Docker with /bin/sh (dash, as the image runs it): its files laid out as
compose.yaml mounts them (serve.sh, ktlegacy/serving.py, ktlegacy/core/facts.py under a scratch
/opt/ktlegacy-compose), the service's environment from compose.yaml, the model mounts pointed
elsewhere with KTLEGACY_MODELS_MOUNT, ``python3`` the suite's interpreter with the patched tree on
PYTHONPATH (what the image has installed), and a stand-in ``ktransformers`` first on PATH that
records the command line serve.sh execs. The sdist ref runs everywhere (CI); the git refs where
KTLEGACY_TAG_TREES names their exports (they skip otherwise, like the other tag tests).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ktlegacy.doctor import FAIL, OK, RuleText, doctor, read_rules, row_rules
from ktlegacy.core.facts import REFS, SETTINGS, SM80_ONLY_OPS
from ktlegacy.hostfacts import HostFacts
from ktlegacy.profiles import PROFILES, read_settings, spec_defaults
from ktlegacy.serving import OWN_FLAGS, RuleFileError, check_rules, server_args, validate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from serve_proof import compose_env  # noqa: E402  (compose.yaml's service environment, empty .env)

RULES_DIR = "ktransformers/optimize/optimize_rules"
MOUNT_ROOT = "/opt/ktlegacy-compose/"
ERROR = "ktlegacy serve: error: "

STAND_IN = """#!/bin/sh
# the server, as serve.sh execs it: record the command line, one word per line
for word in "$@"; do printf '%s\\n' "$word"; done > "$KTLEGACY_TEST_ARGV"
"""


def compose_spec() -> dict:
    return yaml.safe_load((REPO / "compose" / "compose.yaml").read_text())


@pytest.fixture
def serve(tmp_path):
    """Run serve.sh for a profile the way its compose service does; returns (process, argv or None)."""
    spec = compose_spec()
    opt = tmp_path / "opt-ktlegacy-compose"
    for mount in spec["x-model-mounts"]:          # serve.sh and the files it needs, where compose puts them
        if mount["type"] == "bind" and mount["target"].startswith(MOUNT_ROOT):
            dest = opt / mount["target"][len(MOUNT_ROOT):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "compose" / mount["source"], dest)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ktransformers").write_text(STAND_IN)
    (tmp_path / "bin" / "ktransformers").chmod(0o755)
    (tmp_path / "bin" / "python3").symlink_to(sys.executable)
    models = tmp_path / "models"
    (models / "hf").mkdir(parents=True)
    (models / "hf" / "config.json").write_text("{}")
    (models / "gguf").mkdir()
    (models / "gguf" / "m.gguf").write_bytes(b"GGUF")

    def run(profile: str, tree: Path, **env):
        shell, script = spec["services"][profile]["entrypoint"]
        assert shell == "/bin/sh" and script.startswith(MOUNT_ROOT)
        argv = tmp_path / "argv"
        argv.unlink(missing_ok=True)
        full = {**compose_env(profile), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(tree),
                "HOME": str(tmp_path / "home"), "KTLEGACY_STATE_DIR": str(tmp_path / "state"),
                "KTLEGACY_MODELS_MOUNT": str(models), "KTLEGACY_TEST_ARGV": str(argv), **env}
        proc = subprocess.run([shell, str(opt / script[len(MOUNT_ROOT):])], env=full, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        return proc, (argv.read_text().splitlines() if argv.exists() else None)
    run.models = models
    run.state = tmp_path / "state"
    return run


def expected_argv(serve, rule_path: Path, extra=(), **values) -> list[str]:
    v = {n: SETTINGS[n].default for n in ("KTLEGACY_MODEL_NAME", "KTLEGACY_CPU_INFER", "KTLEGACY_MAX_NEW_TOKENS",
                                          "KTLEGACY_CACHE_LENS")}
    v.update(values)
    return [*extra, "--host", "0.0.0.0", "--port", "10002",
            "--model_path", f"{serve.models}/hf", "--gguf_path", f"{serve.models}/gguf",
            "--optimize_config_path", str(rule_path), "--model_name", v["KTLEGACY_MODEL_NAME"],
            "--cpu_infer", v["KTLEGACY_CPU_INFER"], "--max_new_tokens", v["KTLEGACY_MAX_NEW_TOKENS"],
            "--cache_lens", v["KTLEGACY_CACHE_LENS"], "--log_dir", f"{serve.state}/logs", "--db_host", str(serve.state)]


# --- every profile's default rule file, at every supported ref -------------------------------------

@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("ref", list(REFS))
def test_serve_sh_starts_each_profile_default_rule_file(ref, profile, patched_tree, serve):
    p = PROFILES[profile]
    tree = patched_tree(ref, p.arch_name)
    rule = tree / RULES_DIR / p.rules
    # every supported ref ships each profile's default (checked against /work/tags: all do); if a
    # future one does not, serve.sh and the doctor refuse it in one line (test below)
    assert rule.is_file(), f"{ref} has no {p.rules}"
    proc, argv = serve(profile, tree)
    assert proc.returncode == 0, proc.stderr
    assert argv == expected_argv(serve, rule), proc.stderr
    # the doctor's rule row, on the same file, by the same code
    row = row_rules(spec_defaults(p), read_rules(spec_defaults(p), None, None, rules_file=rule))
    assert row.status == OK and "no sm80+ op" in row.detail, row


def test_the_t4x4_default_keeps_upstreams_commented_marlin_lines(patched_tree):
    """What a text search tripped over: the patched 4-GPU file still has Marlin in comments only."""
    text = (patched_tree("0.2.1.post1", "sm75") / RULES_DIR / PROFILES["t4x4"].rules).read_text()
    commented = [ln for ln in text.splitlines() if "Marlin" in ln]
    assert commented and all(ln.lstrip().startswith("#") for ln in commented)
    ops = {op for _, _, op in check_rules(text, "x")}
    assert {"KLinearGGUF", "KExpertsCPU"} <= ops and not ops & set(SM80_ONLY_OPS)


def test_a_rule_file_the_image_lacks_is_one_line(patched_tree, serve):
    tree = patched_tree("0.2.1.post1", "sm75")
    proc, argv = serve("t4x4", tree, KTLEGACY_RULES="DeepSeek-V9-Chat.yaml")
    assert proc.returncode == 2 and argv is None
    assert proc.stderr.strip().splitlines() == [
        f"{ERROR}rule file {tree / RULES_DIR}/DeepSeek-V9-Chat.yaml does not exist: set KTLEGACY_RULES to a file of "
        "the image's optimize_rules directory or an absolute path"]
    spec = spec_defaults(PROFILES["t4x4"])
    missing = RuleText(None, f"{spec.image} has no rule file X.yaml in its optimize_rules directory", missing=True)
    row = row_rules(spec, missing)
    assert row.status == FAIL and "KTLEGACY_RULES" in row.fix


# --- the rule check reads YAML -----------------------------------------------------------------------

@pytest.mark.parametrize("text, bad", [
    ("- match: {name: x}\n  replace: {class: a.KTransformersLinear, kwargs: {generate_op: KLinearMarlin}}\n",
     "KLinearMarlin"),
    ("- match:\n    name: x\n  replace:\n    class: a.KTransformersExperts\n    kwargs:\n"
     "      prefill_op: KExpertsTorch\n      generate_op: 'KExpertsMarlin'  # a comment\n", "KExpertsMarlin"),
    ("- match: {name: x}\n  replace: {class: ktransformers.operators.linear.KLinearFP8}\n", "KLinearFP8"),
    ("- match: {name: x}\n  replace: {kwargs: {prefill_op: VLinearMarlin}}\n", "VLinearMarlin"),
])
def test_an_active_sm80_op_is_refused(text, bad, tmp_path, serve, patched_tree):
    with pytest.raises(RuleFileError) as exc:
        check_rules(text, "Mine.yaml")
    assert f"selects sm80+ op(s) {bad} (1x, first in rule 1)" in exc.value.problem
    # the same refusal from serve.sh, for a rule file the user mounts
    (tmp_path / "Mine.yaml").write_text(text)
    proc, argv = serve("v100", patched_tree("0.2.1.post1", "sm70"), KTLEGACY_RULES=str(tmp_path / "Mine.yaml"))
    assert proc.returncode == 2 and argv is None
    assert proc.stderr.strip().splitlines() == [ERROR + exc.value.line.replace("Mine.yaml", str(tmp_path / "Mine.yaml"))]


def test_comments_and_match_patterns_are_not_ops():
    text = ("# - match: {name: x}\n#   replace: {kwargs: {generate_op: KLinearMarlin}}\n"
            "- match: {class: KLinearMarlin, name: 'KExpertsMarlin'}   # generate_op: KLinearFP8\n"
            "  replace: {class: a.KTransformersLinear, kwargs: {generate_op: KLinearTorch, prefill_op: KLinearTorch}}\n")
    assert check_rules(text, "x") == [(1, "class", "KTransformersLinear"), (1, "generate_op", "KLinearTorch"),
                                      (1, "prefill_op", "KLinearTorch")]


@pytest.mark.parametrize("text, problem", [
    ("- match: {name: x\n", "rule file x.yaml is not valid YAML at line 2"),
    ("match: {name: x}\n", "rule file x.yaml is not a list of rules"),
])
def test_a_broken_rule_file_is_one_line(text, problem):
    with pytest.raises(RuleFileError) as exc:
        check_rules(text, "x.yaml")
    assert exc.value.problem.startswith(problem) and "\n" not in exc.value.line


def test_upstreams_own_files_are_refused_and_the_overlay_rewrites_what_the_check_forbids(sdist_tree):
    """The forbidden ops are the overlay's: what torch-linear-rules rewrites includes every op the check
    refuses (and KLinearTorch, which it rewrites to KLinearGGUF too), and none it writes is refused."""
    from ktlegacy.core.overlay import load_overlays
    (overlay,) = [o for o, _ in load_overlays() if o.name == "torch-linear-rules"]
    equivalent = sys.modules[type(overlay).__module__].TORCH_EQUIVALENT
    assert set(equivalent) == set(SM80_ONLY_OPS) | {"KLinearTorch"}
    assert not set(equivalent.values()) & set(SM80_ONLY_OPS)
    for profile in PROFILES.values():
        with pytest.raises(RuleFileError, match="selects sm80"):
            check_rules((sdist_tree / RULES_DIR / profile.rules).read_text(), profile.rules)


# --- settings: one line each, from serve.sh and from the doctor --------------------------------------

BAD_SERVER_SETTINGS = [   # what reaches the container; the list
    ("KTLEGACY_CACHE_LENS", "abc", "is not a whole number >= 1"),
    ("KTLEGACY_CPU_INFER", "0", "is not a whole number >= 1"),
    ("KTLEGACY_CPU_INFER", "-4", "is not a whole number >= 1"),
    ("KTLEGACY_CPU_INFER", "lots", "is not a whole number >= 1"),
    ("KTLEGACY_MAX_NEW_TOKENS", "0", "is not a whole number >= 1"),
    ("KTLEGACY_MAX_NEW_TOKENS", "-1", "is not a whole number >= 1"),
    ("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "1k", "is not auto or a whole number >= 0"),
    ("KTLEGACY_SERVER_ARGS", "--web True --port 9", "has '--port', a flag ktlegacy sets itself"),
    ("KTLEGACY_SERVER_ARGS", "--host=0.0.0.0", "has '--host=0.0.0.0', a flag ktlegacy sets itself"),
    ("KTLEGACY_SERVER_ARGS", "--cache_len 5", "has '--cache_len', which argparse takes for --cache_lens, a flag"),
    ("KTLEGACY_SERVER_ARGS", "--model_dir /x", "has '--model_dir', a flag ktlegacy sets itself"),
    ("KTLEGACY_SERVER_ARGS", "--optimize_config_path /r.yaml", "has '--optimize_config_path', a flag"),
    ("KTLEGACY_SERVER_ARGS", "--system_prompt 'unclosed", "cannot be split into flags (No closing quotation)"),
]


@pytest.mark.parametrize("name, value, problem", BAD_SERVER_SETTINGS)
def test_serve_sh_refuses_a_bad_setting_in_one_line(name, value, problem, serve, patched_tree):
    proc, argv = serve("t4x4", patched_tree("0.2.1.post1", "sm75"), **{name: value})
    assert proc.returncode == 2 and argv is None, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(ERROR + name) and problem in line and "compose/.env" in line
    assert repr(value) in line or "KTLEGACY_SERVER_ARGS has" in line


def test_server_args_are_split_like_a_shell_line_without_globbing(serve, patched_tree, tmp_path):
    (tmp_path / "a-file").write_text("")   # cwd of serve.sh: a glob would expand to it
    tree = patched_tree("0.2.1.post1", "sm75")
    args = "--web True --system_prompt 'be * brief' * /* --mode normal"
    proc, argv = serve("t4x4", tree, KTLEGACY_SERVER_ARGS=args, KTLEGACY_CPU_INFER=" 12 ")
    assert proc.returncode == 0, proc.stderr
    extra = ["--web", "True", "--system_prompt", "be * brief", "*", "/*", "--mode", "normal"]
    assert argv == expected_argv(serve, tree / RULES_DIR / PROFILES["t4x4"].rules, extra, KTLEGACY_CPU_INFER="12")


def test_every_flag_serve_sh_sets_is_refused_in_server_args(serve, patched_tree):
    proc, argv = serve("v100", patched_tree("0.2.1.post1", "sm70"))
    assert proc.returncode == 0, proc.stderr
    ours = [w for w in argv if w.startswith("--")]
    assert set(ours) == set(OWN_FLAGS) - {"--model_dir"}     # --model_dir: upstream's alias of --model_path
    for flag in OWN_FLAGS:
        for text in (f"{flag} x", f"{flag}=x", f"--web True {flag[:-1]} x"):
            _, errors = validate({"KTLEGACY_SERVER_ARGS": text})
            assert len(errors) == 1 and "a flag ktlegacy sets itself" in errors[0].problem, text


@pytest.mark.parametrize("ref", list(REFS))
def test_upstreams_other_flags_pass(ref, patched_tree):
    """No flag of upstream's server that ktlegacy leaves alone is refused (argparse's exact-match rule:
    --mode is its own flag, not an abbreviation of --model_name)."""
    args = (patched_tree(ref, "sm75") / "ktransformers" / "server" / "args.py").read_text()
    flags = set(re.findall(r"""add_argument\(\s*["'](--\w+)""", args))
    assert {"--port", "--cache_lens", "--mode", "--web"} <= flags and len(flags) > 40
    for flag in sorted(flags - set(OWN_FLAGS)):
        assert server_args(f"{flag} 1") == [flag, "1"]


def test_compose_only_settings_are_checked_too():
    """Port, address, GPU ids and choices: compose consumes them, the doctor checks them."""
    cases = {"KTLEGACY_PORT": ("70000", "notaport", "0"), "KTLEGACY_SMOKE_PORT": ("-1",),
             "KTLEGACY_BIND": ("localhost", "1.2.3"), "KTLEGACY_GPU_0": ("abc", "GPU 0"),
             "KTLEGACY_CPU": ("AVX2", "sse"), "KTLEGACY_REF": ("v9",), "KTLEGACY_RESTART": ("sometimes",)}
    for name, values in cases.items():
        for value in values:
            _, errors = validate({name: value})
            assert len(errors) == 1 and errors[0].problem.startswith(f"{name}={value!r} is not"), (name, value)
            assert "\n" not in errors[0].line and f"set {name} in compose/.env" in errors[0].fix
    good = {"KTLEGACY_PORT": "65535", "KTLEGACY_BIND": "::1", "KTLEGACY_GPU_0": "GPU-0f6e1a52-aa", "KTLEGACY_GPU_1": "1",
            "KTLEGACY_CPU": "avx512", "KTLEGACY_REF": "v0.3.2", "KTLEGACY_CACHE_LENS": "", "KTLEGACY_SERVER_ARGS": ""}
    values, errors = validate(good)
    assert errors == [] and values["KTLEGACY_CACHE_LENS"] == "8192"


def test_duplicate_gpu_ids_are_refused_for_every_profile():
    """compose checks every service's device list, even for a profile it does not start: GPU_0=3 for
    the 1-GPU v100 profile repeats GPU_3's default and compose refuses the file (checked against
    compose below)."""
    env = {"KTLEGACY_GPU_0": "0", "KTLEGACY_GPU_1": "0", "KTLEGACY_GPU_3": "GPU-a", "KTLEGACY_GPU_2": "GPU-a"}
    assert [e.problem for e in validate(env)[1]] == [
        "KTLEGACY_GPU_1='0' names the same GPU as KTLEGACY_GPU_0", "KTLEGACY_GPU_3='GPU-a' names the same GPU as KTLEGACY_GPU_2"]
    (error,) = validate({"KTLEGACY_GPU_0": "3"})[1]
    assert error.problem == "KTLEGACY_GPU_3='3' names the same GPU as KTLEGACY_GPU_0"
    assert "also those the profile does not use" in error.fix
    assert validate({"KTLEGACY_GPU_0": "3", "KTLEGACY_GPU_3": "0"})[1] == []


def test_settings_are_read_as_compose_reads_them(tmp_path):
    """compose/.env, then a root .env over it, then the shell over both; quotes and comments as
    dotenv files have them (tests/test_compose.py::test_doctor_reads_env_files_as_compose_does
    checks the same against compose itself)."""
    (tmp_path / "compose.env").write_text("KTLEGACY_PORT=111\nKTLEGACY_CPU_INFER=5  # threads\nOTHER=1\n"
                                          "KTLEGACY_SERVER_ARGS=\"--web True --system_prompt 'a b'\"\n")
    (tmp_path / "root.env").write_text("KTLEGACY_PORT=222\nKTLEGACY_CACHE_LENS=\n")
    got = read_settings({"KTLEGACY_CPU_INFER": "7", "PATH": "/bin"},
                        [tmp_path / "compose.env", tmp_path / "root.env", tmp_path / "absent.env"])
    assert got == {"KTLEGACY_PORT": "222", "KTLEGACY_CPU_INFER": "7", "KTLEGACY_CACHE_LENS": "",
                   "KTLEGACY_SERVER_ARGS": "--web True --system_prompt 'a b'"}
    assert server_args(got["KTLEGACY_SERVER_ARGS"]) == ["--web", "True", "--system_prompt", "a b"]


BAD_FOR_THE_DOCTOR = [(n, v) for n, v, _ in BAD_SERVER_SETTINGS] + [
    ("KTLEGACY_PORT", "70000"), ("KTLEGACY_PORT", "notaport"), ("KTLEGACY_GPU_1", "0"), ("KTLEGACY_GPU_0", "abc")]


@pytest.fixture
def clean_settings(monkeypatch):
    """No KTLEGACY_* from the developer's shell; compose/.env of this checkout is read as users have it."""
    for key in [k for k in os.environ if k.startswith("KTLEGACY_")]:
        monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("name, value", BAD_FOR_THE_DOCTOR)
def test_the_doctor_refuses_each_bad_setting_in_one_row(name, value, clean_settings):
    clean_settings.setenv(name, value)
    report = doctor("t4x4", facts=HostFacts.load(REPO / "tests" / "fixtures" / "hosts" / "t4-x4"))
    (row,) = [r for r in report.rows if r.check == "settings"]
    _, (error,) = validate({name: value})
    assert row.status == FAIL and row.detail == error.problem and row.fix.endswith(error.fix)
    assert "\n" not in row.detail + row.fix
    # the profile is not judged on values the user did not choose: no model dir/GGUF/VRAM rows
    checks = [r.check for r in report.rows]
    assert not {"model dir", "GGUF", "VRAM per GPU", "port", "image"} & set(checks), report.table()
    compose_rows = [r for r in report.rows if r.check == "compose config"]
    assert all("compose v2 plugin" not in r.fix and "defaults" not in r.detail for r in compose_rows)


@pytest.mark.docker
@pytest.mark.parametrize("profile, name, value, reason", [
    ("t4x4", "KTLEGACY_PORT", "70000", "invalid hostPort: 70000"),
    ("t4x4", "KTLEGACY_GPU_1", "0", "device_ids items at 0 and 1 are equal"),
    ("v100", "KTLEGACY_GPU_0", "3", "services.t4x4.deploy.resources.reservations.devices.0.device_ids items at 0 and 3"),
])
def test_the_doctor_quotes_compose_when_compose_refuses(profile, name, value, reason, docker, clean_settings):
    clean_settings.setenv(name, value)
    host = {"t4x4": "t4-x4", "v100": "v100-x1"}[profile]
    report = doctor(profile, facts=HostFacts.load(REPO / "tests" / "fixtures" / "hosts" / host))
    assert [r.check for r in report.rows[:2]] == ["settings", "compose config"], report.table()
    row = report.rows[1]
    assert row.status == FAIL and row.detail.startswith("docker compose rejected the settings: ")
    assert reason in row.detail


@pytest.mark.parametrize("command", ["doctor", "up"])
def test_no_traceback_from_the_commands(command, clean_settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTLEGACY_")}
    env.update(KTLEGACY_CACHE_LENS="abc", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", command, "--profile", "t4x4"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr
    line = "KTLEGACY_CACHE_LENS='abc' is not a whole number >= 1"
    if command == "doctor":
        assert proc.returncode == 1 and re.search(rf"^settings\s+FAIL\s+{re.escape(line)}$", proc.stdout, re.M)
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith("error: not starting profile t4x4: ")
        assert line in proc.stderr
