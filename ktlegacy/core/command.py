"""The command registry and its parser: a module adds its sub-commands with :func:`command`;
:func:`main` parses and runs whatever modules were imported (ktlegacy/cli.py imports them all,
``python -m ktlegacy.core`` the image stages' own)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from .errors import KtlegacyError

# name -> (help, add_arguments(parser), run(args) -> int)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}
DESCRIPTION = "``python -m ktlegacy`` / ``ktlegacy``: the library's command line."


def command(name: str, help: str, add_arguments: Callable):
    """Register ``fn(args) -> int`` as sub-command ``name``."""
    def register(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn
    return register


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
    """The registered commands' parser; ``prog`` is what its messages call it (``invoke`` for the tasks)."""
    parser = OneLineParser(prog=prog, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_args, _run) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
    parser.commands = sub.choices   # name -> that command's parser
    return parser


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
