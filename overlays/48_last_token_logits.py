"""last-token-logits: a prompt's logits are computed for its last position only (0.2.1.post1).

The server and local_chat read only ``logits[0, -1]``, but 0.2.1.post1's DeepSeek models run
lm_head over every prompt position: for DeepSeek-V3 at 8192 tokens that is 8192 x 129280 logits,
2 GiB in fp16 plus 4 GiB as float32 on lm_head's GPU, more than an 11 GB card has left. Upstream
made exactly this change itself from v0.2.4post1 on (``self.lm_head(hidden_states[:,-1:,:])`` in
both files); the overlay brings it to the sdist ref. With it, lm_head is a one-row product on
every forward, which KLinearGGUF (overlay ``gguf-linear``) runs as its fused matvec.
"""

from ktlegacy.core.facts import REFS
from ktlegacy.core.overlay import Overlay

EDITS = {
    "ktransformers/models/modeling_deepseek_v3.py": (
        "        logits = self.lm_head(hidden_states.to(self.lm_head.weight.device))\n",
        "        logits = self.lm_head(hidden_states[:,-1:,:].to(self.lm_head.weight.device))  # ktlegacy: last position only\n"),
    "ktransformers/models/modeling_deepseek.py": (
        "        logits = self.lm_head(hidden_states)\n        logits = logits[:,-1,:].unsqueeze(0).float()\n",
        "        logits = self.lm_head(hidden_states[:,-1:,:])  # ktlegacy: last position only\n"
        "        logits = logits[:,-1,:].unsqueeze(0).float()\n"),
}


class LastTokenLogitsOverlay(Overlay):
    name = "last-token-logits"
    summary = "DeepSeek V2/V3 forward: lm_head on the last position only (what upstream does from v0.2.4post1)"
    # every ref after the sdist, a new one included (REFS runs oldest to newest)
    not_applicable = {ref: "upstream computes the last position's logits only from this ref on"
                      for ref in REFS if ref != "0.2.1.post1"}

    def apply(self, tree, ctx):
        for rel, (old, new) in EDITS.items():
            tree.replace(rel, old, new, what="lm_head on the last position only")


OVERLAY = LastTokenLogitsOverlay()
