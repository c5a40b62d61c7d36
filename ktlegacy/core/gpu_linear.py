"""Which op a rule file's GPU linears run as below sm80, and what their weights cost there.

One place for what the rule overlay (``overlays/20_torch_linear_rules.py``) writes into the rule
files and what the doctor's VRAM estimate (``ktlegacy/vram.py``) assumes about them:

* ops that need sm80+ and the op each becomes (every GPU linear becomes ``KLinearGGUF``, the
  operator of ``overlays/15_gguf_linear.py``; KExpertsMarlin becomes KExpertsTorch);
* ``lm_head``: left a plain ``nn.Linear`` on a GPU by a rule file, the overlay injects it as a
  KLinearGGUF linear on the same devices (:func:`lm_head_devices`);
* what a weight costs on the GPU: its GGUF blocks under KLinearGGUF with ``KTLEGACY_GPU_LINEAR=quant``
  for the types its kernels decode, 2 bytes per value otherwise (KLinearTorch's fp16 copy).
"""

from __future__ import annotations

import copy
import re

from . import facts

GPU_LINEAR_ENV = "KTLEGACY_GPU_LINEAR"
GPU_LINEAR_OP = "KLinearGGUF"
LINEAR_CLASS = "ktransformers.operators.linear.KTransformersLinear"
LINEAR_CLASSES = ("torch.nn.Linear", "torch.nn.modules.linear.Linear")   # what lm_head is
SM80_ONLY = facts.SM80_ONLY_OPS   # ops that need sm80+: none may be left in a patched rule file
# op -> the op the patched rules name instead (KExpertsTorch is in every supported ref).
PATCHED_OP = {
    "KLinearMarlin": GPU_LINEAR_OP,
    "VLinearMarlin": GPU_LINEAR_OP,
    "KLinearFP8": GPU_LINEAR_OP,
    "KLinearTorch": GPU_LINEAR_OP,
    "KExpertsMarlin": "KExpertsTorch",
}
# GGUF types KLinearGGUF's kernels decode (overlays/gguf_linear/ktlegacy_gguf.cuh)
DECODED_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
OP_KEYS = ("generate_op", "prefill_op")


def lm_head_devices(rules: list) -> tuple[str, str] | None:
    """(generate, prefill) device of ``lm_head`` when ``rules`` leave it a plain nn.Linear on a GPU
    (as upstream's gen_optimize_config resolves it: the first rule whose name and class match,
    else the default device cuda:0); None when a rule injects it or puts it on the CPU."""
    for rule in rules:
        match = rule.get("match") or {}
        if "class" in match and match["class"] not in LINEAR_CLASSES:
            continue
        if "name" in match and re.search(str(match["name"]), "lm_head") is None:
            continue
        replace = rule.get("replace") or {}
        if replace.get("class", "default") != "default":
            return None
        kwargs = replace.get("kwargs") or {}
        generate = str(kwargs.get("generate_device", "cuda:0"))
        prefill = str(kwargs.get("prefill_device", generate))
        return (generate, prefill) if generate.startswith("cuda") else None
    return ("cuda:0", "cuda:0")


def lm_head_rule(generate: str, prefill: str) -> dict:
    """The rule the overlay puts in front of a rule file for lm_head (parsed form)."""
    return {"match": {"name": "^lm_head$", "class": "torch.nn.Linear"},
            "replace": {"class": LINEAR_CLASS,
                        "kwargs": {"generate_device": generate, "prefill_device": prefill,
                                   "generate_op": GPU_LINEAR_OP, "prefill_op": GPU_LINEAR_OP}}}


def patched_rules(rules: list) -> list:
    """``rules`` (parsed) as the rule overlay leaves them: ops mapped by PATCHED_OP, the lm_head
    rule in front where it applies. A rule file that is already patched comes back equal."""
    out = copy.deepcopy(rules)
    for rule in out:
        kwargs = ((rule or {}).get("replace") or {}).get("kwargs") or {}
        for key in OP_KEYS:
            if kwargs.get(key) in PATCHED_OP:
                kwargs[key] = PATCHED_OP[kwargs[key]]
    devices = lm_head_devices(out)
    return ([lm_head_rule(*devices)] if devices else []) + out


def weight_bytes(n_elements: int, n_bytes: int, ggml_type: str, op: str | None, linear_mode: str) -> int:
    """GPU bytes of one weight tensor: its GGUF blocks where KLinearGGUF keeps them (op KLinearGGUF,
    ``quant`` mode, a type the kernels decode), else an fp16 copy (2 bytes per value)."""
    if op == GPU_LINEAR_OP and linear_mode == "quant" and ggml_type in DECODED_TYPES:
        return n_bytes
    return n_elements * 2


def scratch_bytes(n_elements: int) -> int:
    """The prefill scratch one KLinearGGUF weight needs (fp16, capped at facts.GPU_LINEAR_SCRATCH_MIB);
    a GPU holds one buffer, as large as its largest such weight's."""
    return min(n_elements * 2, facts.GPU_LINEAR_SCRATCH_MIB * 2**20)
