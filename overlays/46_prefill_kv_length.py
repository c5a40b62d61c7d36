"""prefill-kv-length: a prompt that continues a cached conversation attends to exactly the cached tokens (git tags).

At the git tags the MLA prefill of ``forward_linux_triton`` and ``forward_linux_flashinfer``
(``operators/attention.py``: the path every NVIDIA GPU takes unless ``KTLEGACY_PREFILL=windows``)
reads the keys of the cache up to ``kv_seq_len = q_len + past_key_value.get_usable_length(...)``
(see sdpa-kv-reuse). That count is wrong in two ways:

* from v0.4.1, whose transformers (4.57) dropped ``Cache.get_usable_length``, ``StaticCache``
  (``models/custom_cache.py``) defines it as ``return 0``: a continued prompt attends to the first
  ``q_len`` cached tokens only (the start of the conversation). Found by the v0.7.0 GPU proof:
  the second turn (31 new tokens on 59 cached) had 16 expert-routing disagreements and a median
  logit error of 0.44 against the fp32 reference; the windows path, which reads the cache by
  position, matched.
* before v0.4.1 it is transformers' definition, the cache's ``past_tokens``, which ``update`` raises
  by each chunk and ``change_seq_length(1)`` raises again after every decode step (local_chat's
  ``decode_one_tokens`` and the server call it for the CUDA-graph replay, where ``update``'s Python
  does not run, and after an eager step too): after eager decode steps it overcounts, and the
  prefill then reads never-written (zero) slots as keys. With ``get_usable_length`` restored to
  transformers' definition at v0.7.0 the same proof still had a logit error of 0.28 on the second
  turn for that reason.

The edit, in both prefill methods: a prompt (``q_len > 1``) that has ``cache_position`` takes
``kv_seq_len = cache_position[-1] + 1``, the positions the cache holds once this chunk is written
(batch 1, as the ``ktransformers`` backend runs it). Decode (``q_len == 1``, captured in CUDA
graphs, where reading a GPU value would fail) keeps upstream's count, which it does not use.
0.2.1.post1 has no such count: sdpa-kv-reuse takes the same positions there.
"""

from ktlegacy.core.overlay import Overlay

ATTENTION = "ktransformers/operators/attention.py"
COUNT = (r"(        kv_seq_len = q_len\n        if past_key_value is not None:\n(?:.*\n){0,8}?"
         r"            kv_seq_len \+= past_key_value\.get_usable_length\(kv_seq_len, self\.layer_idx\)\n)"
         r"(?!            if q_len > 1 and cache_position is not None:)")
FIX = ("            if q_len > 1 and cache_position is not None:  # ktlegacy: the cached positions, not a counter\n"
       "                kv_seq_len = int(cache_position[-1]) + 1\n")
APPLIED = r"^            if q_len > 1 and cache_position is not None:  # ktlegacy: the cached positions, not a counter$"


class PrefillKvLengthOverlay(Overlay):
    name = "prefill-kv-length"
    summary = "MLA prefill at the tags reads the cache up to cache_position[-1] + 1, not get_usable_length (0 from v0.4.1, overcounted before)"
    not_applicable = {"0.2.1.post1": "its prefill ignores the cache; sdpa-kv-reuse reads it up to cache_position[-1] + 1"}

    def apply(self, tree, ctx):
        text = tree.read(ATTENTION)
        for method in ("def forward_linux_triton(", "def forward_linux_flashinfer("):
            if text.count(method) != 1:
                raise tree.drift(ATTENTION, f"one {method.rstrip('(')} (the MLA prefill)")
        tree.sub(ATTENTION, COUNT, r"\1" + FIX.replace("\\", "\\\\"), count=2, applied=APPLIED,
                 what="forward_linux_triton/flashinfer prefill: kv_seq_len = cache_position[-1] + 1")


OVERLAY = PrefillKvLengthOverlay()
