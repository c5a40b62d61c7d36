"""The tree commands: ``fetch-source``, ``patch`` and ``fingerprint`` (what the source stage runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .command import command
from .errors import KtlegacyError
from .facts import ARCHES, arch_choice


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
