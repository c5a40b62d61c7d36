"""The build-time Triton check (ktlegacy/core/triton_check.py) against real Triton wheels, no GPU.

Two Triton versions, each in a cached venv from PyPI (tests/cached_venv.py) with a CPU torch
(the patched tree's ktlegacy_runtime imports torch):
  * 3.1.0 (torch 2.5.1, the image's pin): every kernel of the patched 0.2.1.post1 tree fits
    sm70 and sm75; the MLA decode stage-1 kernel needs 52,224 B;
  * 3.2.0 (torch 2.6): the compiler aborts the process on sm70 ("LLVM ERROR: Failed to compute
    parent layout for slice layout") -- the check survives it and names kernel and arch.
A kernel forced to a larger tile (the real stage-1 kernel with BLOCK_N 64 or 128) must fail
with bytes needed vs the arch's limit.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cached_venv import TORCH_CPU, cached_venv
from ktlegacy.core.arch import ARCHES
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.triton_check import (DECODE, KERNELS, PREFILL, KernelSpec, Scenario, check_tree,
                                   find_kernels, run_check)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "images" / "scripts" / "check_triton_kernels.py"
STAGE1, STAGE2 = "_fwd_grouped_kernel_stage1", "_fwd_kernel_stage2"
MLA_STAGE1_BYTES = 52_224  # measured with triton 3.1.0 for sm70 and sm75 (docs/torch-pin.md)


@pytest.fixture(scope="session")
def triton_310() -> Path:
    return cached_venv("triton-3.1.0", ["triton==3.1.0", TORCH_CPU])


@pytest.fixture(scope="session")
def triton_320() -> Path:
    return cached_venv("triton-3.2.0", ["triton==3.2.0", TORCH_CPU])


@pytest.fixture(scope="module")
def patched_trees(sdist_tree, tmp_path_factory) -> dict:
    """The 0.2.1.post1 sdist patched by the real overlays, once per arch."""
    from ktlegacy.core.overlay import patch_tree
    trees = {}
    for name, arch in ARCHES.items():
        dest = tmp_path_factory.mktemp(f"patched-{name}") / "tree"
        shutil.copytree(sdist_tree, dest, symlinks=True)
        patch_tree(dest, arch, out=lambda line: None)
        trees[name] = dest
    return trees


def _set_block_n(tree: Path, block: int) -> None:
    """Force the stage-1 launch's BLOCK_N (anchored edit of the launch wrapper)."""
    path = tree / DECODE
    text = path.read_bytes().decode()
    assert len(re.findall(r"^    BLOCK = 32\r?$", text, flags=re.M)) == 1, "launch site drifted"
    path.write_bytes(re.sub(r"^    BLOCK = 32(\r?)$", rf"    BLOCK = {block}\1", text, flags=re.M).encode())


# -- discovery (no Triton needed) -----------------------------------------------------------------

def test_finds_the_two_mla_kernels_and_the_device_helper(sdist_tree):
    found = {(k.path, k.name): k.launched for k in find_kernels(sdist_tree)}
    assert found == {(DECODE, "tanh"): False, (DECODE, STAGE1): True, (DECODE, STAGE2): True}
    for key in ((DECODE, STAGE1), (DECODE, STAGE2)):
        assert KERNELS[key].scenarios, key


