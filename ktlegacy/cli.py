"""``python -m ktlegacy`` / ``ktlegacy``: the library's command line.

The Invoke tasks in ``tasks.py`` call the same functions; this entry point exists so the
image build (which has no Invoke) and the GPU machine run exactly the same code.
Sub-commands register themselves in :data:`COMMANDS` (one module per concern adds its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .errors import KtlegacyError

# name -> (help, add_arguments(parser), run(args) -> int)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str, add_arguments: Callable):
    """Register ``fn(args) -> int`` as sub-command ``name``."""
    def register(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn
    return register


def _patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, type=Path, help="upstream tree (from fetch-source)")
    p.add_argument("--arch", required=True, help="sm70 (V100) or sm75 (T4, RTX 2080 Ti)")
    p.add_argument("--ref", default=None, help="force the overlay set of this ref (default: detected)")
    p.add_argument("--check", action="store_true", help="say what would change, write nothing")


@command("patch", "apply the overlays to an upstream tree (all or nothing, idempotent)", _patch_args)
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
    from .overlay import read_manifest
    from .refs import get_ref
    ref = get_ref(args.ref)
    if read_manifest(args.src) is not None:
        raise KtlegacyError(f"{args.src} is patched; record a fingerprint from a pristine tree")
    files = fingerprint.record(args.src, ref, get_arch(args.arch))
    table = fingerprint.load() if fingerprint.FINGERPRINTS.is_file() else {}
    table[ref.name] = files
    fingerprint.write(table)
    print(f"{ref.name}: {len(files['files'])} files and a digest of {', '.join(files['scanned']['patterns'])} "
          f"recorded in {fingerprint.FINGERPRINTS}")
    return 0



def _fetch_args(p: argparse.ArgumentParser) -> None:
    from .refs import DEFAULT_REF, PYPI_SIMPLE_URL
    p.add_argument("--ref", default=None, help=f"supported ref, or tag/commit with --git-url (default {DEFAULT_REF})")
    p.add_argument("--dest", required=True, type=Path, help="directory to create")
    p.add_argument("--git-url", default=None, help="clone this repository instead (with --ref TAG|COMMIT)")
    p.add_argument("--local", default=None, type=Path, help="copy this local tree (a directory or a tar archive of one) instead")
    p.add_argument("--index-url", default=PYPI_SIMPLE_URL, help="PyPI simple index for sdist refs")
    p.add_argument("--force", action="store_true", help="replace a non-empty --dest")


@command("fetch-source", "get a pristine upstream ktransformers tree (sdist, git or local)", _fetch_args)
def fetch(args) -> int:
    from .refs import DEFAULT_REF
    from .source import fetch_source
    ref = args.ref or (None if (args.local or args.git_url) else DEFAULT_REF)
    record = fetch_source(args.dest, ref, git_url=args.git_url, local=args.local,
                          index=args.index_url, force=args.force)
    where = record.get("commit") or record.get("sha256") or record.get("path", "")
    print(f"fetched {record['origin']} {record.get('ref') or '(unnamed ref)'} into {args.dest} ({where})")
    return 0



def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="ktlegacy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_args, _run) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
    return parser


# Modules that register sub-commands of their own with @command (build, doctor, publish...).
PLUGIN_MODULES: tuple[str, ...] = (
    "ktlegacy.stub",
    "ktlegacy.publish",
    "ktlegacy.doctor",
    "ktlegacy.up",
    "ktlegacy.build",
    "ktlegacy.triton_check",
    "ktlegacy.testing.testmodel",
    "ktlegacy.standin",
)


def _load_plugins() -> None:
    import importlib
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # a module (or its package) left out, as in the image stages that copy only what they
            # run (images/Dockerfile): its commands are absent; a missing import inside it is a bug
            if exc.name != mod and not mod.startswith(f"{exc.name}."):
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
