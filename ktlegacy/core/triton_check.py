"""Build-time proof that every Triton kernel of a patched ktransformers tree fits the target GPU.

No GPU is needed: each kernel launch the patched code makes on the target arch is compiled
with the installed Triton for a ``GPUTarget("cuda", 70|75, 32)`` by
:mod:`ktlegacy.core.triton_worker` (one process per compile, because some Triton versions abort
the process), and the shared memory the compiled kernel asks for is compared with what a
block may use on that arch (:attr:`ktlegacy.core.arch.Arch.shared_mem_per_block`). A kernel that
does not compile, or needs more than the limit, fails the check with one line naming the
kernel, the arch and the bytes (or the compiler's error). This is what pins the image's
torch: its Triton must pass here (docs/torch-pin.md).

Which launches are compiled is data, below: for every ``@triton.jit`` kernel the tree
launches, either scenarios (the host-side wrapper to call and the model shapes it is called
with, the DeepSeek MLA decode with 576/512 latent dims for V2/V3 and V2-Lite head counts) or
a reason it never runs on sm70/sm75. A kernel found in the tree but not listed fails the
check, so an upstream ref that adds a kernel cannot slip through unchecked.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .arch import ARCHES, Arch
from .command import command
from .errors import KtlegacyError
from .facts import arch_choice

WORKER = Path(__file__).with_name("triton_worker.py")
RESULT_PREFIX = "KTLEGACY-RESULT "


# -- what the patched code launches ------------------------------------------------------------

@dataclass(frozen=True)
class Model:
    """The shapes of one model's MLA decode call (attention.py: forward_linux_triton)."""
    name: str
    num_heads: int
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    page_size: int = 64          # custom_cache.StaticCache for DeepSeek V2/V3
    num_kv_splits: int = 4       # attention.py passes 4
    max_pages: int = 128         # 8192-token cache; only its divisibility by 16 matters to Triton
    batch: int = 1


# DeepSeek-V2 and V3/R1 share 128 heads and the 512+64 latent; V2-Lite has 16 heads.
# kv_group_num (= num_heads, one latent KV head) is a constexpr, so both counts are compiled.
MODELS = (
    Model("DeepSeek-V3/R1/V2", num_heads=128),
    Model("DeepSeek-V2-Lite", num_heads=16),
)


def _tensor(shape, dtype, strides=None) -> dict:
    spec = {"tensor": list(shape), "dtype": dtype}
    if strides is not None:
        spec["strides"] = list(strides)
    return spec


def mla_decode_call(model: Model, dtype: str) -> tuple[list, dict]:
    """Arguments of ``decode_attention_fwd_grouped`` exactly as attention.py builds them."""
    lk = model.kv_lora_rank + model.qk_rope_head_dim
    b, h, p = model.batch, model.num_heads, model.page_size
    query = _tensor((b, h, lk), dtype)                                  # cat(q_nope, q_pe).squeeze(1)
    kv_cache = _tensor((model.max_pages, p, 1, lk), dtype)              # compressed_kv_with_k_pe
    kv_latent = _tensor((model.max_pages, p, 1, model.kv_lora_rank), dtype,
                        (p * lk, lk, lk, 1))                            # [..., :kv_lora_rank] view
    out = _tensor((b, 1, h, model.kv_lora_rank), dtype,
                  (h * model.kv_lora_rank, model.kv_lora_rank, model.kv_lora_rank, 1))
    page_table = _tensor((b, model.max_pages), "int32")
    seq_lens = _tensor((b,), "int32")
    logits = _tensor((b, h, model.num_kv_splits, model.kv_lora_rank + 1), "float32")
    softmax_scale = 0.1352337788608801                                  # value is not specialised
    return ([query, kv_cache, kv_latent, out, page_table, seq_lens, logits,
             model.num_kv_splits, softmax_scale, p], {})


@dataclass(frozen=True)
class Scenario:
    """One call of a host-side wrapper that launches the kernel."""
    name: str
    entry: str                               # function of the kernel's module to call
    call: Callable[[str], tuple[list, dict]]  # dtype -> (args, kwargs)
    launch_index: int = 0                    # which launch of this kernel within the call


@dataclass(frozen=True)
class KernelSpec:
    """How a ``@triton.jit`` kernel of the tree is checked: scenarios, or why it is not."""
    scenarios: tuple = ()
    not_run_because: str = ""
    # wrappers that must stay uncalled for ``not_run_because`` to hold (checked over the tree)
    uncalled: tuple = ()


