"""``python -m ktlegacy`` / ``ktlegacy``: the library's command line.

Every command's flags, help and validation are defined once, here: sub-commands register
themselves in :data:`COMMANDS` (one module per concern adds its own) with an argparse
``add_arguments``. The Invoke tasks in ``tasks.py`` are generated from these parsers
(:func:`command_flags`) and run :func:`main`, so ``invoke X`` and ``python -m ktlegacy X`` accept
the same flags and fail the same way: one ``error: ...`` line and a non-zero exit.
The image build (which has no Invoke) and the GPU machine run exactly the same code.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import KtlegacyError
from .facts import ARCHES, arch_choice

# name -> (help, add_arguments(parser), run(args) -> int)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str, add_arguments: Callable):
    """Register ``fn(args) -> int`` as sub-command ``name``."""
    def register(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn
    return register


def _patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, type=Path, help="upstream tree to patch (from fetch-source)")
    p.add_argument("--arch", required=True, help=arch_choice(cards=True))
    p.add_argument("--ref", default=None, help="force the overlay set of this ref (default: detected from the tree)")
    p.add_argument("--check", action="store_true", help="say what would change without writing")


@command("patch", f"apply the {'/'.join(ARCHES)} overlays to an upstream tree: all or nothing, idempotent",
         _patch_args)
def patch(args) -> int:
    from .arch import get_arch
    from .overlay import patch_tree
    from .refs import get_ref
    patch_tree(args.src, get_arch(args.arch), ref=get_ref(args.ref) if args.ref else None, check=args.check)
    return 0


def _fingerprint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, type=Path, help="the ref's pristine tree")
    p.add_argument("--ref", required=True, help="the supported ref that tree is")
    p.add_argument("--arch", default="sm75", help="arch to run the overlay set for (default sm75)")


@command("fingerprint", "record a pristine tree's overlay-file hashes as --ref's fingerprint (maintainers)",
         _fingerprint_args)
def fingerprint_cmd(args) -> int:
    from . import fingerprint
    from .arch import get_arch
    from .overlay import read_manifest, record_fingerprint
    from .refs import get_ref
    ref = get_ref(args.ref)
    if read_manifest(args.src) is not None:
        raise KtlegacyError(f"{args.src} is patched; record a fingerprint from a pristine tree")
    files = record_fingerprint(args.src, ref, get_arch(args.arch))
    table = fingerprint.load() if fingerprint.FINGERPRINTS.is_file() else {}
    table[ref.name] = files
    fingerprint.write(table)
    print(f"{ref.name}: {len(files['files'])} files and a digest of {', '.join(files['scanned']['patterns'])} "
          f"recorded in {fingerprint.FINGERPRINTS}")
    return 0



def _fetch_args(p: argparse.ArgumentParser) -> None:
    from .refs import DEFAULT_REF, PYPI_SIMPLE_URL, REFS
    p.add_argument("--ref", default=None, help=f"supported ref ({', '.join(REFS)}) or, with --git-url, "
                                               f"any tag/commit (default {DEFAULT_REF})")
    p.add_argument("--dest", required=True, type=Path, help="directory to create with the pristine tree")
    p.add_argument("--git-url", default=None, help="clone this repository instead of the default origin of the ref")
    p.add_argument("--local", default=None, type=Path,
                   help="copy this local ktransformers tree (a directory or a tar archive of one) instead")
    p.add_argument("--index-url", default=PYPI_SIMPLE_URL,
                   help="PyPI simple index for the sdist (a mirror behind a firewall)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --dest")


@command("fetch-source", "get a pristine upstream ktransformers tree (sdist hash-checked, git commit recorded)",
         _fetch_args)
def fetch(args) -> int:
    from .refs import DEFAULT_REF
    from .source import fetch_source
    ref = args.ref or (None if (args.local or args.git_url) else DEFAULT_REF)
    record = fetch_source(args.dest, ref, git_url=args.git_url, local=args.local,
                          index=args.index_url, force=args.force)
    where = record.get("commit") or record.get("sha256") or record.get("path", "")
    print(f"fetched {record['origin']} {record.get('ref') or '(unnamed ref)'} into {args.dest} ({where})")
    return 0



class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input: ``error: ...`` on
    stderr, exit 2. A missing required flag is explained by its own help text."""

    def error(self, message: str):
        missing = re.match(r"the following arguments are required: ([^\s,]+)", message)
        action = missing and next((a for a in self._actions if missing.group(1) in a.option_strings), None)
        if action is not None:
            message = f"{missing.group(1)} is required: {action.help}"
        else:
            message = f"{message} (see: {self.prog} --help)"
        self.exit(2, f"error: {message}\n")


def build_parser(prog: str = "ktlegacy") -> argparse.ArgumentParser:
    """The whole command line; ``prog`` is what its messages call it (``invoke`` for the tasks)."""
    _load_plugins()
    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_args, _run) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
    parser.commands = sub.choices   # name -> that command's parser
    return parser


@dataclass(frozen=True)
class Flag:
    """One flag of a command, as a front end (tasks.py) needs it."""
    option: str      # "--cpu-instruct"
    name: str        # "cpu_instruct": the option as a Python identifier
    kind: str        # "value" (takes one), "switch" (store_true) or "list" (append: repeatable)
    help: str
    required: bool


def command_flags(name: str) -> list[Flag]:
    """The flags of command ``name``, read from its parser: every argument is a --flag."""
    parser = build_parser().commands[name]
    flags = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs:
            raise TypeError(f"{name}: argument {action.dest!r} is not a --flag; commands take --flags only")
        if isinstance(action, argparse._StoreTrueAction):
            kind = "switch"
        elif isinstance(action, argparse._AppendAction):
            kind = "list"
        elif type(action) is argparse._StoreAction and action.nargs is None:
            kind = "value"
        else:
            raise TypeError(f"{name} {longs[0]}: {type(action).__name__} has no front-end translation")
        help = action.help or ""
        if "%(" in help:
            help = help % dict(vars(action), prog=parser.prog)
        flags.append(Flag(longs[0], longs[0][2:].replace("-", "_"), kind, help, bool(action.required)))
    return flags


# Modules that register sub-commands of their own with @command (build, doctor, publish...).
PLUGIN_MODULES: tuple[str, ...] = (
    "ktlegacy.stub",
    "ktlegacy.publish",
    "ktlegacy.doctor",
    "ktlegacy.up",
    "ktlegacy.build",
    "ktlegacy.triton_check",
    "ktlegacy.testing.make_model",
    "ktlegacy.standin",
)


def _load_plugins() -> None:
    """Import every command module. A module whose own file is absent is skipped: the image stages
    copy only the library files they run (images/Dockerfile), and ``ktlegacy.testing`` comes with an
    extra. A module that is there but fails to import (a missing dependency, a broken import) fails
    the command line loudly instead of dropping its commands; that every listed module exists in
    the checkout is a test (tests/test_cli_tasks.py)."""
    import importlib
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if not (exc.name == mod or mod.startswith(f"{exc.name}.")):
                raise


def main(argv: list[str] | None = None, prog: str = "ktlegacy") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except KtlegacyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
