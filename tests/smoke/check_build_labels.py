#!/usr/bin/env python3
"""What the image claims (KTLEGACY_IMAGE_*, set from the same build args as its labels) matches
what was built: the overlay manifest and source record of the patched tree, the extension and
Triton records, the installed torch and ktransformers.

The labels themselves are compared with this environment from outside (tests/test_build.py,
``invoke smoke``); here the claims meet the build's own records. Outside an image
(no KTLEGACY_IMAGE_ARCH) there is nothing to compare: skipped.
"""

import os

from smokelib import MANIFEST_DIR, fail, record, skip, standin

env = {k[len("KTLEGACY_IMAGE_"):].lower(): v for k, v in os.environ.items() if k.startswith("KTLEGACY_IMAGE_")}
if "arch" not in env:
    skip("not inside a ktlegacy image (KTLEGACY_IMAGE_ARCH unset)")

overlays = record("ktlegacy-overlays.json")
source = record("ktlegacy-source.json")
ext = record("ktlegacy-extensions.json")
kernels = record("ktlegacy-kernels.json")
missing = [n for n, r in (("ktlegacy-overlays.json", overlays), ("ktlegacy-source.json", source),
                          ("ktlegacy-extensions.json", ext), ("ktlegacy-kernels.json", kernels)) if r is None]
if missing:
    fail(f"build records missing from {MANIFEST_DIR}: {', '.join(missing)}")

problems = []


def same(what, claimed, actual):
    if claimed != actual:
        problems.append(f"{what}: image says {claimed!r}, build has {actual!r}")


same("arch (overlays)", env["arch"], overlays.get("arch"))
same("arch (extensions)", env["arch"], ext.get("arch"))
if "results" in kernels:  # the kernels stage's check (ktlegacy check-triton --json)
    same("arch (Triton check)", {env["arch"]}, {r.get("arch") for r in kernels["results"]})
    failed = [r.get("kernel") for r in kernels["results"] if r.get("failed")]
    if failed:
        problems.append(f"the Triton check recorded failures: {failed}")
    kernels_result = f"pass ({len(kernels['results'])} launches)"
else:  # the stand-in's record of why it did not run
    same("arch (Triton check)", env["arch"], kernels.get("arch"))
    kernels_result = kernels.get("result", "?")
same("ref", env.get("ref"), source.get("ref"))
same("ref (overlays)", env.get("ref"), overlays.get("ref"))
if env.get("overlay_digest"):
    same("overlay digest", env["overlay_digest"], overlays.get("overlay_digest"))
else:
    problems.append("no overlay digest claimed (KTLEGACY_IMAGE_OVERLAY_DIGEST empty)")
fetched = source.get("commit") or (("sdist-sha256:" + source["sha256"]) if source.get("sha256") else "")
if env.get("commit"):
    same("upstream commit", env["commit"], fetched)
same("CPU instruction set", (env.get("cpu_instruct") or "").upper(), (ext.get("cpu_instruct") or "").upper())
same("extensions", env.get("extensions"), ext.get("mode"))
same("stand-in", env.get("standin", "false") == "true", standin())

import torch  # noqa: E402

ci_torch = env.get("ci_torch", "")
if ci_torch:
    # CI's stand-in torch (KTLEGACY_CI_TORCH): PyPI's build of the pin's release, another CUDA; the
    # extensions are still CUDA 11.8's (nvcc, libcudart), which the CUDA claim is about.
    same("torch (CI's stand-in)", ci_torch, torch.__version__.split("+")[0])
    same("torch", env.get("torch"), ci_torch)
else:
    same("torch", env.get("torch"), torch.__version__)
if ext.get("mode") == "build" and not ci_torch:
    same("CUDA of torch", env.get("cuda"), torch.version.cuda)
if ext.get("mode") == "build":
    if "results" not in kernels:
        problems.append("the Triton kernel check did not run on a CUDA build")
from importlib.metadata import version  # noqa: E402

kt = version("ktransformers")
if f".{env['arch']}" not in kt:
    problems.append(f"installed ktransformers {kt} was not built for {env['arch']}")

if problems:
    fail("; ".join(problems))
print(f"{env['arch']}, ref {env.get('ref')}, overlays {env['overlay_digest'][:12]}, torch {torch.__version__}"
      f"{' (CI stand-in for the pin, CUDA ' + str(torch.version.cuda) + ')' if ci_torch else ''}, "
      f"CPU {env.get('cpu_instruct')}, extensions {ext.get('mode')}, Triton check {kernels_result}")
