#!/usr/bin/env python3
"""The doctor's VRAM estimate vs the per-device memory a GPU run measured (issue 7's check).

    python bench/vram_vs_doctor.py --proof bench/results/gpu_h100_0.2.1.post1.json \
        --model DIR --rules PATCHED_TREE/ktransformers/optimize/optimize_rules/DeepSeek-V2-Lite-Chat.yaml \
        --out bench/results/vram_vs_doctor_h100.json

MODEL is ``invoke make-test-model --dest DIR`` (same code, same seed as the GPU run: the same
GGUF). The proof JSON's ``engine_memory`` holds what torch measured on the GPU: the weights and
buffers the engine loaded, and the peak over the end-to-end benchmark (prefill of
``cache_tokens`` minus the decode steps, with a static cache of ``cache_tokens``). The
estimate is ktlegacy.vram's, with the same cache length. Single GPU only: the multi-GPU rule
files need machines this project was not lent (issue 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MIB = 2 ** 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proof", required=True, type=Path, help="gpu_proof.py results JSON")
    p.add_argument("--model", required=True, type=Path, help="make-test-model directory")
    p.add_argument("--rules", required=True, type=Path, help="the (patched) rule file the run used")
    p.add_argument("--out", required=True, type=Path, help="comparison JSON to write")
    args = p.parse_args(argv)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ktlegacy import vram

    proof = json.loads(args.proof.read_text())
    measured = proof["engine_memory"]
    est = vram.estimate(vram.read_gguf(args.model), vram.load_rules(args.rules.read_text()), measured["cache_tokens"])
    device = "cuda:0"
    weights_mib = est.weights_mib.get(device, 0.0)
    kv_mib = est.kv_mib.get(device, 0.0)
    out = {
        "device": proof.get("device"),
        "rule_file": args.rules.name,
        "cache_tokens": measured["cache_tokens"],
        "estimate_mib": {"weights": weights_mib, "kv_cache": kv_mib, "prefill": est.prefill_peak_mib(device),
                         "runtime": vram.GPU_RUNTIME_MIB,
                         "total": est.need_mib(device)},
        "measured_mib": {"weights_and_buffers": measured["weights_and_buffers_bytes"] / MIB,
                         "peak_allocated": measured["peak_allocated_bytes"] / MIB,
                         "peak_reserved": measured["peak_reserved_bytes"] / MIB,
                         "device_used_after": measured["device_used_bytes_after"] / MIB},
    }
    m = out["measured_mib"]
    out["weights_estimate_vs_measured"] = weights_mib / m["weights_and_buffers"]
    out["total_estimate_vs_device_used"] = est.need_mib(device) / m["device_used_after"]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
