"""Compile one Triton kernel launch of a ktransformers tree for a GPU we do not have.

Run by path (``python triton_worker.py REQUEST.json``) with the interpreter whose Triton is
under test, one process per compile: Triton 3.2 aborts the whole process with "LLVM ERROR:
Failed to compute parent layout for slice layout" on sm70, so the caller
(:mod:`ktlegacy.core.triton_check`) must survive a dead worker. Only the standard library and
Triton are imported here, never ktlegacy, so any venv holding a Triton wheel can run it.

How the launch is reproduced exactly: the worker imports the tree's real module, calls its
real host-side launch wrapper (``decode_attention_fwd_grouped`` ...) with shape-only fake
tensors, and lets Triton's own ``JITFunction.run`` bind the arguments, specialise them and
build the compile request (signature, constexprs, divisibility attributes, ``num_warps``,
``num_stages``) as it would on a GPU. Two things are swapped for the GPU: the active driver
(it reports the target arch and device 0) and ``CompiledKernel.__init__`` (it stops the run
once the kernel is compiled, before anything is loaded onto a device). Launches of other
kernels made by the same wrapper are recorded and skipped. Because Triton itself builds the
request, the same code serves every Triton version from 3.1 on.

The request (JSON): ``tree`` (the root on sys.path), ``module`` (dotted name), ``file``
(path of that module), ``entry`` (wrapper function name), ``args`` / ``kwargs`` (values; a
tensor is ``{"tensor": [shape], "dtype": "float16", "strides": [...]?}``), ``cc`` ([7, 5]),
``kernel`` (name of the JIT function to compile) and ``launch_index`` (which launch of it).
The answer is one JSON line on stdout prefixed ``KTLEGACY-RESULT ``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback

RESULT_PREFIX = "KTLEGACY-RESULT "


class _Dtype:
    """Stands in for ``torch.<name>``: Triton maps ``str(dtype).split('.')[-1]`` to its types."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return "torch." + self.name

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, _Dtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("_Dtype", self.name))


class FakeTensor:
    """Shape, strides, dtype and a 16-byte aligned address: all a launch wrapper reads."""

    _next_address = 1 << 20

    def __init__(self, shape, dtype="float16", strides=None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _Dtype(dtype)
        if strides is None:
            strides, step = [], 1
            for size in reversed(self.shape):
                strides.insert(0, step)
                step *= max(size, 1)
        self._strides = tuple(int(s) for s in strides)
        # torch's caching allocator hands out 512-byte aligned blocks; Triton specialises on %16
        self._address = FakeTensor._next_address
        FakeTensor._next_address += 1 << 20

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def dim(self) -> int:
        return len(self.shape)

    def data_ptr(self) -> int:
        return self._address

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def is_contiguous(self) -> bool:
        return self._strides == FakeTensor(self.shape, self.dtype.name)._strides

    def __repr__(self) -> str:
        return f"FakeTensor({list(self.shape)}, {self.dtype.name})"


def _decode(value):
    if isinstance(value, dict) and "tensor" in value:
        return FakeTensor(value["tensor"], value.get("dtype", "float16"), value.get("strides"))
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class _Captured(Exception):
    def __init__(self, compiled):
        super().__init__("compiled")
        self.compiled = compiled


class _FakeDriver:
    """The active driver while no GPU is present: device 0 of the requested arch."""

    def __init__(self, target):
        self._target = target

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):  # triton >= 3.4 asks for it in some paths
        raise RuntimeError("no torch device in a build-time compile")

    def is_active(self):
        return True


def shared_bytes(compiled) -> int:
    """Shared memory a compiled kernel needs per block (the metadata field moved over versions)."""
    meta = compiled.metadata
    for name in ("shared", "shared_mem", "shared_memory"):
        value = meta.get(name) if isinstance(meta, dict) else getattr(meta, name, None)
        if value is not None:
            return int(value)
    value = getattr(compiled, "shared", None)
    if value is not None:
        return int(value)
    raise RuntimeError(f"cannot find the shared-memory size in Triton's metadata: {meta!r}")


def _meta(compiled, name, default=None):
    meta = compiled.metadata
    return meta.get(name, default) if isinstance(meta, dict) else getattr(meta, name, default)


def run(request: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler as triton_compiler
    from triton.runtime import jit as triton_jit
    from triton.runtime.driver import driver

    major, minor = request["cc"]
    driver.set_active(_FakeDriver(GPUTarget("cuda", major * 10 + minor, 32)))

    original_init = triton_compiler.CompiledKernel.__init__

    def stop_after_compile(self, *a, **kw):
        original_init(self, *a, **kw)
        raise _Captured(self)

    triton_compiler.CompiledKernel.__init__ = stop_after_compile

    sys.path.insert(0, request["tree"])
    spec = importlib.util.spec_from_file_location(request["module"], request["file"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[request["module"]] = module
    spec.loader.exec_module(module)

    target_name, want_index = request["kernel"], request.get("launch_index", 0)
    launches: list[dict] = []
    original_run = triton_jit.JITFunction.run

    def selective_run(self, *args, grid=None, warmup=False, **kwargs):
        name = getattr(self.fn, "__name__", "?")
        index = sum(1 for l in launches if l["kernel"] == name)
        launches.append({"kernel": name,
                         "num_warps": kwargs.get("num_warps"), "num_stages": kwargs.get("num_stages")})
        if name == target_name and index == want_index:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    triton_jit.JITFunction.run = selective_run
    entry = getattr(module, request["entry"])
    try:
        entry(*_decode(request.get("args", [])), **{k: _decode(v) for k, v in request.get("kwargs", {}).items()})
    except _Captured as captured:
        compiled = captured.compiled
        launch = [l for l in launches if l["kernel"] == target_name][want_index]
        return {
            "status": "compiled",
            "triton": triton.__version__,
            "kernel": target_name,
            "shared": shared_bytes(compiled),
            "num_warps": _meta(compiled, "num_warps", launch["num_warps"]),
            "num_stages": _meta(compiled, "num_stages", launch["num_stages"]),
            "launches": launches,
        }
    return {"status": "not-launched", "triton": triton.__version__, "kernel": target_name,
            "launches": launches}


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as fh:
        request = json.load(fh)
    try:
        result = run(request)
    except Exception as exc:  # the compiler's own error is the answer we report
        lines = [l for l in str(exc).strip().splitlines() if l.strip()]
        result = {"status": "error", "error_type": type(exc).__name__,
                  "error": lines[-1] if lines else type(exc).__name__,
                  "traceback": traceback.format_exc()[-4000:]}
        try:
            import triton
            result["triton"] = triton.__version__
        except Exception:
            pass
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    sys.exit(main(sys.argv))
