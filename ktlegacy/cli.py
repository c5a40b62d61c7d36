"""``python -m ktlegacy`` / ``ktlegacy``: the library's command line.

Every command's flags, help and validation are defined once, by the module of its concern, which
registers it with :func:`ktlegacy.core.command.command` (an argparse ``add_arguments`` and a
``run(args)``). This module imports every one of those modules, so it is the only one that knows
them all; none imports it. The Invoke tasks in ``tasks.py`` are generated from these parsers
(:func:`command_flags`) and run :func:`main`, so ``invoke X`` and ``python -m ktlegacy X`` accept
the same flags and fail the same way: one ``error: ...`` line and a non-zero exit. The image
stages run the same code of ``ktlegacy.core`` through ``python -m ktlegacy.core``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

# Every command module, in the order --help lists their commands; each registers its own.
from .core import commands, stub  # noqa: F401
from . import publish, doctor, up, build  # noqa: F401
from .core import triton_check  # noqa: F401
from .testing import make_model  # noqa: F401
from . import standin  # noqa: F401
from .core.command import COMMANDS, build_parser, main  # noqa: F401  (the parser and dispatch they share)


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


if __name__ == "__main__":
    sys.exit(main())
