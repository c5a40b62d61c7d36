#!/usr/bin/env python3
"""Every third-party module the ktransformers server imports when it starts is installed.

Why: upstream's package metadata does not declare all of the server's imports; some arrived
only as dependencies of dependencies (SQLAlchemy came through langchain < 0.3, and newer
langchain releases dropped it), so a fresh resolve gives an image whose server dies at start
with ModuleNotFoundError. This reads import statements (no import of the server itself, which
would need the CUDA extensions) and looks each third-party module up.

What the server imports when it starts: the module-level imports of ``server/main.py``, followed
through every ``ktransformers.*`` module they reach (and the packages above each). Imports inside
functions or try/except are not followed: upstream loads the balance_serve backend (flashinfer,
its C++ scheduler, zmq; sm80+ only, refused below sm80 by the serve-backend guard) that way, only
when ``--backend_type balance_serve`` asks for it, so its modules need not be installed here.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from smokelib import expected_extensions, fail, skip

spec = importlib.util.find_spec("ktransformers")
if spec is None or not spec.submodule_search_locations:
    fail("ktransformers is not installed")
package = Path(list(spec.submodule_search_locations)[0])
entry = package / "server" / "main.py"
if not entry.is_file():
    skip("this ktransformers has no server (server/main.py)")

stdlib = set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)


def module_file(name: str) -> Path | None:
    """The file of ``ktransformers.<...>`` module ``name`` inside the installed package, if any."""
    rel = Path(*name.split(".")[1:])
    for candidate in (package / rel.with_suffix(".py"), package / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a.b``, ``a.b.c``: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


needed: dict[str, str] = {}  # third-party top-level module -> first file that imports it
seen: set[Path] = set()
queue: list[Path] = [package / "__init__.py", package / "server" / "__init__.py", entry]
while queue:
    path = queue.pop()
    if path in seen or not path.is_file():
        continue
    seen.add(path)
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    for node in tree.body:  # module level only: imports in try/def are optional or lazy by design
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import sub` may name a submodule: follow it as well when it is one
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            rel = base.relative_to(package.parent)
            mod = ".".join(rel.parts + ((node.module,) if node.module else ()))
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top == "ktransformers":
                for part in with_parents(name):
                    found = module_file(part)
                    if found is not None:
                        queue.append(found)
            elif top not in stdlib and top != "__future__":
                needed.setdefault(top, str(path.relative_to(package.parent)))

# the compiled extensions are check_extensions.py's business (absent by design on a stand-in build)
compiled = set(expected_extensions())
missing = sorted(m for m in needed if m not in compiled and importlib.util.find_spec(m) is None)
if missing:
    fail("the server imports modules that are not installed: "
         + ", ".join(f"{m} (from {needed[m]})" for m in missing)
         + "; add them to images/requirements/runtime.txt")
print(f"server imports: all {len(needed)} third-party modules installed "
      f"({len(seen)} ktransformers modules read from server/main.py)")
