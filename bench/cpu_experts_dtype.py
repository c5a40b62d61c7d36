"""The CPU MoE backend with fp16 activations: the ggml type it is told decides whether it computes.

    PYTHONPATH=BUILD_DIR python bench/cpu_experts_dtype.py [--out FILE.json]

BUILD_DIR holds a ``cpuinfer_ext`` built from a patched upstream tree (v0.4.1+ API: MOEConfig
with ``use_silu``, ``forward`` with a batch-size tensor), e.g. the C++ side configured with cmake
(see docs/compatibility.md, "v0.7.0"). Needs no GPU. Runs one small llamafile MoE (8 experts,
top-2, hidden 256, F16 weights) on fp16 activations twice: told ``hidden_type`` F16 (what the
cpu-experts-dtype overlay passes when the model runs in fp16, below sm80) and BF16 (upstream's
hard-coded 30), and compares each with the float64 reference of ``ktlegacy.testing.moe_reference``. Prints one line per type and writes
the JSON if asked.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import cpuinfer_ext

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ktlegacy.testing.moe_reference import moe_reference  # noqa: E402


def run() -> dict:
    torch.manual_seed(0)
    experts, top_k, hidden, inter, tokens = 8, 2, 256, 128, 4
    gate = torch.randn((experts, inter, hidden), dtype=torch.float16).contiguous()
    up = torch.randn((experts, inter, hidden), dtype=torch.float16).contiguous()
    down = torch.randn((experts, hidden, inter), dtype=torch.float16).contiguous()
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).contiguous()
    weights = torch.rand((tokens, top_k), dtype=torch.float32).contiguous()
    x = (torch.randn((tokens, hidden), dtype=torch.float16) / 100).contiguous()
    ref = moe_reference(x, ids, weights, gate, up, down)
    cpu = cpuinfer_ext.CPUInfer(2)
    results = {}
    for hidden_type, name in ((1, "F16"), (30, "BF16")):
        cfg = cpuinfer_ext.moe.MOEConfig(experts, top_k, hidden, inter, 32, 10, 1024, True, gate.data_ptr(),
                                         up.data_ptr(), down.data_ptr(), 1, 1, 1, hidden_type)
        moe = cpuinfer_ext.moe.MOE(cfg)
        out = torch.zeros((tokens, hidden), dtype=torch.float16).contiguous()
        bsz = torch.tensor([tokens], dtype=torch.int32)
        cpu.submit(moe.forward(tokens, top_k, ids.data_ptr(), weights.data_ptr(), x.data_ptr(), out.data_ptr(),
                               bsz.data_ptr()))
        cpu.sync()
        err = ((out.double() - ref).abs().mean() / ref.abs().mean()).item()
        results[name] = err
        print(f"hidden_type {name} ({hidden_type}), fp16 activations: mean relative error {err:.3g} vs float64")
    return {"relative_error": results, "shape": {"experts": experts, "top_k": top_k, "hidden": hidden,
                                                 "intermediate": inter, "tokens": tokens},
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    result = run()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
            fh.write("\n")


if __name__ == "__main__":
    main()
