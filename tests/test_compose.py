"""compose/compose.yaml: every profile resolved by the real ``docker compose config``, asserted
structurally; serve.sh run in a container; the no-GPU smoke profile brought up for real."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ktlegacy.images import DEFAULT_CPU_INSTRUCT, image_tag
from ktlegacy.core.arch import get_arch
from ktlegacy.profiles import CONTAINER_PORT, PROFILES, SMOKE_PROFILE, spec_defaults, spec_from_config
from ktlegacy.core.refs import DEFAULT_REF

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.docker


def clean_env(**extra) -> dict:
    """The environment without any KTLEGACY_* a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTLEGACY_")}
    env.update(extra)
    return env


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the root compose.yaml + compose/ (no user .env), so defaults are what is tested."""
    shutil.copy(REPO / "compose.yaml", tmp_path / "compose.yaml")
    shutil.copytree(REPO / "compose", tmp_path / "compose", ignore=shutil.ignore_patterns(".env"))
    return tmp_path


def config(docker, cwd: Path, profile: str, **env) -> dict:
    proc = subprocess.run([docker.path, "compose", "--profile", profile, "config", "--format", "json"],
                          cwd=cwd, capture_output=True, text=True, env=clean_env(**env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", list(PROFILES))
def test_gpu_profile_resolves(docker, project, name):
    profile = PROFILES[name]
    cfg = config(docker, project, name)
    assert list(cfg["services"]) == [name]          # a profile starts only its own service
    s = cfg["services"][name]
    # GPUs: an NVIDIA device reservation with exactly the profile's count
    (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert dev["device_ids"] == [str(i) for i in range(profile.gpus)]
    # image: the tag scheme of ktlegacy/images.py, the profile's arch
    assert s["image"] == image_tag(DEFAULT_REF, get_arch(profile.arch_name), DEFAULT_CPU_INSTRUCT)
    assert f"-{profile.arch_name}-" in s["image"]
    env = s["environment"]
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["KTLEGACY_RULES"] == profile.rules and env["KTLEGACY_PROFILE"] == name
    assert env["KTLEGACY_CPU_INFER"] == "10" and env["KTLEGACY_MAX_NEW_TOKENS"] == "2000"
    # loopback only by default; keys from the environment or the secret ktlegacy_api_key (none by default)
    (port,) = s["ports"]
    assert env["KTLEGACY_API_KEY"] == "" and env["KTLEGACY_API_KEY_FILE"] == "/run/secrets/ktlegacy_api_key"
    assert s["secrets"] == [{"source": "ktlegacy_api_key", "target": "/run/secrets/ktlegacy_api_key"}]
    assert cfg["secrets"]["ktlegacy_api_key"]["file"] == "/dev/null"
    assert env["KTLEGACY_CORS_ORIGINS"] == ""
    assert port["host_ip"] == "127.0.0.1" and port["target"] == CONTAINER_PORT and port["published"] == "10002"
    binds = {v["target"]: v for v in s["volumes"] if v["type"] == "bind"}
    for target in ("/models/hf", "/models/gguf", "/opt/ktlegacy-compose/compose/serve.sh",
                   "/opt/ktlegacy-compose/ktlegacy/serving.py", "/opt/ktlegacy-compose/ktlegacy/facts.py"):
        assert binds[target]["read_only"] is True, target
    assert binds["/models/hf"]["source"] == str(project / "models" / "hf")
    # serve.sh's checks are the doctor's module, mounted as the repository lays it out
    assert binds["/opt/ktlegacy-compose/ktlegacy/serving.py"]["source"] == str(project / "ktlegacy" / "serving.py")
    assert s["entrypoint"] == ["/bin/sh", "/opt/ktlegacy-compose/compose/serve.sh"]
    hc = s["healthcheck"]
    assert hc["test"] == ["CMD", "python3", "/ktlegacy/healthcheck.py"]   # the image's own HEALTHCHECK
    assert env["KTLEGACY_HEALTH_URL"] == f"http://127.0.0.1:{CONTAINER_PORT}/health"
    assert hc["retries"] >= 1 and hc["start_period"] == "1h0m0s"
    assert s["restart"] == "unless-stopped"
    assert int(s["shm_size"]) >= 8 * 1024 ** 3
    assert s["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    # the doctor's fallback (no compose on the host) equals what compose resolves
    spec = spec_from_config(profile, cfg)
    defaults = spec_defaults(profile)
    assert (spec.image, spec.device_ids, spec.rules, spec.bind, spec.port, spec.cache_lens) == \
        (defaults.image, defaults.device_ids, defaults.rules, defaults.bind, defaults.port, defaults.cache_lens)


def test_profiles_are_compose_yamls(docker, project):
    """ktlegacy.profiles reads the GPU profiles from compose.yaml's services: with smoke, they are
    every profile compose knows."""
    proc = subprocess.run([docker.path, "compose", "config", "--profiles"], cwd=project, capture_output=True,
                          text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted([*PROFILES, SMOKE_PROFILE])


def test_env_choices_reach_the_service(docker, project):
    cfg = config(docker, project, "t4x4", KTLEGACY_BIND="0.0.0.0", KTLEGACY_PORT="12345", KTLEGACY_REF="v0.3.2",
               KTLEGACY_CPU="avx512", KTLEGACY_GPU_0="GPU-0f6e1a52", KTLEGACY_GPU_3="7",
               KTLEGACY_CPU_INFER="30", KTLEGACY_MAX_NEW_TOKENS="512",
               KTLEGACY_RULES="DeepSeek-V3-Chat-multi-gpu-8.yaml", KTLEGACY_API_KEY="k1-0123456789",
               KTLEGACY_API_KEY_FILE="./keys", KTLEGACY_CORS_ORIGINS="https://chat.example",
               KTLEGACY_MAX_BODY_BYTES="1048576")
    assert cfg["secrets"]["ktlegacy_api_key"]["file"] == str(project / "compose" / "keys")
    s = cfg["services"]["t4x4"]
    assert s["image"] == image_tag("v0.3.2", get_arch("sm75"), "AVX512")
    assert s["ports"][0]["host_ip"] == "0.0.0.0" and s["ports"][0]["published"] == "12345"
    assert s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["GPU-0f6e1a52", "1", "2", "7"]
    assert s["environment"]["KTLEGACY_CPU_INFER"] == "30"
    assert s["environment"]["KTLEGACY_MAX_NEW_TOKENS"] == "512"
    assert s["environment"]["KTLEGACY_RULES"] == "DeepSeek-V3-Chat-multi-gpu-8.yaml"
    assert s["environment"]["KTLEGACY_API_KEY"] == "k1-0123456789"
    assert s["environment"]["KTLEGACY_CORS_ORIGINS"] == "https://chat.example"
    assert s["environment"]["KTLEGACY_MAX_BODY_BYTES"] == "1048576"


def test_env_example_documents_the_defaults(docker, project):
    """compose/.env.example, copied to compose/.env, changes nothing: it states the defaults."""
    before = {p: config(docker, project, p) for p in [*PROFILES, "smoke"]}
    shutil.copy(project / "compose" / ".env.example", project / "compose" / ".env")
    after = {p: config(docker, project, p) for p in [*PROFILES, "smoke"]}
    assert before == after
    documented = {line.split("=", 1)[0].lstrip("#") for line in
                  (project / "compose" / ".env.example").read_text().splitlines() if "=" in line and
                  line.lstrip("#").startswith("KTLEGACY_")}
    used = set()
    import re
    for m in re.finditer(r"\$\{(KTLEGACY_\w+)", (project / "compose" / "compose.yaml").read_text()):
        used.add(m.group(1))
    assert used <= documented, used - documented


def test_doctor_reads_env_files_as_compose_does(docker, project):
    """ktlegacy.profiles.read_settings (python-dotenv) gives the values compose interpolates, for the
    quoting users write: the doctor validates what the container will get."""
    from ktlegacy.profiles import read_settings
    env_text = ("KTLEGACY_SERVER_ARGS=--web True --system_prompt 'be brief'\n"
                "KTLEGACY_CPU_INFER=12  # threads\n"
                'KTLEGACY_MODEL_NAME="Deep Seek #3"\n'
                "KTLEGACY_MAX_NEW_TOKENS='512'\n"
                "KTLEGACY_CACHE_LENS=\n")
    (project / "compose" / ".env").write_text(env_text)
    (project / ".env").write_text("KTLEGACY_CPU_INFER=14\n")
    resolved = config(docker, project, "t4x4", KTLEGACY_MAX_NEW_TOKENS="700")["services"]["t4x4"]["environment"]
    ours = read_settings({"KTLEGACY_MAX_NEW_TOKENS": "700"}, [project / "compose" / ".env", project / ".env"])
    for name in ("KTLEGACY_SERVER_ARGS", "KTLEGACY_CPU_INFER", "KTLEGACY_MODEL_NAME", "KTLEGACY_MAX_NEW_TOKENS"):
        assert ours[name] == resolved[name], name
    assert ours["KTLEGACY_CACHE_LENS"] == "" and resolved["KTLEGACY_CACHE_LENS"] == "8192"   # empty: the default
    assert resolved["KTLEGACY_CPU_INFER"] == "14" and resolved["KTLEGACY_MAX_NEW_TOKENS"] == "700"


def test_smoke_profile_resolves(docker, project):
    s = config(docker, project, "smoke")["services"]["smoke"]
    assert "deploy" not in s or not s["deploy"].get("resources")   # no GPU
    assert s["image"] == image_tag(DEFAULT_REF, get_arch("sm75"), DEFAULT_CPU_INSTRUCT)
    assert s["ports"][0]["host_ip"] == "127.0.0.1"
    assert all(v["read_only"] for v in s["volumes"] if v["type"] == "bind")
    assert s["environment"]["KTLEGACY_SMOKE_CMD"] == "python3 /ktlegacy/smoke/run.py"
    assert s["healthcheck"]["test"] == ["CMD", "python3", "/ktlegacy/healthcheck.py"]
    assert s["environment"]["KTLEGACY_HEALTH_URL"] == "http://127.0.0.1:10002/healthz"


def test_runs_from_the_repository_root(docker):
    """Exactly as users type it: `docker compose --profile t4x4 config` in the repo root."""
    cfg = config(docker, REPO, "t4x4")
    assert cfg["name"] == "ktlegacy" and list(cfg["services"]) == ["t4x4"]


# --- serve.sh inside a container -----------------------------------------------------------------

FAKE_SERVER = """#!/bin/sh
# first on PATH, in front of the image's real `ktransformers` console script: print the command
# line serve.sh built (the stand-in image has no CUDA extensions, so the real server cannot load)
printf '%s\\n' "$@" > /var/lib/ktlegacy/argv
echo FAKE-SERVER-STARTED
"""
SITE = "/opt/ktlegacy/venv/lib/python3.11/site-packages/ktransformers"


def serve_mounts() -> list[str]:
    """``-v`` arguments for what compose.yaml mounts under /opt/ktlegacy-compose (serve.sh and the
    module of its checks), read from compose.yaml."""
    import yaml
    spec = yaml.safe_load((REPO / "compose" / "compose.yaml").read_text())
    return [a for m in spec["x-model-mounts"] if m["type"] == "bind" and m["target"].startswith("/opt/ktlegacy-compose/")
            for a in ("-v", f"{(REPO / 'compose' / m['source']).resolve()}:{m['target']}:ro")]


def run_serve(docker, image, tmp_path, rules="DeepSeek-V3-Chat.yaml", with_config=True, extra_rules=None, env=()):
    """serve.sh in the stand-in runtime image (real patched ktransformers package, real rule files),
    as the image's non-root user, with compose's mounts and environment; its checks run on the
    image's python3 (no ktlegacy library there)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ktransformers").write_text(FAKE_SERVER)
    (tmp_path / "bin" / "ktransformers").chmod(0o755)
    (tmp_path / "hf").mkdir()
    if with_config:
        (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "rules").mkdir()
    if extra_rules:
        (tmp_path / "rules" / "Mine.yaml").write_text(extra_rules)
    cmd = [docker.path, "run", "--rm", "--name", f"h4-serve-{uuid.uuid4().hex[:8]}",
           "--tmpfs", "/var/lib/ktlegacy:mode=1777",
           *serve_mounts(),
           "-v", f"{tmp_path / 'bin'}:/opt/fakebin:ro", "-v", f"{tmp_path / 'rules'}:/opt/rules:ro",
           "-v", f"{tmp_path / 'hf'}:/models/hf:ro", "-v", f"{tmp_path / 'gguf'}:/models/gguf:ro",
           "-e", "PATH=/opt/fakebin:/opt/ktlegacy/venv/bin:/usr/local/bin:/usr/bin:/bin",
           "-e", f"KTLEGACY_RULES={rules}", "-e", "KTLEGACY_CPU_INFER=12", "-e", "KTLEGACY_MAX_NEW_TOKENS=300",
           "-e", "KTLEGACY_CACHE_LENS=4096", "-e", "KTLEGACY_SERVER_ARGS=--web True",
           "-e", "HOME=/var/lib/ktlegacy", "-e", "KTLEGACY_STATE_DIR=/var/lib/ktlegacy",
           *[a for kv in env for a in ("-e", kv)],
           "--entrypoint", "/bin/sh", image, "-c",
           "/bin/sh /opt/ktlegacy-compose/compose/serve.sh && cat /var/lib/ktlegacy/argv && echo --- && "
           "cat /var/lib/ktlegacy/.ktransformers/config.yaml"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def real_runtime_image(request):
    return request.getfixturevalue("standin_runtime_image")


@pytest.mark.slow
@pytest.mark.parametrize("rules", sorted({p.rules for p in PROFILES.values()}))
def test_serve_sh_starts_the_server_with_the_patched_rule_file(docker, real_runtime_image, tmp_path, rules):
    """Each profile's default rule file, as the image installed it (the 4-GPU one keeps upstream's
    commented-out Marlin lines: no op)."""
    import yaml
    proc = run_serve(docker, real_runtime_image, tmp_path, rules=rules)
    assert proc.returncode == 0, proc.stderr
    argv_text, config_text = proc.stdout.split("FAKE-SERVER-STARTED\n", 1)[1].split("---\n", 1)
    argv = argv_text.split("\n")
    assert argv[:2] == ["--web", "True"]          # KTLEGACY_SERVER_ARGS first: our flags come after it
    pairs = dict(zip(argv[2::2], argv[3::2]))
    assert pairs["--optimize_config_path"] == f"{SITE}/optimize/optimize_rules/{rules}"
    assert pairs["--model_path"] == "/models/hf" and pairs["--gguf_path"] == "/models/gguf"
    assert pairs["--port"] == "10002" and pairs["--host"] == "0.0.0.0"
    assert pairs["--cpu_infer"] == "12" and pairs["--max_new_tokens"] == "300" and pairs["--cache_lens"] == "4096"
    # upstream's import-time logger must find writable paths in ~/.ktransformers/config.yaml
    config = yaml.safe_load(config_text)
    assert config["log"]["dir"] == "/var/lib/ktlegacy/logs" and config["db"]["host"] == "/var/lib/ktlegacy"
    assert config["server"]["port"]   # the rest is upstream's own config.yaml


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("marlin", "rule file /opt/rules/Mine.yaml selects sm80+ op(s) KLinearMarlin (1x, first in rule 1)"),
    ("no-config", "no config.json in /models/hf"),
    ("no-rules", "optimize_rules/Nope.yaml does not exist"),
    ("bad-gpu-prefill", "KTLEGACY_GPU_PREFILL_MIN_TOKENS='1k' is not auto or a whole number >= 0: set "
                        "KTLEGACY_GPU_PREFILL_MIN_TOKENS in compose/.env to"),
    ("bad-cache-lens", "KTLEGACY_CACHE_LENS='abc' is not a whole number >= 1: set KTLEGACY_CACHE_LENS in compose/.env"),
    ("server-args-port", "KTLEGACY_SERVER_ARGS has '--port', a flag ktlegacy sets itself: remove it from "
                         "KTLEGACY_SERVER_ARGS and set KTLEGACY_PORT in compose/.env instead"),
])
def test_serve_sh_refuses_in_one_line(docker, real_runtime_image, tmp_path, case, expected):
    kwargs = {"marlin": dict(rules="/opt/rules/Mine.yaml", extra_rules=(
                  "- match: {name: x}\n  replace: {kwargs: {generate_op: KLinearMarlin}}\n")),
              "no-config": dict(with_config=False),
              "no-rules": dict(rules="Nope.yaml"),
              "bad-gpu-prefill": dict(env=("KTLEGACY_GPU_PREFILL_MIN_TOKENS=1k",)),
              "bad-cache-lens": dict(env=("KTLEGACY_CACHE_LENS=abc",)),
              "server-args-port": dict(env=("KTLEGACY_SERVER_ARGS=--web True --port 1",))}[case]
    proc = run_serve(docker, real_runtime_image, tmp_path, **kwargs)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ktlegacy serve: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "FAKE-SERVER-STARTED" not in proc.stdout


