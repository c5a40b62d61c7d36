"""The doctor against recorded hosts (tests/fixtures/hosts) and against this real host."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ggufmodel import write_model
from ktlegacy.doctor import FAIL, OK, SKIP, WARN, Row, check_profile, doctor
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.facts import CPU_FLAGS, DEFAULT_CPU_INSTRUCT
from ktlegacy.hostfacts import HostFacts
from ktlegacy.images import LABEL_ARCH, LABEL_CPU, LABEL_REF
from ktlegacy.profiles import PROFILES, spec_defaults

REPO = Path(__file__).resolve().parent.parent
HOSTS = REPO / "tests" / "fixtures" / "hosts"
RULES_DIR = "ktransformers/optimize/optimize_rules"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text('{"model_type": "deepseek_v3"}')
    write_model(root / "gguf")
    return root / "hf", root / "gguf"


def facts_of(host: str) -> HostFacts:
    return HostFacts.load(HOSTS / host)


def spec_for(profile: str, model_dirs, **changes):
    hf, gguf = model_dirs
    spec = spec_defaults(PROFILES[profile]).with_overrides(hf, gguf)
    return dataclasses.replace(spec, **changes)


def with_image(facts: HostFacts, spec, cpu="AVX2") -> HostFacts:
    facts.images[spec.image] = {LABEL_ARCH: spec.profile.arch_name, LABEL_CPU: cpu, LABEL_REF: "0.2.1.post1"}
    return facts


def rows(report) -> dict:
    return {r.check: r for r in report.rows}


def assert_one_line(row):
    assert "\n" not in row.detail and "\n" not in row.fix
    if row.status == FAIL:
        assert row.fix, row


# --- recorded hosts: what they are ---------------------------------------------------------------

@pytest.mark.parametrize("host, count, name, cc, vram", [
    ("v100-x1", 1, "Tesla V100-SXM2-32GB", (7, 0), 32510),
    ("t4-x4", 4, "Tesla T4", (7, 5), 15360),
    ("2080ti-x2", 2, "NVIDIA GeForce RTX 2080 Ti", (7, 5), 11264),
])
def test_recorded_hosts_parse(host, count, name, cc, vram):
    facts = facts_of(host)
    assert len(facts.gpus) == count
    assert {(g.name, g.cc, g.vram_mib) for g in facts.gpus} == {(name, cc, vram)}
    assert [g.index for g in facts.gpus] == list(range(count))
    assert set(CPU_FLAGS[DEFAULT_CPU_INSTRUCT]) <= facts.cpu_flags   # each runs the default image
    assert facts.numa_mem_kib and all(kib > 100 * 1024 * 1024 for kib in facts.numa_mem_kib.values())
    assert facts.nvidia_runtime


# --- each profile on the host it was made for ---------------------------------------------------

@pytest.mark.parametrize("host, profile", [("v100-x1", "v100"), ("t4-x4", "t4x4"), ("2080ti-x2", "2080ti-x2")])
def test_profile_passes_on_its_host(host, profile, model_dirs, patched_tree):
    spec = spec_for(profile, model_dirs, port=10050)
    facts = with_image(facts_of(host), spec)
    tree = patched_tree("0.2.1.post1", spec.profile.arch_name)
    report = check_profile(spec, facts, rules_file=tree / RULES_DIR / spec.rules)
    by = rows(report)
    assert report.failed == [], report.table()
    assert [r.check for r in report.rows] == ["GPUs", "NVIDIA container runtime", "image", "GPU arch vs image",
                                              "CPU vs image", "model dir", "GGUF", "RAM vs GGUF", "CPU threads",
                                              "rule file", "VRAM per GPU", "port", "API key"]
    assert by["VRAM per GPU"].detail.count("cuda:") == PROFILES[profile].gpus
    assert "127.0.0.1:10050 free" in by["port"].detail


@pytest.mark.parametrize("host, topology", [("v100-x1", {0: 20, 1: 20}), ("t4-x4", {0: 20, 1: 20}),
                                            ("2080ti-x2", {0: 16}), ("h100", {0: 16})])
def test_recorded_topology(host, topology):
    facts = facts_of(host)
    assert {n: len(c) // facts.threads_per_core for n, c in facts.numa_cpus.items()} == topology


def test_cpu_threads_advice_from_the_hosts_topology(model_dirs):
    from ktlegacy.doctor import row_cpu_threads
    # two sockets of 20 cores (40 threads each): one node's cores - 2, pinned with its memory
    spec = spec_for("t4x4", model_dirs, port=10050)
    row = row_cpu_threads(spec, facts_of("t4-x4"), None)
    assert row.status == WARN and "\n" not in row.detail
    assert "2 NUMA nodes of 20, 20 physical cores" in row.detail and "KTLEGACY_CPU_INFER=18 advised, 10 set" in row.detail
    assert "node0's CPUs (0-19,40-59)" in row.detail and "spill" not in row.detail
    assert row.fix == ('set KTLEGACY_CPU_INFER=18 in compose/.env and add cpuset: "0-19,40-59" to the profile\'s '
                       'service (a compose.override.yaml), or start it under numactl --cpunodebind=0 --membind=0')
    many = dataclasses.replace(spec, environment={"KTLEGACY_CPU_INFER": "38"})
    assert "38 threads spill onto the other node" in row_cpu_threads(many, facts_of("t4-x4"), None).detail
    # one node of 16 cores: 14, and more is a warning
    h100 = facts_of("h100")
    assert row_cpu_threads(spec, h100, None) == Row("CPU threads", OK, "1 NUMA node, 16 physical cores: "
                                                    "KTLEGACY_CPU_INFER=14 advised, 10 set")
    over = row_cpu_threads(dataclasses.replace(spec, environment={"KTLEGACY_CPU_INFER": "16"}), h100, None)
    assert over.status == WARN and over.fix == "set KTLEGACY_CPU_INFER=14 in compose/.env"
    # a GGUF bigger than the node's RAM: interleave
    big = SimpleNamespace(total_bytes=10 ** 15)
    assert "start with numactl --interleave=all" in row_cpu_threads(spec, facts_of("v100-x1"), big).detail
    # no topology: skipped, not guessed
    assert row_cpu_threads(spec, dataclasses.replace(h100, numa_cpus={}), None).status == SKIP


def test_rules_come_from_upstream_sdist_when_the_image_cannot_be_asked(model_dirs, sdist_tree):
    spec = spec_for("t4x4", model_dirs, port=10050)
    report = check_profile(spec, with_image(facts_of("t4-x4"), spec), docker=None)
    assert rows(report)["VRAM per GPU"].status == OK
    assert "DeepSeek-V3-Chat-multi-gpu-4.yaml (from upstream 0.2.1.post1)" in rows(report)["VRAM per GPU"].detail


# --- bad input: one clear line each -------------------------------------------------------------

def test_fixes_say_to_copy_the_env_example_when_there_is_no_env(model_dirs, tmp_path):
    """A fix that says "set X in compose/.env" on a host that has none yet starts with the copy."""
    from ktlegacy.doctor import env_file_first
    spec = spec_for("t4x4", model_dirs, port=10050, model_dir=tmp_path / "no-model")
    report = check_profile(spec, with_image(facts_of("t4-x4"), spec), docker=None)
    fix = rows(report)["model dir"].fix
    assert "set KTLEGACY_MODEL_DIR in compose/.env" in fix
    env = tmp_path / ".env"
    env.write_text("")
    assert rows(env_file_first(report, env))["model dir"].fix == fix     # there is one: unchanged
    env.unlink()
    copied = rows(env_file_first(report, env))["model dir"].fix
    assert copied == "cp compose/.env.example compose/.env (there is none yet), then " + fix
    assert (REPO / "compose" / ".env.example").is_file()
    assert rows(env_file_first(report, env))["model dir"].fix == copied  # said once
    assert rows(report)["GPUs"].fix == ""  # rows without a compose/.env fix are left alone


def failing(report, check):
    row = rows(report)[check]
    assert row.status == FAIL, report.table()
    assert_one_line(row)
    return row


def test_no_nvidia_runtime(model_dirs):
    spec = spec_for("t4x4", model_dirs)
    facts = with_image(facts_of("t4-x4"), spec)
    facts.docker_runtimes, facts.nvidia_hook = {"runc": {"path": "runc"}}, ""
    row = failing(check_profile(spec, facts), "NVIDIA container runtime")
    assert "no NVIDIA runtime" in row.detail and "nvidia-ctk runtime configure" in row.fix


def test_no_docker_at_all(model_dirs):
    spec = spec_for("v100", model_dirs)
    facts = facts_of("v100-x1")
    facts.docker_runtimes, facts.docker_error = None, "Cannot connect to the Docker daemon"
    row = failing(check_profile(spec, facts), "NVIDIA container runtime")
    assert "no Docker daemon" in row.detail


def test_fewer_gpus_than_the_profile(model_dirs):
    row = failing(check_profile(spec_for("t4x4", model_dirs), facts_of("2080ti-x2")), "GPUs")
    assert "profile t4x4 needs 4 GPUs, this host has 2" in row.detail
    assert "2080ti-x2" in row.fix


def test_device_id_that_names_no_gpu(model_dirs):
    spec = spec_for("2080ti-x2", model_dirs, device_ids=("0", "7"))
    row = failing(check_profile(spec, facts_of("2080ti-x2")), "GPUs")
    assert "7" in row.detail and "KTLEGACY_GPU_" in row.fix


def test_gpu_of_another_arch_than_the_image(model_dirs):
    spec = spec_for("v100", model_dirs)
    row = failing(check_profile(spec, with_image(facts_of("t4-x4"), spec)), "GPU arch vs image")
    assert "Tesla T4) is cc 7.5, the image is sm70" in row.detail
    assert "t4x4" in row.fix
    spec = spec_for("2080ti-x2", model_dirs)
    facts = facts_of("t4-x4")
    facts.gpus = [dataclasses.replace(g, name="NVIDIA H100 80GB HBM3", cc=(9, 0)) for g in facts.gpus]
    row = failing(check_profile(spec, with_image(facts, spec)), "GPU arch vs image")
    assert "Ampere or newer" in row.detail and "upstream" in row.fix


def test_model_dir_missing_or_empty(model_dirs, tmp_path):
    row = failing(check_profile(spec_for("v100", model_dirs, model_dir=tmp_path / "nope"), facts_of("v100-x1")),
                  "model dir")
    assert "does not exist" in row.detail and "KTLEGACY_MODEL_DIR" in row.fix
    (tmp_path / "empty").mkdir()
    row = failing(check_profile(spec_for("v100", model_dirs, model_dir=tmp_path / "empty"), facts_of("v100-x1")),
                  "model dir")
    assert "is empty" in row.detail
    row = failing(check_profile(spec_for("v100", model_dirs, gguf_dir=tmp_path / "empty"), facts_of("v100-x1")),
                  "GGUF")
    assert "no *.gguf file in" in row.detail and "KTLEGACY_GGUF_DIR" in row.fix


def test_ram_below_model_size(model_dirs):
    facts = facts_of("t4-x4")
    facts.numa_mem_kib = {0: 64, 1: 128}   # KiB: smaller than the tiny GGUF
    row = failing(check_profile(spec_for("t4x4", model_dirs), facts), "RAM vs GGUF")
    assert "does not fit in one NUMA node's RAM (largest: node1" in row.detail


def test_cpu_lacking_the_images_instruction_set(model_dirs):
    spec = spec_for("2080ti-x2", model_dirs)
    facts = with_image(facts_of("2080ti-x2"), spec, cpu="AVX512")   # a Ryzen 5950X has no AVX-512
    row = failing(check_profile(spec, facts), "CPU vs image")
    assert "lacks avx512f, avx512bw" in row.detail and "KTLEGACY_CPU=avx2" in row.fix
    # the same image on the Cascade Lake host is fine; FANCY needs VNNI, which Skylake (V100 host) lacks
    spec = spec_for("v100", model_dirs)
    row = failing(check_profile(spec, with_image(facts_of("v100-x1"), spec, cpu="FANCY")), "CPU vs image")
    assert "avx512_vnni" in row.detail and "KTLEGACY_CPU=avx512" in row.fix


def test_port_already_taken(model_dirs):
    # the recorded 2080 Ti workstation has something on 127.0.0.1:10002 (listening.txt)
    row = failing(check_profile(spec_for("2080ti-x2", model_dirs), facts_of("2080ti-x2")), "port")
    assert "127.0.0.1:10002 is already in use" in row.detail and "KTLEGACY_PORT" in row.fix


def test_port_taken_live(model_dirs):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        facts = facts_of("v100-x1")
        facts.port_probe = __import__("ktlegacy.hostfacts", fromlist=["port_in_use"]).port_in_use
        row = failing(check_profile(spec_for("v100", model_dirs, port=port), facts), "port")
        assert f"127.0.0.1:{port} is already in use" in row.detail


def test_vram_short_and_rule_file_for_more_gpus(model_dirs, sdist_tree):
    spec = spec_for("2080ti-x2", model_dirs, port=10050)
    facts = with_image(facts_of("2080ti-x2"), spec)
    facts.gpus = [dataclasses.replace(g, vram_mib=900) for g in facts.gpus]
    row = failing(check_profile(spec, facts, rules_file=sdist_tree / RULES_DIR / spec.rules), "VRAM per GPU")
    # the tiny GGUF: the 1024 MiB runtime term alone is more than these 900 MiB cards; an 8192-token prompt's
    # routed experts on the GPU (KTLEGACY_GPU_PREFILL_MIB, 1024 by default, and two staged runs of their F32
    # bytes: 2.4x that) count on top
    assert "cuda:0 needs ~4.4 GiB under DeepSeek-V3-Chat-multi-gpu.yaml, GPU 0 (NVIDIA GeForce RTX 2080 Ti) has 0.9 GiB" in row.detail
    # without the GPU experts path (compose/.env: KTLEGACY_GPU_PREFILL_MIN_TOKENS=0) that term is gone
    off = dataclasses.replace(spec, environment={"KTLEGACY_GPU_PREFILL_MIN_TOKENS": "0"})
    row = failing(check_profile(off, facts, rules_file=sdist_tree / RULES_DIR / spec.rules), "VRAM per GPU")
    assert "cuda:0 needs ~1.0 GiB under DeepSeek-V3-Chat-multi-gpu.yaml" in row.detail
    bad = dataclasses.replace(spec, environment={"KTLEGACY_GPU_PREFILL_MIB": "lots"})
    with pytest.raises(KtlegacyError, match=r"^KTLEGACY_GPU_PREFILL_MIB='lots' is not a whole number >= 0: set "
                                            r"KTLEGACY_GPU_PREFILL_MIB in compose/.env to the MiB of expert weights "
                                            r"on the GPU at a time \(default 1024\)$"):
        check_profile(bad, facts, rules_file=sdist_tree / RULES_DIR / spec.rules)
    spec = spec_for("2080ti-x2", model_dirs, port=10050, rules="DeepSeek-V3-Chat-multi-gpu-4.yaml")
    row = failing(check_profile(spec, with_image(facts_of("2080ti-x2"), spec),
                                rules_file=sdist_tree / RULES_DIR / spec.rules), "VRAM per GPU")
    assert "places modules on 4 GPUs" in row.detail and "reserves 2" in row.detail


def test_unknown_profile():
    with pytest.raises(KtlegacyError, match=f"unknown profile 'a100': use one of {', '.join(PROFILES)}"):
        doctor("a100")
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "doctor", "--profile", "a100"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: unknown profile 'a100': use one of {', '.join(PROFILES)}"]


# --- hosts where no profile can run --------------------------------------------------------------

def test_h100_host_is_refused_as_too_new(model_dirs):
    """Recorded on the H100 machine by helper H6 with record.sh (see tests/fixtures/hosts/record.sh)."""
    if not (HOSTS / "h100").is_dir():
        pytest.skip("tests/fixtures/hosts/h100 not recorded yet (run record.sh on the H100 machine)")
    facts = facts_of("h100")
    assert facts.gpus and all(g.cc >= (9, 0) for g in facts.gpus)
    report = check_profile(spec_for("v100", model_dirs), facts)
    assert "Ampere or newer" in failing(report, "GPU arch vs image").detail
    assert "no Docker daemon" in failing(report, "NVIDIA container runtime").detail
    # no profile named: the verdict names the hardware reason first
    from ktlegacy.doctor import check_host
    verdicts = {r.check: r for r in check_host(facts, [spec_for(p, model_dirs) for p in PROFILES]).rows}
    assert "cannot run here: GPU arch vs image: GPU 0 (NVIDIA H100 80GB HBM3) is cc 9.0, Ampere or newer" \
        in verdicts["profile v100"].detail
    assert "needs 4 GPUs, this host has 1" in verdicts["profile t4x4"].detail


def test_this_host_says_why_no_profile_can_run():
    """The real host (CI: no GPU). Every profile gets a one-line reason and the exit code is 1."""
    facts = HostFacts.probe()
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "doctor"], capture_output=True, text=True, cwd=REPO)
    verdicts = [ln for ln in proc.stdout.splitlines() if ln.startswith("profile ")]
    assert len(verdicts) == len(PROFILES), proc.stdout + proc.stderr
    if facts.gpus is None:
        assert proc.returncode == 1
        for line in verdicts:
            assert "FAIL" in line and "cannot run here: GPUs: no NVIDIA GPU usable:" in line
        if shutil.which("nvidia-smi") is None:
            assert "nvidia-smi not found" in proc.stdout


def test_record_sh_matches_live_probe(tmp_path):
    """record.sh on this host, loaded back, says what the live probe says."""
    subprocess.run(["bash", str(HOSTS / "record.sh"), str(tmp_path / "here")], check=True, capture_output=True)
    recorded, live = HostFacts.load(tmp_path / "here"), HostFacts.probe()
    assert recorded.gpus == live.gpus
    assert recorded.cpu_flags == live.cpu_flags and recorded.cpu_model == live.cpu_model
    assert recorded.numa_mem_kib.keys() == live.numa_mem_kib.keys()
    assert recorded.nvidia_runtime == live.nvidia_runtime



@pytest.mark.docker
def test_rules_and_labels_are_read_from_the_image(docker, standin_base, model_dirs):
    """A local image is asked for its own (patched) rule file and its labels: here a rule file that
    exists only in the image and puts everything on cuda:1 of the 2080 Ti pair."""
    import base64
    tag = "h4-doctor-rules:sm75"
    rules = ("- match: {name: '^model\\.embed_tokens'}\n  replace: {class: default, kwargs: {generate_device: cpu}}\n"
             "- match: {name: '^model\\.layers\\..*\\.mlp\\.experts$'}\n"
             "  replace: {class: X, kwargs: {generate_device: cpu}}\n  recursive: False\n"
             "- match: {name: '.'}\n  replace: {class: default, kwargs: {generate_device: 'cuda:1'}}\n")
    payload = base64.b64encode(rules.encode()).decode()
    dockerfile = (f"FROM {standin_base}\n"
                  "RUN d=/usr/local/lib/python3.11/dist-packages/ktransformers/optimize/optimize_rules && "
                  "mkdir -p $d && touch $d/../../__init__.py && "
                  f"echo {payload} | base64 -d > $d/Only-In-Image.yaml\n"
                  f"LABEL {LABEL_ARCH}=sm75 {LABEL_CPU}=AVX2 {LABEL_REF}=0.2.1.post1\n")
    proc = subprocess.run([docker.path, "build", "-q", "-t", tag, "-"], input=dockerfile, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        spec = spec_for("2080ti-x2", model_dirs, port=10050, image=tag, rules="Only-In-Image.yaml")
        facts = facts_of("2080ti-x2")
        facts.image_probe = docker.labels
        report = check_profile(spec, facts, docker=docker)
        by = rows(report)
        assert by["image"].status == OK and "arch sm75, CPU AVX2, ref 0.2.1.post1" in by["image"].detail
        vram = by["VRAM per GPU"]
        assert vram.status == OK, report.table()
        assert "Only-In-Image.yaml (from the image)" in vram.detail
        assert "cuda:1" in vram.detail and "cuda:0" not in vram.detail
        assert by["rule file"].status == OK and "Only-In-Image.yaml (from the image): no sm80+ op" in by["rule file"].detail
        # a rule file the image does not have: one FAIL row (serve.sh would refuse it), not upstream's copy
        spec = dataclasses.replace(spec, rules="DeepSeek-V3-Chat-multi-gpu-4.yaml")
        row = failing(check_profile(spec, facts, docker=docker), "rule file")
        assert row.detail == f"DeepSeek-V3-Chat-multi-gpu-4.yaml: {tag} has no rule file DeepSeek-V3-Chat-multi-gpu-4.yaml " \
                             "in its optimize_rules directory"
        assert "KTLEGACY_RULES" in row.fix
    finally:
        subprocess.run([docker.path, "rmi", tag], capture_output=True)


@pytest.mark.docker
def test_a_compose_error_is_a_row_not_a_crash(docker, monkeypatch):
    """A value compose itself refuses: our one line for the setting, then compose's own reason; no
    profile check runs on defaults the user did not choose (no false model dir / GGUF rows)."""
    monkeypatch.setenv("KTLEGACY_PORT", "notaport")
    report = doctor("v100")
    assert [r.check for r in report.rows[:2]] == ["settings", "compose config"]
    row = failing(report, "settings")
    assert row.detail == "KTLEGACY_PORT='notaport' is not a TCP port (1-65535)"
    assert row.fix.endswith("set KTLEGACY_PORT in compose/.env to a free TCP port of the host (default 10002)")
    row = failing(report, "compose config")
    assert row.detail == "docker compose rejected the settings: invalid hostPort: notaport"
    assert "compose v2 plugin" not in row.fix
    checks = {r.check for r in report.rows}
    assert not checks & {"port", "model dir", "GGUF", "VRAM per GPU", "image"}, report.table()
    assert {"GPUs", "NVIDIA container runtime", "CPU", "RAM per NUMA node"} <= checks   # the host is still described


def test_nvidia_smi_of_an_old_driver_without_compute_cap(tmp_path, model_dirs):
    """Drivers before 510 reject the compute_cap field; record.sh then has no csv, and the live
    probe asks again without it: the card name gives the compute capability."""
    from ktlegacy.hostfacts import parse_nvidia_smi
    gpus = parse_nvidia_smi("index, uuid, name, memory.total [MiB]\n"
                            "0, GPU-1, Tesla V100-PCIE-16GB, 16160 MiB\n1, GPU-2, Tesla T4, 15109 MiB\n"
                            "2, GPU-3, NVIDIA A100-SXM4-40GB, 40536 MiB\n3, GPU-4, Mystery Card, 1 MiB\n")
    assert [(g.cc, g.vram_mib) for g in gpus] == [((7, 0), 16160), ((7, 5), 15109), ((8, 0), 40536), ((0, 0), 1)]
    spec = spec_for("v100", model_dirs, device_ids=("3",))
    facts = facts_of("v100-x1")
    facts.gpus = gpus
    row = failing(check_profile(spec, with_image(facts, spec)), "GPU arch vs image")
    assert "compute capability unknown" in row.detail and "update the NVIDIA driver" in row.fix


OLD_DRIVER_SMI = """#!/bin/sh
# nvidia-smi of a 470-series driver: no compute_cap query field
case "$*" in *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2;; esac
echo "index, uuid, name, memory.total [MiB]"
echo "0, GPU-4a1b, Tesla V100-PCIE-16GB, 16160 MiB"
"""


def test_old_driver_fallback_in_record_sh_and_live_probe(tmp_path, monkeypatch):
    from ktlegacy.hostfacts import probe_gpus
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvidia-smi").write_text(OLD_DRIVER_SMI)
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    subprocess.run(["bash", str(HOSTS / "record.sh"), str(tmp_path / "rec")], check=True, capture_output=True)
    assert not (tmp_path / "rec" / "nvidia-smi.err").exists()
    recorded = HostFacts.load(tmp_path / "rec").gpus
    live, why = probe_gpus()
    assert recorded == live and why == ""
    assert [(g.name, g.cc, g.vram_mib) for g in live] == [("Tesla V100-PCIE-16GB", (7, 0), 16160)]


# --- the API key (issue 25) ----------------------------------------------------------------------

def _api_key_row(model_dirs, **changes):
    spec = spec_for("t4x4", model_dirs, **changes)
    facts = with_image(facts_of("t4-x4"), spec)
    return rows(check_profile(spec, facts))["API key"]


def test_a_network_bind_without_an_api_key_fails(model_dirs, tmp_path):
    assert _api_key_row(model_dirs).status == OK   # 127.0.0.1: no key needed
    row = _api_key_row(model_dirs, bind="0.0.0.0")
    assert row.status == FAIL and "KTLEGACY_BIND=0.0.0.0 publishes the API to the network without an API key" in \
        row.detail and "KTLEGACY_API_KEY" in row.fix and "--force" in row.fix
    assert_one_line(row)
    assert _api_key_row(model_dirs, bind="0.0.0.0", api_key_file=Path("/dev/null")).status == FAIL
    empty = tmp_path / "empty"
    empty.write_text("# no key yet\n\n")
    assert _api_key_row(model_dirs, bind="192.0.2.7", api_key_file=empty).status == FAIL
    row = _api_key_row(model_dirs, bind="0.0.0.0", environment={"KTLEGACY_API_KEY": "k1-0123456789, k2-9876543210"})
    assert row.status == OK and row.detail.startswith("2 key(s)")
    keys = tmp_path / "keys"
    keys.write_text("# ops\nfile-key-0123456789\n")
    assert _api_key_row(model_dirs, bind="0.0.0.0", api_key_file=keys).status == OK
    row = _api_key_row(model_dirs, bind="0.0.0.0", api_key_file=tmp_path / "missing")
    assert row.status == FAIL and "cannot be read" in row.detail


def test_up_refuses_a_network_bind_without_a_key(model_dirs, monkeypatch):
    """`invoke up` runs the doctor: the API key row alone stops it before compose (unless --force)."""
    import ktlegacy.doctor
    import ktlegacy.docker
    from ktlegacy.up import up
    spec = spec_for("t4x4", model_dirs, bind="0.0.0.0")
    report = check_profile(spec, with_image(facts_of("t4-x4"), spec))
    assert [r.check for r in report.failed] == ["API key"]
    monkeypatch.setattr(ktlegacy.doctor, "doctor", lambda profile: report)
    monkeypatch.setattr(ktlegacy.docker, "daemon_client", lambda: pytest.fail("compose must not start"))
    with pytest.raises(KtlegacyError, match=r"not starting profile t4x4: 1 doctor check\(s\) failed, first API key: "
                                            r"KTLEGACY_BIND=0\.0\.0\.0 publishes the API"):
        up("t4x4")