def _mla_scenarios() -> tuple:
    return tuple(Scenario(m.name, "decode_attention_fwd_grouped",
                          (lambda dtype, m=m: mla_decode_call(m, dtype))) for m in MODELS)


DECODE = "ktransformers/operators/triton_attention.py"
PREFILL = "ktransformers/operators/triton_attention_prefill.py"
FP8 = "ktransformers/ktransformers_ext/triton/fp8gemm.py"
FP8_REASON = ("FP8 (e4m3) kernels need sm89+; the sm70/sm75 overlays drop FP8 linear ops and "
              "ktlegacy serves GGUF weights only")

KERNELS: dict[tuple[str, str], KernelSpec] = {
    (DECODE, "_fwd_grouped_kernel_stage1"): KernelSpec(_mla_scenarios()),
    (DECODE, "_fwd_kernel_stage2"): KernelSpec(_mla_scenarios()),
    # v0.2.4post1..v0.3.2: imported by attention.py, never called
    (PREFILL, "_fwd_kernel"): KernelSpec(not_run_because="context_attention_fwd is never called",
                                         uncalled=("context_attention_fwd",)),
    (FP8, "act_quant_kernel"): KernelSpec(not_run_because=FP8_REASON),
    (FP8, "weight_dequant_kernel"): KernelSpec(not_run_because=FP8_REASON),
    (FP8, "fp8_gemm_kernel"): KernelSpec(not_run_because=FP8_REASON),
}

# The compute dtype of the patched code on sm70/sm75 (ktlegacy_runtime.default_dtype()):
# neither arch has bf16 tensor cores.
LEGACY_DTYPE = "float16"


# -- finding the kernels of a tree -------------------------------------------------------------

def _decorator_names(fn: ast.FunctionDef) -> list[str]:
    names = []
    for dec in fn.decorator_list:
        node = dec.func if isinstance(dec, ast.Call) else dec
        names.append(ast.unparse(node))
    return names


@dataclass
class FoundKernel:
    path: str       # relative to the tree
    name: str
    launched: bool  # launched as kernel[grid](...) somewhere in its file (else a device function)


def find_kernels(tree: Path) -> list[FoundKernel]:
    """Every ``@triton.jit`` function under ``tree/ktransformers``, marked launched or device-only."""
    found = []
    root = Path(tree)
    for path in sorted((root / "ktransformers").rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "triton" not in text or "jit" not in text:
            continue
        try:
            module = ast.parse(text)
        except SyntaxError:
            continue
        jitted = [n for n in module.body if isinstance(n, ast.FunctionDef)
                  and any(d in ("triton.jit", "jit") for d in _decorator_names(n))]
        if not jitted:
            continue
        autotuned = {n.name for n in jitted if any("autotune" in d for d in _decorator_names(n))}
        launched = {node.func.value.id for node in ast.walk(module)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)}
        rel = path.relative_to(root).as_posix()
        for fn in jitted:
            found.append(FoundKernel(rel, fn.name, fn.name in launched or fn.name in autotuned))
    return found


def _callers(tree: Path, function: str, skip: str) -> list[str]:
    """Files (other than ``skip``) that call ``function`` by name or attribute."""
    hits = []
    for path in sorted((Path(tree) / "ktransformers").rglob("*.py")):
        rel = path.relative_to(tree).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        if rel == skip or function not in text:
            continue
        try:
            module = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(module):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == function) or \
                        (isinstance(f, ast.Attribute) and f.attr == function):
                    hits.append(rel)
                    break
    return hits


# -- compiling -----------------------------------------------------------------------------------

@dataclass
class Result:
    kernel: str
    path: str
    scenario: str
    arch: str
    triton: str = ""
    num_warps: int | None = None
    num_stages: int | None = None
    shared: int | None = None
    limit: int | None = None
    verdict: str = ""   # "fits", "too-big", "compile-error", "not-run", "unknown-kernel"
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict in ("too-big", "compile-error", "unknown-kernel")

    def message(self) -> str:
        """The one line a failed build prints."""
        where = f"Triton kernel {self.kernel} ({self.path}, {self.scenario})"
        tri = f"triton {self.triton}" if self.triton else "the installed triton"
        if self.verdict == "too-big":
            return (f"{where} needs {self.shared:,} B of shared memory per block on {self.arch}, "
                    f"over the {self.limit:,} B limit (num_warps={self.num_warps}, "
                    f"num_stages={self.num_stages}, {tri})")
        if self.verdict == "compile-error":
            return f"{where} does not compile for {self.arch} with {tri}: {self.detail}"
        if self.verdict == "unknown-kernel":
            return (f"Triton kernel {self.kernel} ({self.path}) has no launch scenario: add one to "
                    f"ktlegacy/core/triton_check.py KERNELS so it is compiled for {self.arch}")
        return f"{where} on {self.arch}: {self.verdict}"


