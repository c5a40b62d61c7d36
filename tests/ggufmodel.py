"""A tiny DeepSeek-V3-shaped GGUF for the doctor's tests, written with the real ``gguf`` package.

61 blocks like DeepSeek-V3 (so upstream's multi-GPU rule regexes split it the way they split
the real model), the first 3 dense, the rest MoE with routed and shared experts; dimensions are
tiny. :data:`DIMS` and :func:`layer_elements` give the arithmetic the tests check against,
computed from the shapes here, independently of ktlegacy.vram's name mapping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIMS = dict(hidden=64, vocab=100, layers=61, dense_layers=3, experts=4, moe_inter=32, dense_inter=128,
            q_lora=48, q_head=96, kv_lora=32, rope=8, kv_b_out=128, o_in=64)


def _shapes(layer: int) -> dict[str, tuple]:
    d = DIMS
    h = d["hidden"]
    s = {
        "attn_norm": (h,), "ffn_norm": (h,),
        "attn_q_a": (d["q_lora"], h), "attn_q_a_norm": (d["q_lora"],), "attn_q_b": (d["q_head"], d["q_lora"]),
        "attn_kv_a_mqa": (d["kv_lora"] + d["rope"], h), "attn_kv_a_norm": (d["kv_lora"],),
        "attn_kv_b": (d["kv_b_out"], d["kv_lora"]), "attn_output": (h, d["o_in"]),
    }
    if layer < d["dense_layers"]:
        s.update(ffn_gate=(d["dense_inter"], h), ffn_up=(d["dense_inter"], h), ffn_down=(h, d["dense_inter"]))
    else:
        e, m = d["experts"], d["moe_inter"]
        s.update(ffn_gate_inp=(e, h), exp_probs_b=(e,),
                 ffn_gate_exps=(e, m, h), ffn_up_exps=(e, m, h), ffn_down_exps=(e, h, m),
                 ffn_gate_shexp=(m, h), ffn_up_shexp=(m, h), ffn_down_shexp=(h, m))
    return s


def layer_elements(layer: int) -> tuple[int, int]:
    """(non-expert elements, routed-expert elements) of one block."""
    non_expert = experts = 0
    for name, shape in _shapes(layer).items():
        n = int(np.prod(shape))
        if name.endswith("_exps"):
            experts += n
        else:
            non_expert += n
    return non_expert, experts


def write_model(directory: Path, name: str = "tiny-deepseek-v3.gguf") -> Path:
    import gguf

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    d = DIMS
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(d["layers"])
    w.add_embedding_length(d["hidden"])
    w.add_uint32("deepseek2.attention.kv_lora_rank", d["kv_lora"])
    w.add_uint32("deepseek2.rope.dimension_count", d["rope"])
    w.add_uint32("deepseek2.leading_dense_block_count", d["dense_layers"])
    w.add_tensor("token_embd.weight", np.zeros((d["vocab"], d["hidden"]), dtype=np.float16))
    for layer in range(d["layers"]):
        for part, shape in _shapes(layer).items():
            # experts as f32 so "bytes left in host RAM" differs from 2 x elements
            dtype = np.float32 if part.endswith("_exps") else np.float16
            w.add_tensor(f"blk.{layer}.{part}.weight", np.zeros(shape, dtype=dtype))
    w.add_tensor("output_norm.weight", np.zeros((d["hidden"],), dtype=np.float16))
    w.add_tensor("output.weight", np.zeros((d["vocab"], d["hidden"]), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
