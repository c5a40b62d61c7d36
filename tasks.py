"""Invoke tasks: ``python -m ktlegacy``'s commands, one task each (run ``invoke --list``).

Nothing here defines a flag. Each task is generated from its command's argparse parser
(``ktlegacy.cli.command_flags``): the same flag names and help, a store_true flag as a boolean,
a repeatable flag as an iterable; every argument is a --flag (``positional=[]``). The task turns
its flags back into the command's argv and runs ``ktlegacy.cli.main``, so checks and errors are
the command's own: one ``error: ...`` line and a non-zero exit.
"""

from __future__ import annotations

import inspect
import sys

import invoke.parser.parser
from invoke import Collection, Task
from invoke.exceptions import Exit, ParseError

from ktlegacy import cli


class OneLineParseError(ParseError, Exit):
    """What invoke's own parser refuses (an unknown flag, a flag without its value) reads like the
    command's own errors: one ``error: ...`` line and exit 2. Invoke prints a ParseError and exits 1;
    as an Exit too, it exits with this one's code."""

    def __init__(self, msg, context=None):
        super().__init__(msg, context)
        self.message, self._code = None, 2   # printed once (as a ParseError), exit 2

    def __str__(self) -> str:
        name = getattr(self.context, "name", None)
        return f"error: {self.args[0]} (see: invoke {name + ' ' if name else ''}--help)"


# invoke parses a task's flags after loading this file, raising through this module-level name
invoke.parser.parser.ParseError = OneLineParseError


def _argv(command: str, flags: list[cli.Flag], values: dict) -> list[str]:
    argv = [command]
    for flag in flags:
        value = values.get(flag.name)
        if flag.kind == "switch":
            argv += [flag.option] if value else []
        elif flag.kind == "list":
            argv += [f"{flag.option}={item}" for item in value or ()]
        elif value is not None:
            argv.append(f"{flag.option}={value}")   # "=": a value may start with "-"
    return argv


def command_task(command: str) -> Task:
    """An Invoke task that runs ``python -m ktlegacy <command>`` with the flags it is given."""
    help, _add_arguments, _run = cli.COMMANDS[command]
    flags = cli.command_flags(command)

    def body(c, **values):
        code = cli.main(_argv(command, flags, values), prog="invoke")
        if code:
            sys.exit(code)

    body.__name__ = command.replace("-", "_")
    body.__doc__ = help
    # Invoke reads the flags off the signature: no default is a value flag (a string, converted and
    # checked by the command), False a boolean flag.
    body.__signature__ = inspect.Signature(
        [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=False if f.kind == "switch" else None)
           for f in flags])
    return Task(body, name=command, positional=[], auto_shortflags=False,
                iterable=[f.name for f in flags if f.kind == "list"],
                help={f.name: ("required: " if f.required else "") + f.help for f in flags})


ns = Collection()
for _command in cli.build_parser().commands:
    ns.add_task(command_task(_command))
