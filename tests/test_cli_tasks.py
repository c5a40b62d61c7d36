"""One definition per command: the Invoke tasks (tasks.py) and ``python -m ktlegacy`` accept the
same flags, fail the same way, and the README's command table and the docs' command lines
match them. No Docker: nothing here builds or runs an image."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection, Context, FilesystemLoader
from invoke.exceptions import ParseError
from invoke.parser import Parser

from ktlegacy import cli

REPO = Path(__file__).resolve().parent.parent
INVOKE = str(Path(sys.executable).with_name("invoke"))


def _tasks() -> Collection:
    """tasks.py, loaded afresh as invoke loads it (a task's help is consumed by its first parse)."""
    module, _ = FilesystemLoader(start=str(REPO)).load("tasks")
    return Collection.from_module(module)


def _contexts() -> dict:
    """task name -> the ParserContext Invoke parses its flags with (what users type)."""
    return {ctx.name: ctx for ctx in _tasks().to_contexts()}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings}


def test_every_command_is_a_task_with_the_same_flags():
    commands = cli.build_parser().commands
    contexts = _contexts()
    assert set(contexts) == set(commands)
    for name, parser in commands.items():
        options = _options(parser)
        flags = {f: arg for f, arg in contexts[name].flags.items() if f.startswith("--")}
        assert set(flags) == set(options), name
        for option, action in options.items():
            arg = flags[option]
            if isinstance(action, argparse._StoreTrueAction):
                assert arg.kind is bool, (name, option)
            elif isinstance(action, argparse._AppendAction):
                assert arg.kind is list, (name, option)
            else:
                assert arg.kind is str and arg.takes_value, (name, option)  # the command converts and checks it
            assert arg.help.endswith(action.help), (name, option)
            assert arg.help.startswith("required: ") == bool(action.required), (name, option)
        assert not [a for a in contexts[name].positional_args], name


def test_task_turns_its_flags_back_into_the_commands_argv(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv, prog="ktlegacy": seen.append((argv, prog)) or 0)
    ns = _tasks()
    ns["publish"](Context(), registry="-r", cpu_instruct=["AVX2", "AVX512"], dry_run=True, moving=False)
    ns["make-test-model"](Context(), dest="d", layers="7")
    assert seen == [(["publish", "--registry=-r", "--cpu-instruct=AVX2", "--cpu-instruct=AVX512", "--dry-run"],
                     "invoke"),
                    (["make-test-model", "--dest=d", "--layers=7"], "invoke")]


def _invoke(*args) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, *args], capture_output=True, text=True, cwd=REPO)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    # the command's own checks, through invoke: a missing required flag is named with its help
    (["patch", "--arch", "sm75"], "error: --src is required: upstream tree to patch (from fetch-source)"),
    (["build", "--arch", "sm75", "--max-jobs", "many"],
     "error: argument --max-jobs: invalid int value: 'many' (see: invoke build --help)"),
    (["make-test-model", "--dest", "/nonexistent/x", "--preset", "v9"], "error: argument --preset: invalid choice"),
    # the one way to push is publish, with its label and arch checks
    (["build", "--arch", "sm75", "--push", "--dry-run"],
     "error: build --push is removed: build, then `invoke publish --registry REG` checks"),
    # what invoke itself refuses before the command runs
    (["build", "--no-such-flag"], "No idea what '--no-such-flag' is!"),
    (["build", "--arch"], "needed value and was not given"),
])
def test_bad_flags_through_invoke_are_one_line(args, expected):
    assert expected in _one_line(_invoke(*args))


def test_same_error_from_invoke_and_the_cli():
    via_cli = subprocess.run([sys.executable, "-m", "ktlegacy", "up"], capture_output=True, text=True, cwd=REPO)
    via_invoke = _invoke("up")
    assert _one_line(via_cli) == _one_line(via_invoke) == \
        f"error: --profile is required: {cli.command_flags('up')[0].help}"
    assert via_cli.returncode == via_invoke.returncode == 2


# -- the docs ------------------------------------------------------------------------------------

def _doc_command_lines() -> list[tuple[str, str]]:
    """(where, text after "invoke ") of every invoke command line in README.md and docs/*.md:
    lines of ```sh blocks (with their continuations) and inline `invoke ...` spans; not the
    command table (test_readme_command_table_lists_every_flag)."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        shell, lines = False, path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            where = f"{path.relative_to(REPO)}:{n}"
            while line.endswith("\\") and n < len(lines):
                line, n = line[:-1] + lines[n], n + 1
            if line.startswith("```"):
                shell = line.strip() == "```sh"
                continue
            m = re.search(r"(?:^\s*|&&\s*)(?:\.venv/bin/)?invoke (.*)", line)
            if shell and m:
                found.append((where, m.group(1).split(" #")[0]))
            elif not shell and not line.startswith("|"):
                found += [(where, span) for span in re.findall(r"`(?:\.venv/bin/)?invoke ([^`]+)`", line)]
    return found


def test_every_documented_invoke_line_parses():
    parser = Parser(contexts=list(_contexts().values()))
    lines = _doc_command_lines()
    assert len(lines) > 20
    for where, text in lines:
        tokens = shlex.split(text.replace("[", " ").replace("]", " "))
        if tokens[0].startswith(("-", "<")):
            continue  # invoke's own flags (--list), a placeholder (invoke <command>)
        try:
            parser.parse_argv(tokens)
        except ParseError as exc:
            pytest.fail(f"{where}: invoke {text}: {exc}")


def test_readme_command_table_lists_every_flag():
    """Each command has a row in the README's table, and its first cell names exactly the flags
    the command takes."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| `(?:invoke|python -m ktlegacy) ([a-z-]+)(.*?)` \|", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"--[a-z][a-z0-9-]*", m.group(2)))
    commands = cli.build_parser().commands
    assert set(rows) == set(commands)
    for name, parser in commands.items():
        assert rows[name] == set(_options(parser)), name


_ADD_ARCH = ("import ktlegacy.core.facts as f; f.ARCHES['sm79'] = f.Arch('sm79', (7, 9), '7.9', 'sm_79', 48 * 1024, "
             "'Test Card'); import sys; from ktlegacy.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("command, needle", [
    ("build", "), sm79 (Test Card) or all"),
    ("smoke", " or sm79: the arch the image must be labelled with"),
    ("patch", "sm79 (Test Card)"),
    ("publish", ", sm79 or all (default all)"),
    ("check-triton", ", sm79 or all"),
])
def test_arch_help_follows_the_arch_table(command, needle):
    """The arch named in help text comes from facts.ARCHES: an arch added there is named at once."""
    proc = subprocess.run([sys.executable, "-c", _ADD_ARCH, command, "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert needle in " ".join(proc.stdout.split()), proc.stdout
