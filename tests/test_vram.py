"""The VRAM estimate: a GGUF written with the gguf package, placed by upstream's real rule files."""

from __future__ import annotations

import pytest

from ggufmodel import DIMS, layer_elements, write_model
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.vram import (GPU_RUNTIME_MIB, MIB, estimate, load_rules, module_for_tensor, place, read_gguf,
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


def prefill_mib() -> float:
    """One layer's tensors alive at the peak of an MLA prefill of CACHE_LENS tokens, fp16: the
    layer input and residual, q (q_b's rows), its rotated rope part (q_b's rows less the nope part
    of kv_b's), kv_b's output, then query, key, padded value, SDPA's output and its copy (q_b's
    rows each)."""
    rope = DIMS["q_head"] - (DIMS["kv_b_out"] - DIMS["o_in"])
    per_token = 2 * DIMS["hidden"] + DIMS["q_head"] + rope + DIMS["kv_b_out"] + 5 * DIMS["q_head"]
    return CACHE_LENS * per_token * 2 / MIB


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
    est = estimate(model, rules(sdist_tree, rule_file), CACHE_LENS, gpu_prefill_min_tokens=1024)
    assert est.unplaced == []
    assert est.gpu_devices == list(split)
    for dev, (layers, head) in split.items():
        assert est.weights_mib[dev] == pytest.approx(expected_mib(layers, head), rel=1e-9), dev
        assert est.kv_mib[dev] == pytest.approx(kv_mib(len(layers)), rel=1e-9), dev
        assert est.prefill_mib[dev] == pytest.approx(prefill_mib(), rel=1e-9), dev
        assert est.need_mib(dev) == pytest.approx(expected_mib(layers, head) + kv_mib(len(layers)) + prefill_mib()
                                                  + GPU_RUNTIME_MIB)
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


# DeepSeek-V3 / R1 at full size (shapes from its config.json: hidden 7168, 61 layers, first 3 dense
# with intermediate 18432, 256 routed experts + 1 shared of 2048, q_lora 1536, kv_lora 512, 128 heads
# of qk_nope 128 + qk_rope 64, v 128, vocab 129280), as tensor infos only: no file needed.
def deepseek_v3_model(ftype: str | None = None):
    """``ftype``: None (every tensor F16, as before quantized GPU weights), or a llama.cpp file type
    (Q4_K_M, Q2_K) whose tensor types ktlegacy.testing.ggml_quant.llama_cpp_type assigns."""
    from ktlegacy.testing.peer_model import V3_FULL, gguf_infos
    return gguf_infos(V3_FULL, ftype)


V100_32GB, RTX_2080TI, T4 = 32510, 11264, 15360   # MiB each card reports


def test_deepseek_v3_fp16_linears_on_the_profiles_cards(sdist_tree):
    """KTLEGACY_GPU_LINEAR=fp16 (KLinearTorch's fp16 copies), cache_lens 8192: 4x T4 fits, 1x
    V100-32GB and 2x stock RTX 2080 Ti (11 GiB) do not, 2x 22 GiB 2080 Ti would."""
    model = deepseek_v3_model("Q4_K_M")
    assert sum(t.n_elements for t in model.tensors) == pytest.approx(671.0e9, rel=1e-3)
    gib = 1024 ** 3 / MIB
    one = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat.yaml"), 8192, linear_mode="fp16")
    assert one.weights_mib["cuda:0"] / gib == pytest.approx(30.2, abs=0.1)
    assert one.need_mib("cuda:0") > 32510                       # Tesla V100-SXM2-32GB
    # an 8192-token prefill's peak: 2 x 7168 + 128 heads x (192 + 64 + 256 + 5*192) fp16 per token,
    # 3.09 GiB (the v3-dims preset measured the whole estimate within 7%: docs/performance.md)
    assert one.prefill_mib["cuda:0"] == pytest.approx(8192 * (2 * 7168 + 128 * 1472) * 2 / MIB)
    assert one.prefill_mib["cuda:0"] / gib == pytest.approx(3.09, abs=0.01)
    two = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu.yaml"), 8192, linear_mode="fp16")
    assert all(RTX_2080TI < two.need_mib(d) < 2 * RTX_2080TI for d in ("cuda:0", "cuda:1"))
    four = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu-4.yaml"), 8192, linear_mode="fp16")
    assert all(four.need_mib(f"cuda:{i}") < T4 for i in range(4))
    assert one.scratch_mib == {} and one.weights_mib == one.fp16_weights_mib


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K"])
def test_deepseek_v3_quantized_linears_on_the_profiles_cards(sdist_tree, ftype):
    """KTLEGACY_GPU_LINEAR=quant (the default), cache_lens 8192: the GPU weights are their GGUF
    blocks (attn_kv_b, which the attention reads as a dense weight, stays fp16), plus one fp16
    prefill scratch per GPU. 1x V100-32GB and 2x stock RTX 2080 Ti now hold DeepSeek-V3/R1;
    4x T4 with room. The unpatched rule files give the same answer as the patched ones."""
    model = deepseek_v3_model(ftype)
    gib = 1024 ** 3 / MIB
    one = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat.yaml"), 8192)
    assert one.linear_mode == "quant"
    # every GPU weight at its GGUF size but kv_b (fp16: 61 x 128*256*512 x 2 B = 1.91 GiB)
    kv_b = 61 * 128 * 256 * 512 * 2 / MIB
    gpu = [t for t in model.tensors if not t.name.endswith(("_exps.weight", "token_embd.weight"))]
    blocks = sum(t.n_bytes for t in gpu if "attn_kv_b" not in t.name and t.ggml_type != "F32") / MIB
    floats = sum(t.n_elements * 2 for t in gpu if t.ggml_type == "F32") / MIB   # norms, router: fp16 copies
    assert one.weights_mib["cuda:0"] == pytest.approx(kv_b + blocks + floats)
    assert one.scratch_mib["cuda:0"] == pytest.approx(256)     # the dense layers' 18432 x 7168 fp16 > 256 MiB
    assert one.need_mib("cuda:0") < V100_32GB
    assert one.weights_mib["cuda:0"] < one.fp16_weights_mib["cuda:0"] / 2.5
    two = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu.yaml"), 8192)
    assert all(two.need_mib(d) < RTX_2080TI for d in ("cuda:0", "cuda:1"))
    four = estimate(model, rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu-4.yaml"), 8192)
    assert all(four.need_mib(f"cuda:{i}") < 0.75 * T4 for i in range(4))
    patched = [{**r, "replace": {**r["replace"], "kwargs": {**r["replace"].get("kwargs", {})}}}
               for r in rules(sdist_tree, "DeepSeek-V3-Chat.yaml")]
    from ktlegacy.core.gpu_linear import patched_rules
    again = estimate(model, patched_rules(patched), 8192)
    assert again.weights_mib == one.weights_mib and again.need_mib("cuda:0") == one.need_mib("cuda:0")
    print(f"{ftype}: 1 GPU {one.need_mib('cuda:0') / gib:.1f} GiB; 2 GPUs "
          f"{[round(two.need_mib(d) / gib, 1) for d in two.gpu_devices]}; 4 GPUs "
          f"{[round(four.need_mib(d) / gib, 1) for d in four.gpu_devices]}")


def test_gpu_experts_prefill_term(model, sdist_tree):
    """Overlay 68's transient (KTLEGACY_GPU_PREFILL_MIB of expert weights, two staged runs of their raw
    GGUF bytes, the prompt's hidden states, fp16 in and fp32 out) counts when cache_lens reaches the
    threshold ("auto": always), as the larger of it and the attention's intermediates, on every GPU
    whose layers have routed experts."""
    four = rules(sdist_tree, "DeepSeek-V3-Chat-multi-gpu-4.yaml")
    below = estimate(model, four, CACHE_LENS, gpu_prefill_min_tokens=1024)  # 1000 < 1024: never taken
    assert below.experts_prefill_mib == {}
    at = estimate(model, four, 1024, gpu_prefill_min_tokens=1024)
    # the test model's experts are F32: a run's raw bytes are 3 x 4 / 10 of its dequantised budget
    term = 1024 * (1 + 2 * 3 * 4 / 10) + 1024 * DIMS["hidden"] * 6 / MIB
    assert at.experts_prefill_mib == {d: pytest.approx(term) for d in ("cuda:0", "cuda:1", "cuda:2", "cuda:3")}
    for d in at.gpu_devices:
        assert at.prefill_peak_mib(d) == max(at.prefill_mib[d], term)
        assert at.need_mib(d) == pytest.approx(at.weights_mib[d] + at.kv_mib[d] + max(at.prefill_mib[d], term)
                                               + GPU_RUNTIME_MIB)
    assert estimate(model, four, 1024, gpu_prefill_min_tokens=0).experts_prefill_mib == {}
    assert estimate(model, four, CACHE_LENS, gpu_prefill_min_tokens="auto").experts_prefill_mib["cuda:0"] \
        == pytest.approx(term - 24 * DIMS["hidden"] * 6 / MIB)
    assert estimate(model, four, 1024, gpu_prefill_min_tokens=1024, gpu_prefill_mib=256).experts_prefill_mib["cuda:0"] \
        == pytest.approx(term - 768 * 3.4)
    # DeepSeek-V3 at 8192 tokens, F16 experts: 2253 + 336 MiB; Q4_K_M (Q4_K/Q6_K experts): less; both
    # under its 3.09 GiB of attention
    v3 = estimate(deepseek_v3_model(), four, 8192)
    assert v3.experts_prefill_mib["cuda:3"] == pytest.approx(1024 * (1 + 0.6 * 2) + 8192 * 7168 * 6 / MIB)
    assert all(v3.prefill_peak_mib(d) == v3.prefill_mib[d] for d in v3.gpu_devices)
