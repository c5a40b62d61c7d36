#!/usr/bin/env python3
"""Triton in the runtime: the build's kernel check (the `kernels` stage compiled every Triton kernel
of the patched tree for the arch and checked its shared memory) ran with the very Triton installed
here, for this arch, and passed; and Triton can build its CUDA launcher here. Triton compiles that
launcher (a small C module, against Python.h) the first time a kernel runs on a GPU; without a C
compiler or the Python headers every Triton kernel fails at its first launch ("Failed to find C
compiler"). The probe builds a module with Triton's own build function, as the launcher is built,
and imports it (no GPU, no libcuda needed).

Skipped on the stand-in build without Triton (its CPU torch has none).
"""

import importlib.util
import os
import sys
import tempfile

from smokelib import fail, image_arch, record, skip, standin

try:
    import triton
except ModuleNotFoundError:
    if standin():
        skip("stand-in build: its CPU torch has no Triton")
    fail("triton is not installed, but the image's torch needs it for ktransformers' MLA decode kernels")

kernels = record("ktlegacy-kernels.json")
if kernels is None:
    if os.environ.get("KTLEGACY_IMAGE_ARCH"):
        fail("the build's Triton kernel record (ktlegacy-kernels.json) is missing")
    summary = "no build record here"
elif "results" not in kernels:
    fail(f"the build's Triton kernel check did not run: {kernels.get('result', '?')} ({kernels.get('reason', '')})")
else:
    ran = kernels["results"]
    versions = {r.get("triton") for r in ran if r.get("triton")}
    if versions != {triton.__version__}:
        fail(f"the build checked the kernels with triton {sorted(versions)}, the image has {triton.__version__}")
    arch = image_arch()
    if arch and {r.get("arch") for r in ran} != {arch}:
        fail(f"the build checked the kernels for {sorted({r.get('arch') for r in ran})}, the image is {arch}")
    failed = [r.get("kernel") for r in ran if r.get("failed")]
    if failed:
        fail(f"the build's Triton kernel check recorded failures: {failed}")
    fits = [r for r in ran if r.get("verdict") == "fits"]
    worst = max(fits, key=lambda r: r["shared"] / r["limit"]) if fits else None
    summary = (f"{len(fits)} kernel launch(es) compiled for {arch} with triton {triton.__version__}"
               + (f", at most {worst['shared']:,} of {worst['limit']:,} B shared memory" if worst else ""))

# Triton's launcher build, as triton.backends.nvidia.driver does it (minus -lcuda, which only a GPU host has)
try:
    from triton.runtime.build import _build
except ImportError as exc:
    fail(f"triton {triton.__version__} has no triton.runtime.build._build ({exc}): update this probe")
SRC = r"""
#include <Python.h>
static PyObject* answer(PyObject* self, PyObject* args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ktlegacy_launcher_probe", NULL, -1, methods};
PyMODINIT_FUNC PyInit_ktlegacy_launcher_probe(void) { return PyModule_Create(&module); }
"""
with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "probe.c")
    with open(src, "w") as fh:
        fh.write(SRC)
    try:
        so = _build("ktlegacy_launcher_probe", src, tmp, [], [], [])
    except Exception as exc:
        fail(f"Triton cannot build its CUDA launcher here: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
             " (the runtime needs gcc, libc6-dev and python3-dev: images/scripts/runtime_base.sh)")
    spec = importlib.util.spec_from_file_location("ktlegacy_launcher_probe", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.answer() != 42:
        fail("Triton's launcher probe built but does not run")
print(f"{summary}; Triton builds its launcher here ({os.environ.get('CC') or 'gcc'})")
