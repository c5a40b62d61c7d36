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

The git tags already do this themselves, so there is nothing to edit there; the overlay only
checks that it is so and refuses the tree as drift otherwise. At v0.2.4post1, v0.3.1 and
v0.3.2 both prefills of ``operators/attention.py`` first count the cached tokens,
``kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)``, which is the
cache's ``past_tokens`` (``models/custom_cache.py``: ``update`` adds each chunk's length,
``remove_suffix`` sets it when the server reuses a prefix); then they keep what ``update``
returns (the whole latent cache), split it, slice it ``[:, :kv_seq_len]`` and build keys and
values over ``kv_seq_len`` for the ``flash_attn_func(..., causal=True)`` call that the sdpa
overlay turns into ``sdpa_prefill``, which aligns the causal mask bottom-right as flash-attn
does. Line numbers in the unpatched file (count / update / slices / key_states):

    v0.2.4post1  Triton :234 :307 :312,:314 :324   flashinfer :387 :482 :487,:489 :499
    v0.3.1       Triton :234 :307 :312,:314 :324   flashinfer :387 :483 :488,:490 :500
    v0.3.2       Triton :235 :308 :313,:315 :325   flashinfer :388 :484 :489,:491 :501

``patch`` then reports the overlay as "already applied, nothing to change" for these refs.
"""

from ktlegacy.core.overlay import Overlay

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

# The tags' own fix, checked in forward_linux_triton and forward_linux_flashinfer: count the
# cached tokens, keep the whole cache update() returns, slice it to kv_seq_len, expand over it.
PREFILL_METHODS = ("forward_linux_triton", "forward_linux_flashinfer")
UPSTREAM_CACHE_READ = (
    "            kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)\n",
    "                compressed_kv_with_k_pe, _ = past_key_value.update(compressed_kv, k_pe, self.layer_idx, cache_kwargs)\n"
    "                compressed_kv, k_pe = torch.split(\n"
    "                    compressed_kv_with_k_pe, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1\n"
    "                )\n"
    "            k_pe = k_pe.view(bsz, -1, self.qk_rope_head_dim)\n"
    "            k_pe = k_pe[:, :kv_seq_len]\n"
    "            compressed_kv = compressed_kv.view(bsz, -1, self.kv_lora_rank)\n"
    "            compressed_kv = compressed_kv[:, :kv_seq_len]\n",
    ".view(bsz, kv_seq_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)",
    "key_states = k_pe.new_empty(bsz, kv_seq_len, self.num_heads, self.q_head_dim)",
    "value_states = value_states.view(bsz, kv_seq_len, self.num_heads, self.v_head_dim)",
)


def _one_line(text: str, limit: int = 70) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


class SdpaKvReuseOverlay(Overlay):
    name = "sdpa-kv-reuse"
    summary = "MLA SDPA prefill attends to the cached tokens when it continues a conversation (q_len < k_len)"
    # 0.2.1.post1: edited, verified on the H100 (bench/gpu_proof.py, second turn); the tags: checked only

    def apply(self, tree, ctx):
        if ctx.ref.name != "0.2.1.post1":
            self.check_upstream_reads_the_cache(tree)
            return
        for old, new, what in EDITS:
            tree.replace(ATTENTION, old, new, count=2, what=what + " (Triton and flashinfer paths)")

    @staticmethod
    def check_upstream_reads_the_cache(tree):
        """Raise Drift unless both prefills build keys/values from the whole cache (the tags' code)."""
        text = tree.read(ATTENTION)
        for method in PREFILL_METHODS:
            start = text.find(f"\n    def {method}(")
            if start < 0:
                raise tree.drift(ATTENTION, f"a method {method}")
            end = text.find("\n    def ", start + 1)
            body = text[start: end if end > 0 else len(text)]
            for line in UPSTREAM_CACHE_READ:
                if body.count(line) != 1:
                    raise tree.drift(ATTENTION, f"{method} to hold once {_one_line(line)} (the prefill reading "
                                                f"the whole KV cache), found {body.count(line)}")
            if "k_pe[:, :q_len]" in body:
                raise tree.drift(ATTENTION, f"{method} to build keys from the cache, found k_pe[:, :q_len]")


OVERLAY = SdpaKvReuseOverlay()