def _interesting_stderr(stderr: str) -> str:
    """The compiler's own words: an LLVM/MLIR error line beats a Python traceback."""
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    for pattern in (r"^LLVM ERROR:", r"error: (?!Failures have been detected)", r"Assertion .* failed",
                    r"^[A-Za-z]*Error:"):
        for line in lines:
            if re.search(pattern, line):
                return line[:300]
    return lines[-1][:300] if lines else ""


def _install_pin() -> str:
    """How to get the image's torch (it brings the Triton it requires): the pin of ktlegacy/core/facts.py."""
    try:
        from .facts import TORCH_INDEX_URL, TORCH_VERSION
    except ModuleNotFoundError:  # the image's kernels stage copies only the check (images/Dockerfile)
        return "the toolchain stage installs the torch pin, which brings its Triton (docs/torch-pin.md)"
    return (f"install the image's torch pin, pip install torch=={TORCH_VERSION} --index-url "
            f"{TORCH_INDEX_URL} (it brings the Triton it requires; docs/torch-pin.md)")


def triton_version(python: str) -> str:
    """The Triton version of ``python``, or a one-line error saying how to get one."""
    try:
        proc = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                              capture_output=True, text=True, timeout=300)
    except (FileNotFoundError, PermissionError):
        raise KtlegacyError(f"python interpreter {python!r} not found: pass --python with the "
                            "interpreter whose Triton the image uses")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KtlegacyError(f"{python} cannot import triton ({last}): {_install_pin()}, or pass --python "
                            "with the image's interpreter")
    return proc.stdout.strip()


def compile_launch(tree: Path, path: str, kernel: str, scenario: Scenario, arch: Arch,
                   python: str, dtype: str = LEGACY_DTYPE, timeout: int = 600,
                   triton: str = "") -> Result:
    """Compile one kernel launch in a fresh worker process and judge it against ``arch``."""
    tree = Path(tree).resolve()
    args, kwargs = scenario.call(dtype)
    request = {
        "tree": str(tree), "file": str(tree / path),
        "module": path[:-3].replace("/", "."),
        "entry": scenario.entry, "args": args, "kwargs": kwargs,
        "cc": list(arch.compute_capability), "kernel": kernel, "launch_index": scenario.launch_index,
    }
    result = Result(kernel, path, scenario.name, arch.name, triton=triton, limit=arch.shared_mem_per_block)
    env = dict(os.environ)
    # the patched tree's ktlegacy_runtime reads this instead of asking a GPU
    env["KTLEGACY_EMULATE_CC"] = arch.cc_string
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(request, fh)
        request_path = fh.name
    try:
        proc = subprocess.run([python, str(WORKER), request_path], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=tempfile.gettempdir())
    except FileNotFoundError:
        raise KtlegacyError(f"python interpreter {python!r} not found: pass --python with the "
                            "interpreter whose Triton the image uses")
    except subprocess.TimeoutExpired:
        result.verdict, result.detail = "compile-error", f"compiler still running after {timeout} s"
        return result
    finally:
        os.unlink(request_path)
    answer = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            answer = json.loads(line[len(RESULT_PREFIX):])
    if answer is None:
        # the worker died inside the compiler (LLVM aborts the process)
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        result.verdict = "compile-error"
        result.detail = (_interesting_stderr(proc.stderr) or "no message") + f" (compiler process died: {how})"
        return result
    result.triton = answer.get("triton", "") or triton
    if answer["status"] == "error":
        if answer.get("error_type") == "ModuleNotFoundError" and "triton" not in answer.get("error", ""):
            raise KtlegacyError(f"cannot import {path} with {python}: {answer['error']}; run the check "
                                "with the image's Python (torch and triton installed)")
        if answer.get("error_type") == "ModuleNotFoundError":
            raise KtlegacyError(f"{python} has no Triton: {_install_pin()}, or pass --python with the image's "
                                "interpreter")
        result.verdict = "compile-error"
        result.detail = _interesting_stderr(proc.stderr) or answer.get("error", "")
        if answer.get("error") and answer["error"] not in result.detail:
            result.detail = f"{result.detail} ({answer['error']})" if result.detail else answer["error"]
        return result
    if answer["status"] == "not-launched":
        launched = ", ".join(sorted({l["kernel"] for l in answer.get("launches", [])})) or "nothing"
        raise KtlegacyError(f"{scenario.entry}() in {path} no longer launches {kernel} (it launched "
                            f"{launched}): update ktlegacy/core/triton_check.py KERNELS for this ref")
    result.shared = int(answer["shared"])
    result.num_warps = answer.get("num_warps")
    result.num_stages = answer.get("num_stages")
    result.verdict = "fits" if result.shared <= arch.shared_mem_per_block else "too-big"
    return result


