"""Check a patched tree against what the image will claim about it in its labels.

The build passes the overlay digest and the upstream commit (or sdist sha256) it computed on the
host as build args; they become labels. This step makes those labels honest: the tree that was
actually fetched and patched must carry the same values, else the build stops here.
Empty expectations are not checked (a hand-run ``docker build`` that did not pass them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--arch", required=True)
    p.add_argument("--expect-commit", default="")
    p.add_argument("--expect-digest", default="")
    args = p.parse_args(argv)

    source = json.loads((args.src / "ktlegacy-source.json").read_text())
    manifest = json.loads((args.src / "ktlegacy-overlays.json").read_text())
    fetched = source.get("commit") or (("sdist-sha256:" + source["sha256"]) if source.get("sha256") else "")
    problems = []
    if manifest.get("arch") != args.arch:
        problems.append(f"the tree was patched for {manifest.get('arch')}, the image is for {args.arch}")
    if args.expect_commit and args.expect_commit != fetched:
        problems.append(f"upstream is {fetched or '(unknown)'}, the build expected {args.expect_commit}")
    if args.expect_digest and args.expect_digest != manifest.get("overlay_digest"):
        problems.append(f"overlay digest is {manifest.get('overlay_digest')}, the build expected "
                        f"{args.expect_digest} (the overlays changed between planning and building?)")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"source checked: ref {source.get('ref')} ({fetched or 'no commit'}), arch {args.arch}, "
          f"overlay digest {manifest.get('overlay_digest')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
