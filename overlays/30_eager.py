"""eager: models built by local_chat and the server use eager attention, not flash_attention_2.

transformers' ``flash_attention_2`` implementation calls FlashAttention 2, which needs sm80+.
Every assignment of the literal (``x = "flash_attention_2"``, ``attn_implementation=...``)
becomes ``"eager"``; comparisons (``== "flash_attention_2"``) stay, they only read the choice.
Each edited line carries a marker comment, so a re-run recognises its own work and a file that
holds neither the anchor nor the marker is drift.
"""

import re

from ktlegacy.core.overlay import Overlay

MARKER = "# ktlegacy: eager attention (FlashAttention 2 needs sm80+)"
ASSIGNED = re.compile(r"(?<![=!<>])(=\s*)([\"'])flash_attention_2\2")
FILES = {  # file -> must hold the anchor
    "ktransformers/local_chat.py": True,
    "ktransformers/server/backend/interfaces/ktransformers.py": True,
    "ktransformers/local_chat_test.py": False,  # a copy of local_chat in v0.2.4post1+
}


class EagerOverlay(Overlay):
    name = "eager"
    summary = "flash_attention_2 -> eager in local_chat and the server backend"

    def apply(self, tree, ctx):
        for rel, required in FILES.items():
            if not required and not tree.exists(rel):
                continue
            text = tree.read(rel)
            lines = text.splitlines(keepends=True)
            edited = 0
            for i, line in enumerate(lines):
                body = line.rstrip("\r\n")
                if line.lstrip().startswith("#") or not ASSIGNED.search(body):
                    continue
                if body.rstrip().endswith("\\"):
                    raise tree.drift(rel, f"no line continuation after flash_attention_2 on line {i + 1}")
                body = ASSIGNED.sub(lambda m: f"{m[1]}{m[2]}eager{m[2]}", body)
                body = f"{body}  {MARKER}"
                lines[i] = body + line[len(line.rstrip("\r\n")):]
                edited += 1
            if edited:
                tree.write(rel, "".join(lines), f'"flash_attention_2" -> "eager" x{edited}')
            elif required and MARKER not in text:
                raise tree.drift(rel, 'an assignment of "flash_attention_2" (or the ktlegacy eager marker)')


OVERLAY = EagerOverlay()
