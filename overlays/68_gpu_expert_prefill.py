"""gpu-expert-prefill: long prompts run the CPU-resident routed experts on the GPU.

``KExpertsCPU.forward`` sends every prompt's routed experts through the CPU backend
(``cpuinfer_ext``'s llamafile GEMMs). With the experts on the CPU that is nearly all of a prefill:
on the DeepSeek-V2-Lite-shaped benchmark model (bench/peer_run.sh) 95-99% of it, at ~285 tokens/s
on 16 Xeon cores, where llama.cpp, which copies the expert weights to the GPU for every batch of
32+ tokens, prefilled 512 tokens 1.9x faster. The prompt branch (the eager ``else:`` of
``forward``; decode's CUDA-graph branch is untouched) now first asks
``ktlegacy_runtime.experts_prefill_on_gpu``: a prompt of at least
``KTLEGACY_GPU_PREFILL_MIN_TOKENS`` tokens (default auto: the crossover measured on the first long
prompt; 0 turns it off) has each MoE layer's quantised experts copied to the layer's GPU in runs
that fit ``KTLEGACY_GPU_PREFILL_MIB`` (default 1024) of dequantised weights, and computed there in
the model dtype (fp16 below sm80), dequantised by the fastest kernels the build has for the type
(``ktlegacy_gguf_ops``, the gguf-linear overlay's, where built; else torch's or upstream's). Anything else (a weight type without a GPU dequantiser,
per-expert tensors, CUDA out of memory, a CPU output device) returns None and the CPU path runs
as before.

``KExpertsCPU.load`` hands its weights to ``ktlegacy_runtime.pin_experts`` before the CPU backend
takes their addresses: where the GPU path can run, each layer's experts are copied from the
GGUF's mmap into one page-locked buffer, which the backend then reads, so a prompt's copies to
the GPU run at the link's speed instead of through a CPU copy into pinned buffers.

Same prompt branch at every supported ref (0.2.1.post1 :219; from v0.2.4post1 it also passes
``bsz_tensor``, the rows that are real, so padded rows are not routed): the edit is the same.
"""

from ktlegacy.core.overlay import Overlay

EXPERTS = "ktransformers/operators/experts.py"  # v0.7.0 too: fetch-source lays its archive/ out at the root
IMPORT_LINE = "from ktransformers import ktlegacy_runtime  # ktlegacy"
BRANCH = "        else:\n            input_tensor = input_tensor.contiguous().cpu()\n"
HOOK = ("        else:\n"
        "            on_gpu = ktlegacy_runtime.experts_prefill_on_gpu(self, input_tensor, expert_ids, weights{bsz})"
        "  # ktlegacy: long prompts' experts on the GPU\n"
        "            if on_gpu is not None:\n"
        "                return on_gpu\n"
        "            input_tensor = input_tensor.contiguous().cpu()\n")
BSZ_LINE = "            bsz_tensor = bsz_tensor.contiguous().cpu()\n"
# KExpertsCPU.load, the same two lines at every ref: the weights go to page-locked memory before the
# CPU backend takes their addresses (ktlegacy_runtime.pin_experts)
LOAD = '        if w is None: w = self.load_weights()[self.key]\n        self.gate = w["gate"]\n'
LOAD_PINNED = ('        if w is None: w = self.load_weights()[self.key]\n'
               '        w = ktlegacy_runtime.pin_experts(self, w)  # ktlegacy: page-locked, so prompts on the GPU copy them at the link\'s speed\n'
               '        self.gate = w["gate"]\n')


class GpuExpertPrefillOverlay(Overlay):
    name = "gpu-expert-prefill"
    summary = "prompts of >= KTLEGACY_GPU_PREFILL_MIN_TOKENS run KExpertsCPU's routed experts on the GPU (weights streamed from the GGUF)"

    def apply(self, tree, ctx):
        rel = EXPERTS
        text = tree.read(rel)
        if "class KExpertsCPU(KExpertsBase):" not in text:
            raise tree.drift(rel, "class KExpertsCPU(KExpertsBase)")
        # the prompt branch is the first `else:` of KExpertsCPU.forward followed by the .cpu() copies
        body = text.split("class KExpertsCPU(KExpertsBase):", 1)[1].split("\nclass ", 1)[0]
        bsz = ", bsz_tensor" if BSZ_LINE in body else ""  # v0.2.4post1+: the real rows of a padded batch
        tree.replace(rel, BRANCH, HOOK.format(bsz=bsz), what="KExpertsCPU.forward: prompts of "
                     "KTLEGACY_GPU_PREFILL_MIN_TOKENS+ tokens ask ktlegacy_runtime.experts_prefill_on_gpu first")
        tree.replace(rel, LOAD, LOAD_PINNED, what="KExpertsCPU.load: the experts' weights in page-locked memory "
                     "(ktlegacy_runtime.pin_experts) before the CPU backend takes their addresses")
        tree.insert_line(rel, IMPORT_LINE, after=r"^import torch$", what="import ktlegacy_runtime")


OVERLAY = GpuExpertPrefillOverlay()
