"""The VRAM estimate: a GGUF written with the gguf package, placed by upstream's real rule files."""

from __future__ import annotations

import pytest

from ggufmodel import DIMS, layer_elements, write_model
from ktlegacy.errors import KtlegacyError
from ktlegacy.vram import (GPU_OVERHEAD_MIB, MIB, estimate, load_rules, module_for_tensor, place, read_gguf,
                           rule_devices)

RULES_DIR = "ktransformers/optimize/optimize_rules"
CACHE_LENS = 1000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_model(d)
    return read_gguf(d)


def rules(sdist_tree, name):
    return load_rules((sdist_tree / RULES_DIR / name).read_text(), name)


def expected_mib(layers, with_head: bool) -> float:
    """fp16 bytes of the non-expert weights of ``layers`` (+ model.norm and lm_head), in MiB."""
    elements = sum(layer_elements(i)[0] for i in layers)
    if with_head:
        elements += DIMS["hidden"] + DIMS["vocab"] * DIMS["hidden"]
    return elements * 2 / MIB


def kv_mib(n_layers: int) -> float:
    return CACHE_LENS * n_layers * (DIMS["kv_lora"] + DIMS["rope"]) * 2 / MIB


def test_header_is_read(model):
    assert model.arch == "deepseek2"
    assert model.meta("attention.kv_lora_rank") == DIMS["kv_lora"]
    assert model.meta("block_count") == DIMS["layers"]
    assert len(model.tensors) == 3 + sum(12 if i < DIMS["dense_layers"] else 17 for i in range(DIMS["layers"]))
    assert model.total_bytes == sum(p.stat().st_size for p in model.files)


@pytest.mark.parametrize("rule_file, split", [
    ("DeepSeek-V3-Chat.yaml", {"cuda:0": (range(0, 61), True)}),
    ("DeepSeek-V3-Chat-multi-gpu.yaml", {"cuda:0": (range(0, 30), False), "cuda:1": (range(30, 61), True)}),
    ("DeepSeek-V3-Chat-multi-gpu-4.yaml", {"cuda:0": (range(0, 15), False), "cuda:1": (range(15, 30), False),
                                           "cuda:2": (range(30, 45), False), "cuda:3": (range(45, 61), True)}),
])
def test_estimate_per_gpu(model, sdist_tree, rule_file, split):
    est = estimate(model, rules(sdist_tree, rule_file), CACHE_LENS)
    assert est.unplaced == []
    assert est.gpu_devices == list(split)
    for dev, (layers, head) in split.items():
        assert est.weights_mib[dev] == pytest.approx(expected_mib(layers, head), rel=1e-9), dev
        assert est.kv_mib[dev] == pytest.approx(kv_mib(len(layers)), rel=1e-9), dev
        assert est.need_mib(dev) == pytest.approx(expected_mib(layers, head) + kv_mib(len(layers)) + GPU_OVERHEAD_MIB)
    # routed experts (f32 on disk here) and the embedding stay in host RAM
    expert_bytes = sum(layer_elements(i)[1] for i in range(DIMS["layers"])) * 4
    assert est.cpu_bytes == expert_bytes + DIMS["vocab"] * DIMS["hidden"] * 2


def test_profile_rule_files_use_the_profiles_gpu_count(sdist_tree):
    from ktlegacy.profiles import PROFILES
    for profile in PROFILES.values():
        devices = rule_devices(rules(sdist_tree, profile.rules))
        expected = {f"cuda:{i}" for i in range(profile.gpus)}
        assert devices == expected, (profile.name, devices)


def test_placement_follows_upstream_walk(sdist_tree):
    r = rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu.yaml")
    moe = set(range(3, 61))
    # kv_b_proj is excluded from the Linear rule by a negative lookahead; the layer default places it
    assert place(module_for_tensor("blk.40.attn_kv_b.weight", moe), r) == "cuda:1"
    assert place(module_for_tensor("blk.4.ffn_up_exps.weight", moe), r) == "cpu"
    assert place(module_for_tensor("blk.4.ffn_up_shexp.weight", moe), r) == "cuda:0"
    assert place(module_for_tensor("token_embd.weight", moe), r) == "cpu"
    assert place(module_for_tensor("output.weight", moe), r) == "cuda:1"
    assert module_for_tensor("blk.1.some_new_tensor.weight", moe) is None


def test_unknown_tensors_are_counted_on_cuda0_and_reported(model, sdist_tree):
    from ktlegacy.vram import Tensor
    model.tensors.append(Tensor("blk.0.mystery.weight", 1024 * 1024, 2 * 1024 * 1024))
    try:
        est = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu.yaml"), CACHE_LENS)
    finally:
        model.tensors.pop()
    assert est.unplaced == ["blk.0.mystery.weight"]
    assert est.weights_mib["cuda:0"] == pytest.approx(expected_mib(range(0, 30), False) + 2.0)


def test_no_gguf_and_broken_gguf_are_one_line(tmp_path):
    with pytest.raises(KtlegacyError, match="no \\*.gguf file in"):
        read_gguf(tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    with pytest.raises(KtlegacyError, match="broken.gguf is not a readable GGUF file") as exc:
        read_gguf(tmp_path)
    assert "\n" not in str(exc.value)


def test_bad_rule_file_is_one_line():
    with pytest.raises(KtlegacyError, match="not valid YAML"):
        load_rules("- match: [", "x.yaml")
    with pytest.raises(KtlegacyError, match="not a ktransformers rule list"):
        load_rules("a: 1", "x.yaml")