# --- the smoke profile, up for real --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose(docker, project_name, env, *args, check=True):
    proc = subprocess.run([docker.path, "compose", "-p", project_name, "--profile", "smoke", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def wait_health(docker, container, want, timeout=600) -> str:
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline:
        status = subprocess.run([docker.path, "inspect", "-f", "{{.State.Health.Status}}", container],
                                capture_output=True, text=True).stdout.strip()
        if status in ("healthy", "unhealthy"):
            break
        time.sleep(2)
    assert status == want, f"{container}: health {status!r}, wanted {want!r}"
    return status


@pytest.fixture
def smoke_env(tmp_path, real_runtime_image):
    """The stand-in runtime image of images/Dockerfile, its own smoke tests (default command)."""
    tag = real_runtime_image
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "deepseek_v3"}')
    from ggufmodel import write_model
    write_model(tmp_path / "gguf")
    port = free_port()
    env = clean_env(KTLEGACY_SMOKE_IMAGE=tag, KTLEGACY_MODEL_DIR=str(tmp_path / "hf"),
                    KTLEGACY_GGUF_DIR=str(tmp_path / "gguf"), KTLEGACY_SMOKE_PORT=str(port),
                    KTLEGACY_CPU_INFER="7", KTLEGACY_GPU_PREFILL_MIN_TOKENS="2048", KTLEGACY_SMOKE_START_PERIOD="5m")
    return env, port


@pytest.mark.slow
def test_smoke_profile_up_healthy_end_to_end(docker, smoke_env):
    env, port = smoke_env
    name = f"h4-smoke-{uuid.uuid4().hex[:8]}"
    try:
        compose(docker, name, env, "up", "-d")
        container = compose(docker, name, env, "ps", "-q", "smoke").stdout.strip()
        wait_health(docker, container, "healthy")
        # the port: published on loopback only, reachable from the host
        bindings = json.loads(subprocess.run([docker.path, "inspect", "-f", "{{json .HostConfig.PortBindings}}",
                                              container], capture_output=True, text=True).stdout)
        assert bindings == {"10002/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status == 200
            report = json.load(resp)
        assert report["ok"] is True and report["smoke"]["returncode"] == 0
        assert report["smoke"]["command"] == "python3 /ktlegacy/smoke/run.py"
        assert report["smoke"]["tail"][-1].startswith("smoke: ") and " 0 failed" in report["smoke"]["tail"][-1]
        # volumes: the host's files, read-only inside
        assert report["mounts"]["/models/hf"] == {"present": True, "files": ["config.json"], "read_only": True}
        assert report["mounts"]["/models/gguf"]["files"] == ["tiny-deepseek-v3.gguf"]
        assert report["mounts"]["/models/gguf"]["read_only"] is True
        assert report["state_dir_writable"] is True
        # environment: .env choices and the fixed settings
        assert report["environment"]["KTLEGACY_CPU_INFER"] == "7"
        assert report["environment"]["KTLEGACY_GPU_PREFILL_MIN_TOKENS"] == "2048"  # set, passed through
        assert report["environment"]["KTLEGACY_GPU_PREFILL_MIB"] == "1024"         # the default
        assert report["environment"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert report["environment"]["KTLEGACY_PROFILE"] == "smoke"
    finally:
        compose(docker, name, env, "down", "-v", "--remove-orphans", check=False)
    left = subprocess.run([docker.path, "ps", "-aq", "--filter", f"label=com.docker.compose.project={name}"],
                          capture_output=True, text=True).stdout.strip()
    assert left == ""


@pytest.mark.slow
def test_smoke_profile_failing_smoke_is_unhealthy(docker, smoke_env):
    env, port = smoke_env
    # start_period short: failures during it do not count, and this one is meant to fail
    env = dict(env, KTLEGACY_SMOKE_CMD="echo 'check_x: FAIL' && false", KTLEGACY_SMOKE_START_PERIOD="3s")
    name = f"h4-smoke-fail-{uuid.uuid4().hex[:8]}"
    try:
        compose(docker, name, env, "up", "-d")
        container = compose(docker, name, env, "ps", "-q", "smoke").stdout.strip()
        wait_health(docker, container, "unhealthy", timeout=180)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
            raise AssertionError("a failed smoke run answered 200")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            assert json.load(exc)["smoke"]["tail"] == ["check_x: FAIL"]
    finally:
        compose(docker, name, env, "down", "-v", "--remove-orphans", check=False)