# -- triton 3.1.0: the pin ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm70", "sm75"])
def test_triton_310_fits_the_patched_tree(patched_trees, triton_310, arch, tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--src", str(patched_trees[arch]), "--arch", arch,
                           "--python", str(triton_310), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    compiled = [r for r in results if r["verdict"] != "not-run"]
    assert {r["kernel"] for r in compiled} == {STAGE1, STAGE2}
    assert len(compiled) == 4  # two kernels x two model shapes (128 and 16 heads)
    for r in compiled:
        assert r["verdict"] == "fits" and r["arch"] == arch and r["triton"] == "3.1.0", r
        assert r["limit"] == ARCHES[arch].shared_mem_per_block
        # the patched launch asks ktlegacy_runtime, which gives one stage below sm80
        assert r["num_stages"] == 1 and r["num_warps"] == 4, r
    assert {r["shared"] for r in compiled if r["kernel"] == STAGE1} == {MLA_STAGE1_BYTES}
    # the table names every launch with its bytes and limit
    assert re.search(rf"{STAGE1}\s+DeepSeek-V2-Lite\s+{arch}\s+3\.1\.0\s+4\s+1\s+52,224\s+"
                     rf"{ARCHES[arch].shared_mem_per_block:,}\s+fits", proc.stdout), proc.stdout


@pytest.mark.slow
def test_forced_large_tile_fails_with_bytes_needed_vs_limit(patched_trees, triton_310, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(patched_trees["sm75"], tree, symlinks=True)
    _set_block_n(tree, 64)
    # 64-wide K/V tiles: fits Volta's 96 KiB, not Turing's 64 KiB
    results = check_tree(tree, [ARCHES["sm70"], ARCHES["sm75"]], python=str(triton_310))
    stage1 = {(r.arch, r.scenario): r for r in results if r.kernel == STAGE1}
    needed = {r.shared for r in stage1.values()}
    assert len(needed) == 1 and 65_536 < needed.pop() <= 98_304, stage1
    assert all(r.verdict == "fits" for (arch, _), r in stage1.items() if arch == "sm70")
    assert all(r.verdict == "too-big" for (arch, _), r in stage1.items() if arch == "sm75")

    with pytest.raises(KtlegacyError) as err:
        run_check(tree, [ARCHES["sm75"]], python=str(triton_310), out=open("/dev/null", "w"))
    line = str(err.value)
    assert "\n" not in line and err.value.exit_code == 1
    assert re.search(rf"Triton kernel {STAGE1} \(.*\) needs [\d,]+ B of shared memory per block on sm75, "
                     r"over the 65,536 B limit", line), line


@pytest.mark.slow
def test_cli_fails_in_one_line_naming_kernel_arch_and_bytes(patched_trees, triton_310, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(patched_trees["sm70"], tree, symlinks=True)
    _set_block_n(tree, 128)  # too big for both arches
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "check-triton", "--src", str(tree),
                           "--arch", "sm70", "--python", str(triton_310)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert re.match(rf"error: Triton kernel {STAGE1} .* needs [\d,]+ B of shared memory per block on sm70, "
                    r"over the 98,304 B limit \(num_warps=4, num_stages=1, triton 3\.1\.0\)", errors[0]), errors[0]


# -- triton 3.2.0: aborts on sm70 -----------------------------------------------------------------

@pytest.mark.slow
def test_triton_320_abort_on_sm70_is_reported_not_fatal(patched_trees, triton_320, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--src", str(patched_trees["sm70"]), "--arch", "sm70",
                           "--python", str(triton_320)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: Triton kernel {STAGE1} ("), errors[0]
    assert "does not compile for sm70 with triton 3.2.0: LLVM ERROR: Failed to compute parent layout " \
           "for slice layout" in errors[0], errors[0]
    # the process died, yet every launch got a row: stage 2 still compiled after stage 1 aborted
    assert re.search(rf"{STAGE2}\s+DeepSeek-V3/R1/V2\s+sm70\s+3\.2\.0\s+4\s+1\s+\d", proc.stdout), proc.stdout


@pytest.mark.slow
def test_triton_320_still_fits_sm75(patched_trees, triton_320):
    results = check_tree(patched_trees["sm75"], [ARCHES["sm75"]], python=str(triton_320))
    assert all(r.verdict == "fits" for r in results), results
    assert {r.shared for r in results if r.kernel == STAGE1} == {MLA_STAGE1_BYTES}


# -- kernels the table does not know --------------------------------------------------------------

NEW_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def _ktlegacy_test_copy(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


def copy(x, y):
    _ktlegacy_test_copy[(1,)](x, y, BLOCK=128)
'''


@pytest.mark.slow
def test_an_unlisted_kernel_fails_the_check(sdist_tree, triton_310, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(sdist_tree, tree, symlinks=True)
    (tree / "ktransformers/operators/new_kernel.py").write_text(NEW_KERNEL)
    with pytest.raises(KtlegacyError) as err:
        run_check(tree, [ARCHES["sm75"]], python=str(triton_310), out=open("/dev/null", "w"))
    assert "Triton kernel _ktlegacy_test_copy (ktransformers/operators/new_kernel.py) has no launch scenario" \
        in str(err.value)


@pytest.mark.slow
def test_a_listed_scenario_compiles_any_kernel(sdist_tree, triton_310, tmp_path):
    """The scenario table is data: a new entry is all a new kernel needs."""
    tree = tmp_path / "tree"
    shutil.copytree(sdist_tree, tree, symlinks=True)
    (tree / "ktransformers/operators/new_kernel.py").write_text(NEW_KERNEL)
    vec = {"tensor": [128], "dtype": "float16"}
    kernels = dict(KERNELS)
    kernels[("ktransformers/operators/new_kernel.py", "_ktlegacy_test_copy")] = KernelSpec(
        (Scenario("copy", "copy", lambda dtype: ([vec, vec], {})),))
    results = check_tree(tree, [ARCHES["sm75"]], python=str(triton_310), kernels=kernels)
    new = [r for r in results if r.kernel == "_ktlegacy_test_copy"]
    assert len(new) == 1 and new[0].verdict == "fits" and new[0].shared == 0, new


UNUSED_PREFILL = '''
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(Q, Out, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(Q + offs))


def context_attention_fwd(q, o):
    _fwd_kernel[(1,)](q, o, BLOCK=64)
'''


@pytest.mark.slow
def test_a_kernel_listed_as_never_run_is_checked_for_callers(sdist_tree, triton_310, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(sdist_tree, tree, symlinks=True)
    (tree / PREFILL).write_text(UNUSED_PREFILL)
    results = check_tree(tree, [ARCHES["sm75"]], python=str(triton_310))
    prefill = [r for r in results if r.path == PREFILL]
    assert [r.verdict for r in prefill] == ["not-run"], prefill

    (tree / "ktransformers/operators/caller.py").write_text(
        "from ktransformers.operators.triton_attention_prefill import context_attention_fwd\n"
        "def f(q, o):\n    context_attention_fwd(q, o)\n")
    results = check_tree(tree, [ARCHES["sm75"]], python=str(triton_310))
    prefill = [r for r in results if r.path == PREFILL]
    assert [r.verdict for r in prefill] == ["unknown-kernel"], prefill
    assert "ktransformers/operators/caller.py" in prefill[0].detail


def test_no_triton_in_the_interpreter_is_one_line(sdist_tree, tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    with pytest.raises(KtlegacyError) as err:
        check_tree(sdist_tree, [ARCHES["sm75"]], python=str(tmp_path / "bare" / "bin" / "python"))
    assert "cannot import triton" in str(err.value) and "--python" in str(err.value)


def test_not_a_tree_is_one_line(tmp_path):
    with pytest.raises(KtlegacyError, match="is not a ktransformers tree"):
        check_tree(tmp_path, [ARCHES["sm75"]])