def check_tree(tree: Path, arches: list[Arch], python: str | None = None,
               kernels: dict | None = None, dtype: str = LEGACY_DTYPE, timeout: int = 600) -> list[Result]:
    """Compile every kernel launch of ``tree`` for each arch; results for all, failures included."""
    tree = Path(tree)
    if not (tree / "ktransformers").is_dir():
        raise KtlegacyError(f"{tree} is not a ktransformers tree (no ktransformers/ directory): "
                            "pass the patched source tree with --src")
    python = python or sys.executable
    specs = KERNELS if kernels is None else kernels
    found = find_kernels(tree)
    if not any(k.launched for k in found):
        raise KtlegacyError(f"no launched @triton.jit kernel found under {tree}/ktransformers: "
                            "is this the right tree?")
    version = triton_version(python)
    results: list[Result] = []
    for arch in arches:
        for k in found:
            if not k.launched:
                continue  # a device function: compiled inside the kernels that call it
            spec = specs.get((k.path, k.name))
            if spec is None:
                results.append(Result(k.name, k.path, "-", arch.name, verdict="unknown-kernel",
                                      limit=arch.shared_mem_per_block))
                continue
            if spec.not_run_because:
                called = [f"{fn} is called from {', '.join(where)}" for fn in spec.uncalled
                          for where in [_callers(tree, fn, k.path)] if where]
                if called:
                    results.append(Result(k.name, k.path, "-", arch.name, verdict="unknown-kernel",
                                          limit=arch.shared_mem_per_block, detail="; ".join(called)))
                else:
                    results.append(Result(k.name, k.path, "-", arch.name, verdict="not-run",
                                          limit=arch.shared_mem_per_block, detail=spec.not_run_because))
                continue
            for scenario in spec.scenarios:
                results.append(compile_launch(tree, k.path, k.name, scenario, arch, python,
                                              dtype=dtype, timeout=timeout, triton=version))
    return results


# -- reporting -----------------------------------------------------------------------------------

def format_table(results: list[Result]) -> str:
    header = ("kernel", "scenario", "arch", "triton", "warps", "stages", "shared B", "limit B", "verdict")
    rows = [header]
    for r in results:
        verdict = r.verdict if r.verdict != "not-run" else f"not run: {r.detail}"
        if r.verdict == "compile-error":
            verdict = f"compile error: {r.detail}"
        rows.append((r.kernel, r.scenario, r.arch, r.triton or "-",
                     "-" if r.num_warps is None else str(r.num_warps),
                     "-" if r.num_stages is None else str(r.num_stages),
                     "-" if r.shared is None else f"{r.shared:,}",
                     "-" if r.limit is None else f"{r.limit:,}", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    return "\n".join(lines)


def write_json(results: list[Result], path: Path, tree: Path) -> None:
    from .source import read_record
    data = {"tree": str(tree), "source": read_record(tree),
            "results": [dict(asdict(r), failed=r.failed) for r in results]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_check(tree: Path, arches: list[Arch], python: str | None = None,
              json_path: Path | None = None, out=None) -> list[Result]:
    """Print the table (and write JSON); raise the first failure's line if any kernel fails."""
    out = out or sys.stdout
    results = check_tree(tree, arches, python=python)
    print(format_table(results), file=out)
    if json_path:
        write_json(results, json_path, Path(tree))
    failures = [r for r in results if r.failed]
    if failures:
        more = f" (and {len(failures) - 1} more failing launch(es), see the table)" if len(failures) > 1 else ""
        raise KtlegacyError(failures[0].message() + more, exit_code=1)
    return results


# -- command line --------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--src", required=True, type=Path, help="patched ktransformers tree (from fetch-source + patch)")
    p.add_argument("--arch", required=True, help=arch_choice("all"))
    p.add_argument("--python", default=None,
                   help="interpreter whose Triton compiles the kernels (default: this one; e.g. the image's venv)")
    p.add_argument("--json", default=None, type=Path, help="also write the results to this file")


def main(args) -> int:
    from .arch import arches_for
    run_check(args.src, arches_for(args.arch), python=args.python, json_path=args.json)
    return 0


command("check-triton", f"compile every Triton kernel of a patched tree for {'/'.join(ARCHES)} (no GPU) and "
        "check its shared memory", add_arguments)(main)
