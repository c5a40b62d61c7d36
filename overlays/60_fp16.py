"""fp16: below sm80 the model runs in fp16, not bf16.

Volta has no bf16 arithmetic and Turing only emulates it. Upstream sets the default dtype to
bf16 (literally, or through ``config.torch_dtype``, which is bf16 for the DeepSeek checkpoints)
in local_chat, in the server backend and at import time of some modules; every such call asks
``ktlegacy_runtime.default_dtype(...)`` instead, which keeps upstream's choice on sm80+ and
turns bf16 into fp16 below.
"""

import re

from ktlegacy.core.overlay import Overlay

IMPORT_LINE = "from ktransformers import ktlegacy_runtime  # ktlegacy"
REQUIRED = ("ktransformers/local_chat.py", "ktransformers/server/backend/interfaces/ktransformers.py")
SKIP_DIRS = ("ktransformers/tests/", "ktransformers/ktransformers_ext/")
BF16 = re.compile(r"torch\.set_default_dtype\(\s*torch\.bfloat16\s*\)")
CONFIG = re.compile(r"torch\.set_default_dtype\(\s*config\.torch_dtype\s*\)")
PATCHED = re.compile(r"torch\.set_default_dtype\(ktlegacy_runtime\.default_dtype\(")


class Fp16Overlay(Overlay):
    name = "fp16"
    summary = "default dtype bf16 -> ktlegacy_runtime.default_dtype() (fp16 below sm80)"

    def apply(self, tree, ctx):
        for rel in tree.glob("ktransformers/**/*.py"):
            if rel.startswith(SKIP_DIRS) or rel == "ktransformers/ktlegacy_runtime.py":
                continue
            text = tree.read(rel)
            n_bf16 = len(BF16.findall(text))
            n_config = len(CONFIG.findall(text))
            if not (n_bf16 or n_config):
                if rel in REQUIRED and not PATCHED.search(text):
                    raise tree.drift(rel, "torch.set_default_dtype(torch.bfloat16) or (config.torch_dtype)")
                continue
            if not re.search(r"^import torch$", text, flags=re.M):
                raise tree.drift(rel, "a top-level 'import torch' line to import ktlegacy_runtime after")
            text = BF16.sub("torch.set_default_dtype(ktlegacy_runtime.default_dtype())", text)
            text = CONFIG.sub("torch.set_default_dtype(ktlegacy_runtime.default_dtype(config.torch_dtype))", text)
            parts = []
            if n_bf16:
                parts.append(f"set_default_dtype(torch.bfloat16) x{n_bf16}")
            if n_config:
                parts.append(f"set_default_dtype(config.torch_dtype) x{n_config}")
            tree.write(rel, text, " and ".join(parts) + " -> ktlegacy_runtime.default_dtype(...)")
            tree.insert_line(rel, IMPORT_LINE, after=r"^import torch$", what="import ktlegacy_runtime")


OVERLAY = Fp16Overlay()
