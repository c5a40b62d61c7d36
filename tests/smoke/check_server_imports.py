#!/usr/bin/env python3
"""Every third-party module the ktransformers server imports at module level is installed.

Why: upstream's package metadata does not declare all of the server's imports; some arrived
only as dependencies of dependencies (SQLAlchemy came through langchain < 0.3, and newer
langchain releases dropped it), so a fresh resolve gives an image whose server dies at start
with ModuleNotFoundError. This reads the installed server package's import statements (no
import of the server itself, which would need the CUDA extensions) and looks each module up.
Imports inside try/except or functions are optional by upstream's own design and skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from smokelib import fail, skip

spec = importlib.util.find_spec("ktransformers")
if spec is None or not spec.submodule_search_locations:
    fail("ktransformers is not installed")
server = Path(list(spec.submodule_search_locations)[0]) / "server"
if not server.is_dir():
    skip("this ktransformers has no server package")

stdlib = set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
needed: dict[str, str] = {}
for path in sorted(server.rglob("*.py")):
    if "tests" in path.relative_to(server).parts:
        continue
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    for node in tree.body:  # module level only: imports in try/def are optional by design
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in stdlib and top not in ("ktransformers", "__future__"):
                needed.setdefault(top, str(path.relative_to(server.parent)))

missing = sorted(m for m in needed if importlib.util.find_spec(m) is None)
if missing:
    fail("server imports modules that are not installed: "
         + ", ".join(f"{m} (from {needed[m]})" for m in missing)
         + "; add them to images/requirements/runtime.txt")
print(f"server imports: all {len(needed)} third-party modules installed")
