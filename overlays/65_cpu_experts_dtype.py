"""cpu-experts-dtype: the CPU MoE backend is told the activations' real dtype (fp16 below sm80).

0.2.1.post1's ``KExpertsCPU.load`` hard-codes the activations' ggml type as 30 (BF16, "TODO: get
from model.dtype") and allocates its pinned output buffer as bf16. Under the fp16 overlay the
activations are fp16, so the C++ backend read fp16 bits as bf16 and wrote bf16 into tensors
read as fp16: every routed-expert output was garbage (found on the H100 with
KTLEGACY_EMULATE_CC=7.5: 0/32 greedy tokens vs the fp32 reference, NaN on one prompt; 32/32 once
the activations reach the backend in the type it expects). The type now follows
``torch.get_default_dtype()`` at load time, the model's dtype (ggml: F32 0, F16 1, BF16 30),
and the output buffer uses that dtype too.
"""

from ktlegacy.overlay import Overlay

EXPERTS = "ktransformers/operators/experts.py"
HIDDEN_TYPE = "            30, # TODO: get from model.dtype\n"
HIDDEN_TYPE_NEW = ("            {torch.float32: 0, torch.float16: 1}.get(torch.get_default_dtype(), 30),"
                   "  # ktlegacy: ggml type of the activations = the model dtype\n")
OUTPUT = ('KExpertsCPU.output_cpu = torch.zeros((self.config.hidden_size), device="cpu", pin_memory=True, '
          'dtype=torch.bfloat16)')
OUTPUT_NEW = ('KExpertsCPU.output_cpu = torch.zeros((self.config.hidden_size), device="cpu", pin_memory=True, '
              'dtype=torch.get_default_dtype())  # ktlegacy: same dtype as the activations')


class CpuExpertsDtypeOverlay(Overlay):
    name = "cpu-experts-dtype"
    summary = "KExpertsCPU: activations' ggml type and output buffer follow the model dtype (not always BF16)"
    refs = ("0.2.1.post1",)  # verified there on the H100 (bench/gpu_proof.py)

    def apply(self, tree, ctx):
        tree.replace(EXPERTS, HIDDEN_TYPE, HIDDEN_TYPE_NEW, what="MOEConfig hidden type: 30 (BF16) -> the model dtype's")
        tree.replace(EXPERTS, OUTPUT, OUTPUT_NEW, what="output_cpu buffer: bf16 -> the model dtype")


OVERLAY = CpuExpertsDtypeOverlay()
