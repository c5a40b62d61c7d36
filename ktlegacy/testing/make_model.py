"""``make-test-model``: the command that writes a synthetic checkpoint, either
:mod:`ktlegacy.testing.testmodel`'s small presets or :mod:`ktlegacy.testing.peer_model`'s
real-shaped ones. It sits on top of both, so neither imports the other's command."""

from __future__ import annotations

from pathlib import Path

from ..core.command import command
from ..core.errors import KtlegacyError
from . import require
from .peer_model import V3_DIMS, LiteSpec, make_lite_model
from .testmodel import (GGUF_NAME, LINEAR_QUANTS, MODEL_MODULES, PRESETS, TestModelSpec, make_test_model,
                        preset)


# ---- command line ------------------------------------------------------------------------

def _args(p) -> None:
    p.add_argument("--dest", required=True, type=Path, help="directory to write the model into")
    p.add_argument("--preset", choices=sorted(PRESETS) + ["v2-lite", "v3-dims"], default="v2",
                   help="v2: DeepSeek-V2-Lite layout, 6 layers; v3: DeepSeek-V3 layout (q LoRA, noaux_tc "
                        "router), 46 layers: every GPU of the 2- and 4-GPU V3 rule files gets layers; "
                        "v2-lite: DeepSeek-V2-Lite's real dimensions and quant mix (Q4_K experts, ~9.4 GiB, "
                        "for bench/peer_run.sh); v3-dims: DeepSeek-V3's real per-layer dimensions, 4 layers, "
                        "8 routed experts, Q4_K_M mix (~2.6 GiB; bench/gpu_linear.py); the last two: random "
                        "weights, ktlegacy/testing/peer_model.py")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (dense first, rest MoE; default: the preset's); "
                        "27 matches V2-Lite's multi-GPU rule split")
    p.add_argument("--seed", type=int, default=TestModelSpec.seed, help="weight RNG seed")
    p.add_argument("--linear-quant", choices=sorted(LINEAR_QUANTS), default=TestModelSpec.linear_quant,
                   help="types of the GPU-side matrices: q4_k_m (Q4_K/Q6_K/Q8_0, as a Q4_K_M file) or f16 "
                        "(v2/v3 presets)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --dest")


def _register():
    @command("make-test-model", "write a synthetic DeepSeek-V2/V3 GGUF checkpoint + config + tokenizer", _args)
    def run(args) -> int:
        require("make-test-model", *MODEL_MODULES)  # before any work: one line naming the extra
        if args.preset in ("v2-lite", "v3-dims"):
            base = V3_DIMS if args.preset == "v3-dims" else LiteSpec()
            out = make_lite_model(args.dest, seed=args.seed, force=args.force, base=base, vocab=base.vocab_size,
                                  layers=base.num_hidden_layers if args.layers is None else args.layers)
            print(f"wrote {out}: {args.preset} shapes, {(out / GGUF_NAME).stat().st_size / 2**30:.2f} GiB GGUF")
            return 0
        dense = PRESETS[args.preset].first_k_dense_replace
        layers = PRESETS[args.preset].num_hidden_layers if args.layers is None else args.layers
        if layers <= dense:
            raise KtlegacyError(f"--layers must be at least {dense + 1} for preset {args.preset} "
                                f"({dense} dense layer{'s' if dense > 1 else ''}, then MoE layers)")
        spec = preset(args.preset, num_hidden_layers=layers, seed=args.seed, linear_quant=args.linear_quant)
        out = make_test_model(args.dest, spec, force=args.force)
        size = (out / GGUF_NAME).stat().st_size
        print(f"wrote {out}: {spec.architecture}, {spec.num_hidden_layers} layers, vocab {spec.vocab_size}, "
              f"{size / 2**20:.0f} MiB GGUF ({spec.linear_quant} GPU matrices, F16 experts/embeddings, F32 norms/router)")
        return 0


_register()
