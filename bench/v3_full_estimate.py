#!/usr/bin/env python3
"""What the doctor says for the whole DeepSeek-V3/R1 on each profile's cards (issue 22, item 4).

    python bench/v3_full_estimate.py --out bench/results/v3_full_estimate.json

No GPU and no download: the model is DeepSeek-V3's tensor list at full size
(``ktlegacy.testing.peer_model.V3_FULL``: 61 layers, 256 routed experts, 671B parameters), each
tensor in the type llama.cpp's quantizer gives it for Q4_K_M and for Q2_K
(``ktlegacy.testing.ggml_quant.llama_cpp_type``, an approximation of llama-quant.cpp's rules for
DeepSeek's tensor names), and the estimate is the doctor's own (``ktlegacy.vram.estimate``) with
each profile's default rule file from the upstream sdist (read as the rule overlay leaves it),
cache_lens 8192, for ``KTLEGACY_GPU_LINEAR`` quant and fp16. ``t4x1`` is one 16 GB T4 with the
single-GPU rule file. A card fits when the estimate is below the memory nvidia-smi reports for it.
The measured check of the estimate at DeepSeek-V3's real dimensions is bench/gpu_linear_model.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CARD_MIB = {"Tesla V100-SXM2-32GB": 32510, "GeForce RTX 2080 Ti": 11264, "Tesla T4": 15360}   # nvidia-smi's totals
CASES = {  # name -> (rule file, card)
    "v100": ("DeepSeek-V3-Chat.yaml", "Tesla V100-SXM2-32GB"),
    "2080ti-x2": ("DeepSeek-V3-Chat-multi-gpu.yaml", "GeForce RTX 2080 Ti"),
    "t4x4": ("DeepSeek-V3-Chat-multi-gpu-4.yaml", "Tesla T4"),
    "t4x1": ("DeepSeek-V3-Chat.yaml", "Tesla T4"),
}
CACHE_LENS = 8192
GIB = 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sdist-tree", type=Path, help="a fetched 0.2.1.post1 tree (default: fetch it into a temp dir)")
    args = p.parse_args(argv)
    from ktlegacy import vram
    from ktlegacy.profiles import PROFILES
    from ktlegacy.testing.peer_model import V3_FULL, gguf_infos
    tree = args.sdist_tree
    if tree is None:
        from ktlegacy.core.source import fetch_source
        tree = Path(tempfile.mkdtemp()) / "src"
        fetch_source(tree, "0.2.1.post1")
    for name, (rules, _) in CASES.items():   # the profiles' own defaults (t4x1: v100's file on a T4)
        if name in PROFILES:
            assert PROFILES[name].rules == rules, (name, PROFILES[name].rules)
    out: dict = {"cache_lens": CACHE_LENS, "cards_mib": CARD_MIB, "v3_full_estimate_gib": {}}
    for ftype in ("Q4_K_M", "Q2_K"):
        model = gguf_infos(V3_FULL, ftype)
        for mode in ("quant", "fp16"):
            key = f"{ftype}/{mode}"
            out["v3_full_estimate_gib"][key] = {}
            for name, (rules, card) in CASES.items():
                text = (tree / "ktransformers/optimize/optimize_rules" / rules).read_text()
                est = vram.estimate(model, vram.load_rules(text, rules), CACHE_LENS, linear_mode=mode)
                per_gpu = {d: round(est.need_mib(d) / GIB, 2) for d in est.gpu_devices}
                out["v3_full_estimate_gib"][key][name] = {
                    "rule_file": rules, "card": card, "card_gib": round(CARD_MIB[card] / GIB, 2), "per_gpu_gib": per_gpu,
                    "weights_gib": {d: round(est.weights_mib.get(d, 0) / GIB, 2) for d in est.gpu_devices},
                    "fits": all(est.need_mib(d) < CARD_MIB[card] for d in est.gpu_devices)}
                print(f"{key:12s} {name:10s} {card:22s} " + "  ".join(f"{d} {g:5.1f}" for d, g in per_gpu.items())
                      + f"  fits={out['v3_full_estimate_gib'][key][name]['fits']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
