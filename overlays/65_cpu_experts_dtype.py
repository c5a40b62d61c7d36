"""cpu-experts-dtype: the CPU MoE backend is told the activations' real dtype (fp16 below sm80).

0.2.1.post1's ``KExpertsCPU.load`` hard-codes the activations' ggml type as 30 (BF16, "TODO: get
from model.dtype") and allocates its pinned output buffer as bf16. Under the fp16 overlay the
activations are fp16, so the C++ backend read fp16 bits as bf16 and wrote bf16 into tensors
read as fp16: every routed-expert output was garbage (found on the H100 with
KTLEGACY_EMULATE_CC=7.5: 0/32 greedy tokens vs the fp32 reference, NaN on one prompt; 32/32 once
the activations reach the backend in the type it expects). The type now follows
``torch.get_default_dtype()`` at load time, the model's dtype (ggml: F32 0, F16 1, BF16 30),
and the output buffer uses that dtype too. The llamafile backend converts with ggml's
``to_float``/``from_float`` of ``hidden_type``, so F16 is as supported there as BF16.

The git tags keep the bug (read at each tag; line numbers of the unpatched file):

* v0.2.4post1 ``operators/experts.py``: the same ``30, # TODO: get from model.dtype`` (:181);
  the pinned output buffers, now one per CUDA graph (list, :200) or one for all (:206), are
  ``dtype=torch.bfloat16`` while the input buffers (:197, :203) take the default dtype. Same
  edits as 0.2.1.post1, on both output forms.
* v0.3.1 and v0.3.2 ``operators/experts.py``: ``hidden_type = 1`` only when
  ``torch.xpu.is_available()`` and fp16 (:184-185), else 30 (:187); the output buffers are
  ``model_dtype`` on XPU only (:264), bf16 otherwise (:257, :267). So on CUDA in fp16 the
  llamafile backend still reads fp16 as bf16. The ``else`` branch now maps the model dtype
  like 0.2.1.post1's fix; both bf16 output forms take the default dtype.
  These tags add AMX backends (``backend: AMXInt8``/``AMXBF16`` in ``*-amx.yaml`` rules,
  :206, :224) whose kernels read and write bf16 only (``csrc/.../amx/moe.hpp``: ``ggml_bf16_t``
  input and output) and have no hidden-type setting; their input buffers follow the default
  dtype, so in fp16 they compute on garbage too. Converting at the boundary would change the
  shared class-level buffers every KExpertsCPU uses, unverified on a GPU; instead ``load``
  refuses an AMX backend unless the model runs in bf16, naming the fix (use ``llamafile``).

The CPU linear op ``KLinearCPUInfer`` (``operators/linear.py``; rules: v0.2.4post1's
``rocm/DeepSeek-V3-Chat.yaml``, v0.3.x's ``DeepSeek-V2-Lite-Chat-gpu-cpu.yaml`` too, and any
user rule) has the same bug at every ref: ``LinearConfig(..., self.weight_type, 30)`` and a
bf16 ``output_cpu`` (0.2.1.post1 :337/:344, v0.2.4post1 :752/:759, v0.3.1 :754/:761, v0.3.2
:780/:787), in front of the same ggml conversion (``llamafile/linear.cpp``, identical at every
ref). It gets the same two edits. It is in no rule the H100 run used, so this is read, not run.
"""

from ktlegacy.core.overlay import Overlay

EXPERTS = "ktransformers/operators/experts.py"
LINEAR = "ktransformers/operators/linear.py"
MARK = "  # ktlegacy: "
GGML_TYPE_OF_DEFAULT_DTYPE = "{torch.float32: 0, torch.float16: 1}.get(torch.get_default_dtype(), 30)"

# 0.2.1.post1 and v0.2.4post1: the hidden type is a literal argument of MOEConfig.
HIDDEN_TYPE = "            30, # TODO: get from model.dtype\n"
HIDDEN_TYPE_NEW = ("            " + GGML_TYPE_OF_DEFAULT_DTYPE + ","
                   + MARK + "ggml type of the activations = the model dtype\n")

# v0.3.1, v0.3.2: computed before MOEConfig, fp16 only on XPU.
HIDDEN_TYPE_V03 = "            hidden_type = 30 # bf16\n"
HIDDEN_TYPE_V03_NEW = ("            hidden_type = {torch.float32: 0, torch.float16: 1}.get(model_dtype, 30)"
                       + MARK + "ggml type of the activations = the model dtype, on CUDA too\n")
AMX_GUARD_ANCHOR = '        if self.backend == "llamafile":\n            moe_config = MOEConfig(\n'
AMX_GUARD = (
    '        if self.backend != "llamafile" and model_dtype != torch.bfloat16:' + MARK + "AMX kernels read/write bf16 only\n"
    '            raise ValueError(f"KExpertsCPU backend {self.backend} computes in bf16 only but the model runs in '
    '{model_dtype} (ktlegacy runs bf16 models in fp16 below sm80): set backend: llamafile for the CPU experts in the optimize rule")\n'
)

BF16 = "dtype=torch.bfloat16)"
DEFAULT = "dtype=torch.get_default_dtype())"

OUTPUT = ('KExpertsCPU.output_cpu = torch.zeros((self.config.hidden_size), device="cpu", pin_memory=True, '
          'dtype=torch.bfloat16)')
