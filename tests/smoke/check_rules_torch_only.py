#!/usr/bin/env python3
"""The installed optimize-rule YAML files name no Marlin or FP8 op (those need sm80+).

Independent of the overlay's own list: any identifier containing "Marlin" or "FP8" in a rule
file's values (comments ignored) fails, naming file, line and identifier.
"""

import re
from pathlib import Path

from smokelib import fail

try:
    import ktransformers
except Exception as exc:
    fail(f"import ktransformers: {exc}")

root = Path(ktransformers.__file__).resolve().parent
rules = sorted(root.rglob("optimize_rules/**/*.yaml")) + sorted(root.rglob("optimize_rules/*.yaml"))
rules = sorted(set(rules))
if not rules:
    fail(f"no optimize rule files under {root}: the package is incomplete")
bad = []
for path in rules:
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        code = line.split("#", 1)[0]
        for ident in re.findall(r"[A-Za-z_][\w.]*", code):
            if "Marlin" in ident or "FP8" in ident:
                bad.append(f"{path.relative_to(root)}:{lineno}: {ident}")
if bad:
    fail(f"{len(bad)} Marlin/FP8 op(s) left in the rules, first: {bad[0]}")
print(f"{len(rules)} rule files, no Marlin/FP8 op")
