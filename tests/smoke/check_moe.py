#!/usr/bin/env python3
"""One MoE layer of the CPU experts (cpuinfer_ext's MOE, ktransformers' CPU backend) against the
float64 reference (ktlegacy/testing/moe_reference.py, the one the repository's MoE tests use).

8 experts, top-2, hidden 256, intermediate 1408 (DeepSeek-V2-Lite's, not a multiple of 256), F16
weights, fp16 activations: 32 tokens take the prefill path (forward_many), 4 the decode path
(forward_one). CPU only. Skipped on the stand-in (nothing compiled) and on a CPU without the
image's instruction set.
"""

import importlib.util

from smokelib import fail, helper_file, missing_cpu_flags, skip, standin

if standin():
    skip("stand-in build, no CUDA: cpuinfer_ext was not compiled")
lacking = missing_cpu_flags()
if lacking:
    skip(f"this CPU lacks {' '.join(lacking)}, which the image's CPU set needs")

import torch  # noqa: E402  first: the extensions link torch's libraries

try:
    import cpuinfer_ext  # noqa: E402
except Exception as exc:
    fail(f"import cpuinfer_ext: {type(exc).__name__}: {exc}")

spec = importlib.util.spec_from_file_location("moe_reference", helper_file("moe_reference.py"))
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)

EXPERTS, TOP_K, HIDDEN, INTER = 8, 2, 256, 1408
# One CPUInfer for the process, as the server keeps one: a CPUInfer made and dropped per call hung
# once in its destructor here (the smoke's timeout in run.py turns such a hang into a failure).
CPU = cpuinfer_ext.CPUInfer(2)
F16 = 1  # ggml_type GGML_TYPE_F16
TOLERANCE = 2e-2  # fp16 activations and outputs; a wrong row block is off by ~1


def run(tokens: int) -> float:
    torch.manual_seed(tokens)
    gate = (torch.randn((EXPERTS, INTER, HIDDEN)) / 16).half().contiguous()
    up = (torch.randn((EXPERTS, INTER, HIDDEN)) / 16).half().contiguous()
    down = (torch.randn((EXPERTS, HIDDEN, INTER)) / 16).half().contiguous()
    ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(tokens)]).long().contiguous()
    weights = torch.rand((tokens, TOP_K), dtype=torch.float32).contiguous()
    x = torch.randn((tokens, HIDDEN)).half().contiguous()
    ref = reference.moe_reference(x, ids, weights, gate, up, down)
    cpu = CPU
    # stride 64 (forward_one's blocks), group_min_len 10 (more tokens: forward_many), group_max_len 1024
    cfg = cpuinfer_ext.moe.MOEConfig(EXPERTS, TOP_K, HIDDEN, INTER, 64, 10, 1024, gate.data_ptr(), up.data_ptr(),
                                     down.data_ptr(), F16, F16, F16, F16)
    moe = cpuinfer_ext.moe.MOE(cfg)
    out = torch.zeros((tokens, HIDDEN), dtype=torch.float16).contiguous()
    cpu.submit(moe.forward(tokens, TOP_K, ids.data_ptr(), weights.data_ptr(), x.data_ptr(), out.data_ptr()))
    cpu.sync()
    return ((out.double() - ref).abs().mean() / ref.abs().mean()).item()


errors = {}
for tokens in (32, 4):
    try:
        errors[tokens] = run(tokens)
    except Exception as exc:
        fail(f"cpuinfer_ext MoE forward ({tokens} tokens): {type(exc).__name__}: {exc}")
bad = {t: e for t, e in errors.items() if not e < TOLERANCE}
if bad:
    fail("cpuinfer_ext MoE layer differs from the float64 reference: "
         + ", ".join(f"{t} tokens: mean relative error {e:.3g}" for t, e in bad.items()) + f" (limit {TOLERANCE})")
print(f"cpuinfer_ext MoE layer ({EXPERTS} experts, top-{TOP_K}, {HIDDEN}x{INTER}, F16) matches the float64 reference: "
      + ", ".join(f"{t} tokens {e:.1e}" for t, e in errors.items()))
