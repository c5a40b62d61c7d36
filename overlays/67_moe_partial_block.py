"""moe-partial-block: the CPU experts' prefill path computes every row of the expert intermediate.

``MOE::forward_many`` (``operators/llamafile/moe.cpp``; the path every prompt of more than
``group_min_len`` tokens takes, i.e. every prefill) splits the gate/up projections into blocks of
``QK_K`` = 256 rows: ``nth = intermediate_size / 256``. When ``moe_intermediate_size`` is not a
multiple of 256 the last rows are never computed: DeepSeek-V2-Lite's 1408 loses rows 1280-1407 of
every expert (9% of its intermediate: the down projection then reads stale activations for them),
so every prefill of that model is wrong; below 256 ``nth`` is 0 and nothing at all is computed
(the divisions by ``nth`` fault). Decode (``forward_one``, blocks of the configured ``stride``)
is not affected. Found with the synthetic models of the GPU proofs; present at every supported ref.

The edit rounds the block count up and gives the last block its real row count (``rows``) in the
two GEMMs, the activation loop and the quantisation of the down projection's input. The last
block stays a whole number of the down type's quantisation blocks: GGUF stores a row of
``intermediate_size`` values only in a type whose block divides it, and ``ith * 256`` is a
multiple of every block size (32 or 256).
"""

from ktlegacy.core.overlay import Overlay

CANDIDATES = ("ktransformers/ktransformers_ext/operators/llamafile/moe.cpp",  # 0.2.1.post1 (sdist)
              "csrc/ktransformers_ext/operators/llamafile/moe.cpp")           # the git tags
SPLIT = ("    int nth = config_.intermediate_size / stride;\n"
         "    backend->do_work_stealing_job(nth * config_.expert_num, nullptr, [&](int task_id) {\n"
         "        uint64_t expert_idx = task_id / nth;\n"
         "        int ith = task_id % nth;\n")
SPLIT_NEW = ("    int nth = (config_.intermediate_size + stride - 1) / stride;  // ktlegacy: the last, partial block too\n"
             "    backend->do_work_stealing_job(nth * config_.expert_num, nullptr, [&](int task_id) {\n"
             "        uint64_t expert_idx = task_id / nth;\n"
             "        int ith = task_id % nth;\n"
             "        int rows = std::min(stride, config_.intermediate_size - ith * stride);  // ktlegacy\n")
GEMM = "llamafile_sgemm(stride, m_local_num_[expert_idx], config_.hidden_size / ggml_blck_size(config_.{}_type)"
QUANT = ("from_float(intermediate_fp32_ptr, down_input_ptr, stride, "
         "ggml_internal_get_type_traits(config_.down_type).vec_dot_type);")
ACT = r"(for \(int j = ith \* stride; j < )\(ith \+ 1\) \* stride(; j\+\+\) \{\n\s+m_local_intermediate_fp32_ptr_)"
ACT_DONE = r"for \(int j = ith \* stride; j < ith \* stride \+ rows; j\+\+\) \{\n\s+m_local_intermediate_fp32_ptr_"


class MoePartialBlockOverlay(Overlay):
    name = "moe-partial-block"
    summary = "CPU-expert prefill (forward_many) computes the last rows when moe_intermediate_size % 256 != 0 (V2-Lite: 1408)"

    def apply(self, tree, ctx):
        moe = tree.one_of(CANDIDATES, "llamafile moe.cpp")
        tree.replace(moe, SPLIT, SPLIT_NEW, what="forward_many: gate/up blocks rounded up, the last one partial")
        for proj in ("gate", "up"):
            tree.replace(moe, GEMM.format(proj), GEMM.format(proj).replace("(stride,", "(rows,", 1),
                         what=f"forward_many: {proj} GEMM over the block's real rows")
        # one activation loop up to v0.3.2; silu and relu variants from v0.4.1
        tree.sub(moe, ACT, r"\1ith * stride + rows\2", applied=ACT_DONE,
                 what="forward_many: activation over the block's real rows")
        tree.replace(moe, QUANT, QUANT.replace("down_input_ptr, stride,", "down_input_ptr, rows,"),
                     what="forward_many: down input quantised over the block's real rows")


OVERLAY = MoePartialBlockOverlay()
