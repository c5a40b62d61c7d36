"""Write the table's values into the files that cannot import it (issue 24 item 1).

``python -m ktlegacy.generate --write`` rewrites them from ``ktlegacy/core/facts.py``; ``--check`` (what
CI runs, through tests/test_generate.py) writes nothing and exits 1 with one line per stale file.

Each rule names a file, a pattern and the value its ``v`` group gets; the rest of the file is
left as it is, so a file says only once where a value goes (an ``ARG NAME=`` line, a
``${KTLEGACY_X:-default}``). A rule that finds nothing makes the file stale too: the place it
writes to has moved, and the rule must follow it.

Standard library only, besides ktlegacy.core.facts.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .core import facts

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Rule:
    path: str                         # relative to the repository root
    pattern: str                      # re.M; its group "v" is the generated value
    value: Callable[[re.Match], str]  # what "v" becomes


def _const(text: str) -> Callable[[re.Match], str]:
    return lambda m: text


def rules() -> tuple[Rule, ...]:
    """The rules, from the table as it is now."""
    args = {
        "BASE_IMAGE": facts.BASE_IMAGE,
        "RUNTIME_IMAGE": facts.RUNTIME_IMAGE,
        "TORCH_INDEX_URL": facts.TORCH_INDEX_URL,
        "TORCH_VERSION": facts.TORCH_VERSION,
        "KTRANSFORMERS_REF": facts.DEFAULT_REF,
        "ARCH": facts.DEFAULT_ARCH,
        "TORCH_CUDA_ARCH_LIST": facts.ARCHES[facts.DEFAULT_ARCH].torch_cuda_arch_list,
        "CPU_INSTRUCT": facts.DEFAULT_CPU_INSTRUCT,
    }
    # compose's ${NAME:-default} and .env.example's NAME=value
    settings = {**{name: s.default for name, s in facts.SETTINGS.items()},
                "KTLEGACY_REPOSITORY": facts.DEFAULT_REPOSITORY}
    names = "|".join(settings)
    cpu_choices = " | ".join(f"{c} (portable default)" if c == facts.DEFAULT_CPU_INSTRUCT else c
                             for c in facts.CPU_INSTRUCTS)
    port = _const(str(facts.SERVER_PORT))
    return (
        # images/Dockerfile: ARG defaults, the header that lists them, the CUDA it claims
        Rule("images/Dockerfile", rf"^ARG (?P<name>{'|'.join(args)})=(?P<v>.*)$", lambda m: args[m['name']]),
        Rule("images/Dockerfile", r"^#   (?P<name>BASE_IMAGE|RUNTIME_IMAGE|TORCH_VERSION|TORCH_INDEX_URL|KTRANSFORMERS_REF)"
                                  r" .*? (?P<v>\S+)$", lambda m: args[m['name']]),
        Rule("images/Dockerfile", r"^#   ARCH +(?P<v>.*)$", _const(" | ".join(facts.ARCHES))),
        Rule("images/Dockerfile", r"^# Build it with `invoke build --arch (?P<v>[\w|]+)\|all`", _const("|".join(facts.ARCHES))),
        Rule("images/Dockerfile", r"^#   TORCH_CUDA_ARCH_LIST (?P<v>.*?) \(exactly one arch per image\)$",
             _const(", ".join(f"{a.torch_cuda_arch_list} for {n}" for n, a in facts.ARCHES.items()))),
        Rule("images/Dockerfile", r"^#   CPU_INSTRUCT +(?P<v>.*?) \(NATIVE: local builds only,$", _const(cpu_choices)),
        Rule("images/Dockerfile", r"^ +KTLEGACY_IMAGE_CUDA=(?P<v>\S+) \\$", _const(facts.CUDA_VERSION)),
        Rule("images/Dockerfile", rf'^ +{re.escape(facts.LABEL_CUDA)}="(?P<v>[^"]*)" \\$', _const(facts.CUDA_VERSION)),
        Rule("images/debian-cuda.Dockerfile", r'^LABEL io\.ktlegacy\.base="debian-cuda-(?P<v>[\d.]+)-', _const(facts.CUDA_VERSION)),
        # compose: the settings' defaults, the tag scheme's CUDA, the server's port
        Rule("compose/compose.yaml", rf"\$\{{(?P<name>{names}):-(?P<v>[^${{}}]*)\}}", lambda m: settings[m['name']]),
        Rule("compose/compose.yaml", r"\}-(?P<v>cu\d+)-sm\d", _const(facts.CUDA_TAG)),
        Rule("compose/compose.yaml", r"\$\{KTLEGACY_(?:SMOKE_)?PORT:-\d+\}:(?P<v>\d+)\"$", port),
        Rule("compose/compose.yaml", r"127\.0\.0\.1:(?P<v>\d+)/health", port),
        Rule("compose/.env.example", rf"^(?P<name>{names})=(?P<v>.*)$", lambda m: settings[m['name']]),
        Rule("compose/.env.example", r"^# CPU instruction set of the image, lower case: (?P<v>.*)$",
             _const(" | ".join(c.lower() for c in facts.CPU_INSTRUCTS))),
        Rule("compose/.env.example", r"<repo>:<ref>-(?P<v>cu\d+)-<", _const(facts.CUDA_TAG)),
        Rule("compose/.env.example", r"<repo>:<ref>-cu\d+-<(?P<v>[\w|]+)>-<cpu>", _const("|".join(facts.ARCHES))),
        Rule("compose/serve.sh", r"--port (?P<v>\d+)", port),
        Rule("compose/smoke_service.py", r"^PORT = (?P<v>\d+)$", port),
        # the workflow: the default ref (its options and matrix are a choice, not the table)
        Rule(".github/workflows/publish.yml", r'^ +default: "(?P<v>[^"]*)"\n +options: \[', _const(facts.DEFAULT_REF)),
        Rule(".github/workflows/publish.yml", r'^ +options: \["(?P<v>[^"]*)"', _const(facts.DEFAULT_REF)),
        Rule(".github/workflows/publish.yml", r"inputs\.ref \|\| '(?P<v>[^']*)'", _const(facts.DEFAULT_REF)),
        Rule(".github/workflows/publish.yml", r"<ref>-(?P<v>cu\d+)-<arch>", _const(facts.CUDA_TAG)),
        # the README's command table: the arches each --arch takes
        Rule("README.md", r"^\| `invoke .*?--arch (?P<v>sm\d+(?:\\\|sm\d+)*)", _const("\\|".join(facts.ARCHES))),
    )


def generate(path: str, text: str, table: tuple[Rule, ...]) -> tuple[str, list[str]]:
    """(the file's text with every rule for it applied, the rules that found nothing)."""
    missing = []
    for rule in (r for r in table if r.path == path):
        def put(m: re.Match, rule=rule) -> str:
            start, end = m.start("v") - m.start(), m.end("v") - m.start()
            return m[0][:start] + rule.value(m) + m[0][end:]
        text, n = re.subn(rule.pattern, put, text, flags=re.M)
        if not n:
            missing.append(rule.pattern)
    return text, missing


def run(root: Path, write: bool, table: tuple[Rule, ...] | None = None) -> list[str]:
    """Check (or rewrite) the generated files under ``root``; one line per stale file."""
    table = rules() if table is None else table
    stale = []
    for path in dict.fromkeys(r.path for r in table):
        old = (root / path).read_text()
        new, missing = generate(path, old, table)
        if missing:
            stale.append(f"{path}: the generator finds no place for {missing[0]!r}: move the rule with the text "
                         "(ktlegacy/generate.py)")
            continue
        if new == old:
            continue
        if write:
            (root / path).write_text(new)
            continue
        diff = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
                if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        stale.append(f"{path}: stale ({len(diff) // 2 or 1} line(s), e.g. {diff[0]!r} -> {diff[-1]!r}); "
                     "run `python -m ktlegacy.generate --write`")
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktlegacy.generate", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale (writes nothing)")
    mode.add_argument("--write", action="store_true", help="rewrite the generated files from ktlegacy/core/facts.py")
    p.add_argument("--root", type=Path, default=REPO, help="the repository (default: this checkout)")
    args = p.parse_args(argv)
    problems = run(args.root, write=args.write)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
