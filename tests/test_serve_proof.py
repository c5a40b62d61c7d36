"""bench/serve_proof.py's parts that run without a GPU: the profile environment it starts
compose/serve.sh with, its refusal when the machine has too few GPUs, and the memory check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import serve_proof  # noqa: E402
from ktlegacy.profiles import PROFILES  # noqa: E402


@pytest.mark.parametrize("n", sorted(serve_proof.PROFILES))
def test_profile_environment_is_compose_yaml_s(n):
    """The environment serve.sh gets is compose.yaml's service environment with an empty .env:
    the profile's own rule file (ktlegacy.profiles' table) and the documented defaults."""
    profile = serve_proof.PROFILES[n]
    env = serve_proof.compose_env(profile)
    assert env["KTLEGACY_RULES"] == PROFILES[profile].rules and PROFILES[profile].gpus == n
    assert env["KTLEGACY_PROFILE"] == profile and env["KTLEGACY_CACHE_LENS"] == "8192"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert not any("${" in v for v in env.values())


def test_no_gpu_is_one_line(tmp_path):
    import torch
    if torch.cuda.device_count():
        pytest.skip("this host has a CUDA GPU")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_proof.py"), "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out.json"), "--gpus", "4"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --gpus 4 proves the t4x4 profile's rule file on 4 GPUs, but no CUDA GPU is "
                               "visible: run it on a machine with 1 to 4 GPUs")
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "w").exists()


def _devices_only_differ(a, b, cards: int) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_devices_only_differ(a[k], b[k], cards) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_devices_only_differ(x, y, cards) for x, y in zip(a, b))
    if isinstance(a, str) and a.startswith("cuda:") and a[5:].isdigit():
        return b == f"cuda:{int(a[5:]) % cards}"
    return a == b


@pytest.mark.parametrize("cards, devices", [(2, ["cuda:0", "cuda:1"]), (1, ["cuda:0"])])
def test_the_4_gpu_rule_file_folds_onto_fewer_cards(cards, devices, patched_tree, tmp_path):
    """--gpus 4 on 1-2 cards: the t4x4 file with cuda:N -> cuda:(N mod cards), nothing else changed;
    it still passes serve.sh's rule check, and the doctor's estimate puts the same weights on the
    cards there are (every block on the card its virtual GPU folds onto)."""
    import yaml
    from ggufmodel import write_model
    from ktlegacy import vram
    from ktlegacy.serving import check_rules
    src = patched_tree("0.2.1.post1", "sm75") / "ktransformers/optimize/optimize_rules" / PROFILES["t4x4"].rules
    dest = tmp_path / "folded" / src.name
    changed = serve_proof.fold_rules(src, dest, cards)
    assert changed == {f"cuda:{i}": f"cuda:{i % cards}" for i in range(cards, 4)}
    before, after = yaml.safe_load(src.read_text()), yaml.safe_load(dest.read_text())
    assert _devices_only_differ(before, after, cards) and before != after
    transfer = [r["replace"]["kwargs"]["transfer_map"] for r in after if "transfer_map" in r["replace"].get("kwargs", {})]
    assert transfer == [{15: "cuda:1" if cards > 1 else "cuda:0", 30: "cuda:0", 45: "cuda:1" if cards > 1 else "cuda:0"}]
    check_rules(dest.read_text(), str(dest))
    write_model(tmp_path / "gguf")
    model = vram.read_gguf(tmp_path / "gguf")
    four = vram.estimate(model, vram.load_rules(src.read_text()), 8192)
    folded = vram.estimate(model, vram.load_rules(dest.read_text()), 8192)
    assert four.gpu_devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"] and folded.gpu_devices == devices
    for dev in devices:
        assert folded.weights_mib[dev] == pytest.approx(
            sum(four.weights_mib[f"cuda:{i}"] for i in range(4) if i % cards == int(dev[5:])))


def test_memory_vs_estimate_leaves_out_only_the_unexercised_prefill():
    est = {"cuda:0": {"total_mib": 1900.0, "prefill_activations_mib": 100.0},
           "cuda:1": {"total_mib": 1600.0, "prefill_activations_mib": 100.0}}
    got = serve_proof.memory_vs_estimate(est, {"cuda:0": {"process_peak_mib": 1500.0},
                                               "cuda:1": {"process_peak_mib": 1000.0}})
    assert got["cuda:0"]["ratio"] == pytest.approx(1800 / 1500, abs=1e-3) and got["cuda:0"]["within_20_percent"]
    assert got["cuda:1"]["ratio"] == pytest.approx(1.5) and not got["cuda:1"]["within_20_percent"]

