"""sdpa-kv-reuse: a prefill that continues a cached conversation attends to the cached tokens.

In 0.2.1.post1 the MLA prefill of ``forward_linux_triton`` (and of ``forward_linux_flashinfer``)
writes the new tokens' latent KV into the cache but then builds keys and values from the new
tokens only, so a second chat turn prefilled on top of the first (cache_position starting at
P > 0) never sees the P cached tokens. upstream's ``forward_windows`` reads the cache; on the
H100 the SDPA path matched the fp32 reference on every first turn but only 21/32 tokens of a
second turn (logit error 2.7) while ``KTLEGACY_PREFILL=windows`` matched 32/32.

The fix: when the chunk does not start at position 0, take the latent KV of positions
0..last from the cache (batch 1: the static cache's pages are in order) and expand keys and
values for all of them; ``sdpa_prefill`` already aligns the causal mask bottom-right for
q_len < k_len, the way flash-attn does.
"""

from ktlegacy.overlay import Overlay

ATTENTION = "ktransformers/operators/attention.py"
MARK = "  # ktlegacy: kv reuse"

# (anchor, replacement, what): each occurs once in the Triton and once in the flashinfer prefill.
EDITS = (
    ("\n                past_key_value.update(compressed_kv, k_pe, self.layer_idx, cache_kwargs)\n",
     "\n                cached_kv, _ = past_key_value.update(compressed_kv, k_pe, self.layer_idx, cache_kwargs)" + MARK + "\n"
     "                if bsz == 1 and int(cache_position[0]) > 0:" + MARK + ": a later turn sees the cache\n"
     "                    cached_kv = cached_kv.view(1, -1, 1, self.kv_lora_rank + self.qk_rope_head_dim)"
     "[:, : int(cache_position[-1]) + 1]" + MARK + "\n"
     "                    compressed_kv, k_pe = torch.split(cached_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)"
     + MARK + "\n",
     "prefill: keys/values of the cached positions too when cache_position[0] > 0"),
    ("            k_pe = k_pe[:, :q_len]\n            compressed_kv = compressed_kv[:, :q_len]\n",
     "            kv_len = k_pe.shape[1]" + MARK + ": q_len, or the whole cached sequence\n",
     "kv_len instead of q_len for keys/values"),
    (".view(bsz, q_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)",
     ".view(bsz, kv_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)",
     "kv_b_proj output viewed over kv_len"),
    ("key_states = k_pe.new_empty(bsz, q_len, self.num_heads, self.q_head_dim)",
     "key_states = k_pe.new_empty(bsz, kv_len, self.num_heads, self.q_head_dim)",
     "key_states over kv_len"),
    ("value_states = value_states.view(bsz, q_len, self.num_heads, self.v_head_dim)",
     "value_states = value_states.view(bsz, kv_len, self.num_heads, self.v_head_dim)",
     "value_states over kv_len"),
)


class SdpaKvReuseOverlay(Overlay):
    name = "sdpa-kv-reuse"
    summary = "MLA SDPA prefill attends to the cached tokens when it continues a conversation (q_len < k_len)"
    refs = ("0.2.1.post1",)  # verified there on the H100 (bench/gpu_proof.py, second turn)

    def apply(self, tree, ctx):
        for old, new, what in EDITS:
            tree.replace(ATTENTION, old, new, count=2, what=what + " (Triton and flashinfer paths)")


OVERLAY = SdpaKvReuseOverlay()