OUTPUT_NEW = ('KExpertsCPU.output_cpu = torch.zeros((self.config.hidden_size), device="cpu", pin_memory=True, '
              'dtype=torch.get_default_dtype())  # ktlegacy: same dtype as the activations')
# v0.2.4post1 on: one buffer per captured CUDA graph size (list), or one for all.
OUTPUT_PER_GRAPH = ('KExpertsCPU.output_cpu = [torch.zeros((cuda_graphs[i], self.config.hidden_size), device="cpu", '
                    'pin_memory=True, dtype=torch.bfloat16) for i in range(len(cuda_graphs))]')
OUTPUT_PER_GRAPH_NEW = OUTPUT_PER_GRAPH.replace(BF16, DEFAULT) + MARK + "same dtype as the activations"
OUTPUT_ONE = ('KExpertsCPU.output_cpu = torch.zeros((cuda_graphs, self.config.hidden_size), device="cpu", '
              'pin_memory=True, dtype=torch.bfloat16)')
OUTPUT_ONE_NEW = OUTPUT_ONE.replace(BF16, DEFAULT) + MARK + "same dtype as the activations"

_V024 = (
    (HIDDEN_TYPE, HIDDEN_TYPE_NEW, "MOEConfig hidden type: 30 (BF16) -> the model dtype's"),
    (OUTPUT_PER_GRAPH, OUTPUT_PER_GRAPH_NEW, "output_cpu buffers per CUDA graph: bf16 -> the model dtype"),
    (OUTPUT_ONE, OUTPUT_ONE_NEW, "output_cpu buffer: bf16 -> the model dtype"),
)
_V03 = (
    (HIDDEN_TYPE_V03, HIDDEN_TYPE_V03_NEW, "hidden_type on CUDA: 30 (BF16) -> the model dtype's"),
    (AMX_GUARD_ANCHOR, AMX_GUARD + AMX_GUARD_ANCHOR, "AMX backends refused unless the model runs in bf16"),
    (OUTPUT_PER_GRAPH, OUTPUT_PER_GRAPH_NEW, "output_cpu buffers per CUDA graph: bf16 -> the model dtype"),
    (OUTPUT_ONE, OUTPUT_ONE_NEW, "output_cpu buffer (non-XPU): bf16 -> the model dtype"),
)
# KLinearCPUInfer.load, the same text at every ref.
LINEAR_HIDDEN_TYPE = "self.weight_type, 30)\n"
LINEAR_HIDDEN_TYPE_NEW = ("self.weight_type, " + GGML_TYPE_OF_DEFAULT_DTYPE + ")"
                          + MARK + "ggml type of the activations = the model dtype\n")
LINEAR_OUTPUT = ('self.output_cpu = torch.zeros((1, 1, self.out_features), device="cpu", pin_memory=True, '
                 'dtype=torch.bfloat16)')
LINEAR_OUTPUT_NEW = LINEAR_OUTPUT.replace(BF16, DEFAULT) + MARK + "same dtype as the activations"
LINEAR_EDITS = (
    (LINEAR_HIDDEN_TYPE, LINEAR_HIDDEN_TYPE_NEW, "KLinearCPUInfer LinearConfig hidden type: 30 (BF16) -> the model dtype's"),
    (LINEAR_OUTPUT, LINEAR_OUTPUT_NEW, "KLinearCPUInfer output_cpu buffer: bf16 -> the model dtype"),
)

# (anchor, replacement, what) per ref; every anchor occurs exactly once in experts.py.
EDITS = {
    "0.2.1.post1": (
        (HIDDEN_TYPE, HIDDEN_TYPE_NEW, "MOEConfig hidden type: 30 (BF16) -> the model dtype's"),
        (OUTPUT, OUTPUT_NEW, "output_cpu buffer: bf16 -> the model dtype"),
    ),
    "v0.2.4post1": _V024,
    "v0.3.1": _V03,
    "v0.3.2": _V03,
    # v0.4.1 and v0.7.0's archive/ (experts.py identical in both): v0.3.2's code for all four anchors
    # (hidden_type :200, backends :201-235, output_cpu :280/:290); the new `if use_torch_npu:` branch (:270-275,
    # bf16 nested lists) is Ascend NPU only, not CUDA, and stays as it is
    "v0.4.1": _V03,
    "v0.7.0": _V03,
}


class CpuExpertsDtypeOverlay(Overlay):
    name = "cpu-experts-dtype"
    summary = ("KExpertsCPU, KLinearCPUInfer: activations' ggml type and output buffer follow the model dtype "
               "(not always BF16)")
    # 0.2.1.post1 verified on the H100 (bench/gpu_proof.py); the tags' edits by reading their code.
    # A ref with no row of its own gets the last (newest) row; its anchors refuse a tree that differs.

    def apply(self, tree, ctx):
        for old, new, what in EDITS.get(ctx.ref.name, EDITS[list(EDITS)[-1]]):
            tree.replace(EXPERTS, old, new, what=what)
        for old, new, what in LINEAR_EDITS:
            tree.replace(LINEAR, old, new, what=what)


OVERLAY = CpuExpertsDtypeOverlay()
