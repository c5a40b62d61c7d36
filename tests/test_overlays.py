"""The overlays (overlays/*.py) on the real 0.2.1.post1 sdist.

Every overlay applies and leaves the tree in the state it promises (post-conditions checked on
the patched files, not on the overlay's own report); a second ``patch`` changes nothing;
``--check`` writes nothing; a drifted tree is refused with one line and left byte-identical;
every patched Python file compiles and imports only runtime functions that exist.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ktlegacy.core.arch import get_arch
from ktlegacy.core.facts import SM80_ONLY_OPS
from ktlegacy.core.overlay import MANIFEST_NAME, patch_tree

REPO = Path(__file__).resolve().parent.parent
OVERLAY_NAMES = ["runtime", "gguf-linear", "torch-linear-rules", "eager", "sdpa", "sdpa-kv-reuse", "last-token-logits",
                 "triton-stages", "fp16", "cpu-experts-dtype", "moe-partial-block", "gpu-expert-prefill", "task-queue-start",
                 "portable-cpu",
                 "server-api"]
NOT_FOR_SDIST = ["prefill-kv-length", "loopback-listeners", "serve-backend-guard", "optional-sched-ext", "cache-device-key"]  # later refs only
SM80_OPS = set(SM80_ONLY_OPS)   # the ops overlay 20 rewrites and ktlegacy.serving refuses
RULES = "ktransformers/optimize/optimize_rules"


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file under ``root`` (symlinks by target)."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link:" + os.readlink(path), 0)
        elif path.is_file():
            state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return state


def run_patch(src: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(src), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def patched(sdist_tree, tmp_path_factory) -> Path:
    """The sdist patched for sm75 once (in-process); tests only read it."""
    dest = tmp_path_factory.mktemp("patched") / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    patch_tree(dest, get_arch("sm75"), out=lambda line: None)
    return dest


def changed_files(pristine: Path, patched: Path) -> list[str]:
    before, after = tree_state(pristine), tree_state(patched)
    return sorted(rel for rel in after if before.get(rel) != after[rel])


# ---------------------------------------------------------------- the CLI, end to end

def test_patch_applies_every_overlay_then_second_run_is_a_no_op(pristine_tree):
    first = run_patch(pristine_tree, "--arch", "sm75")
    assert first.returncode == 0, first.stderr
    for name in OVERLAY_NAMES:
        assert re.search(rf"^{re.escape(name)}: changed \S+", first.stdout, re.M), (name, first.stdout)
    manifest = json.loads((pristine_tree / MANIFEST_NAME).read_text())
    assert manifest["overlays"] == OVERLAY_NAMES
    assert manifest["arch"] == "sm75" and manifest["ref"] == "0.2.1.post1"
    for name in NOT_FOR_SDIST:
        assert re.search(rf"^{re.escape(name)}: not for ref 0\.2\.1\.post1, skipped \(\S", first.stdout,
                         re.M), first.stdout
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["overlay_digest"])

    state = tree_state(pristine_tree)
    second = run_patch(pristine_tree, "--arch", "sm75")
    assert second.returncode == 0, second.stderr
    for name in OVERLAY_NAMES:
        assert f"{name}: already applied, nothing to change" in second.stdout
    assert "changed 0 files" in second.stdout
    assert tree_state(pristine_tree) == state


def test_check_reports_and_writes_nothing(pristine_tree):
    state = tree_state(pristine_tree)
    result = run_patch(pristine_tree, "--arch", "sm70", "--check")
    assert result.returncode == 0, result.stderr
    assert "sdpa: would change ktransformers/operators/attention.py" in result.stdout
    assert tree_state(pristine_tree) == state


def test_patch_for_another_arch_rewrites_only_runtime_and_manifest(pristine_tree):
    assert run_patch(pristine_tree, "--arch", "sm75").returncode == 0
    state = tree_state(pristine_tree)
    result = run_patch(pristine_tree, "--arch", "sm70")
    assert result.returncode == 0, result.stderr
    after = tree_state(pristine_tree)
    assert sorted(r for r in after if after[r] != state[r]) == [MANIFEST_NAME, "ktransformers/ktlegacy_runtime.py"]
    assert 'BUILD_ARCH = "sm70"' in (pristine_tree / "ktransformers/ktlegacy_runtime.py").read_text()


# ---------------------------------------------------------------- drift: refused, one line, untouched

def _edit(rel, old, new, count=1):
    def mutate(root: Path):
        path = root / rel
        text = path.read_bytes().decode()
        assert text.count(old) >= count, (rel, old)
        path.write_bytes(text.replace(old, new, count).encode())
    return mutate


def _add_flow_rule(root: Path):
    (root / RULES / "user-flow.yaml").write_text(
        "- match:\n    class: torch.nn.Linear\n  replace: {class: x, kwargs: {generate_op: KLinearMarlin}}\n")


def _remove(rel):
    return lambda root: (root / rel).unlink()


DRIFTS = {
    "runtime": ("ktransformers/__init__.py", _remove("ktransformers/__init__.py")),
    "torch-linear-rules": ("ktransformers/operators/experts.py",
                           _edit("ktransformers/operators/experts.py", '"KExpertsTorch": KExpertsTorch', '"KExpertsTorch": KExpertsTorch2')),
    "gguf-linear": ("ktransformers/operators/linear.py",
                    _edit("ktransformers/operators/linear.py", "LINEAR_MAP = {", "LINEAR_MAP = dict(")),
    "torch-linear-rules/user-rule": (f"{RULES}/user-flow.yaml", _add_flow_rule),
    "eager": ("ktransformers/local_chat.py",
              _edit("ktransformers/local_chat.py", '"flash_attention_2"', '"flash_attention_3"', count=3)),
    "sdpa": ("ktransformers/operators/attention.py",
             _edit("ktransformers/operators/attention.py", "if os.name == 'nt':", 'if os.name == "nt":')),
    "triton-stages": ("ktransformers/operators/triton_attention.py",
                      _edit("ktransformers/operators/triton_attention.py", "num_stages=2,", "num_stages=3,")),
    "fp16": ("ktransformers/server/backend/interfaces/ktransformers.py",
             _edit("ktransformers/server/backend/interfaces/ktransformers.py",
                   "torch.set_default_dtype(torch.bfloat16)", "torch.set_default_dtype(torch.float32)")),
    "portable-cpu": ("setup.py", _edit("setup.py", 'os.getenv("CPU_INSTRUCT", "NATIVE")', 'os.getenv("CPU_INSTRUCT", "AVX2")')),
    "server-api": ("ktransformers/server/api/__init__.py",
                   _edit("ktransformers/server/api/__init__.py", "router.include_router(ollama_router)",
                         "router.include_router(ollama_router, prefix='/ollama')")),
}


@pytest.mark.parametrize("case", sorted(DRIFTS))
def test_drift_is_refused_in_one_line_and_the_tree_is_untouched(pristine_tree, case):
    overlay = case.split("/")[0]
    rel, mutate = DRIFTS[case]
    mutate(pristine_tree)
    state = tree_state(pristine_tree)
    result = run_patch(pristine_tree, "--arch", "sm75", "--ref", "0.2.1.post1")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: overlay {overlay}: {rel}: expected "), lines[0]
    assert tree_state(pristine_tree) == state  # no file written, no temp file left


# ---------------------------------------------------------------- post-conditions on the patched sdist

def test_only_expected_files_change(sdist_tree, patched):
    changed = changed_files(sdist_tree, patched)
    non_rules = [r for r in changed if not r.startswith(RULES + "/")]
    assert non_rules == sorted([
        MANIFEST_NAME,
        "ktransformers/ktlegacy_runtime.py",
        "ktransformers/local_chat.py",
        "ktransformers/operators/attention.py",
        "ktransformers/operators/experts.py",  # cpu-experts-dtype
        "ktransformers/ktransformers_ext/operators/llamafile/moe.cpp",  # moe-partial-block
        "ktransformers/ktransformers_ext/cpu_backend/task_queue.cpp",   # task-queue-start
        "ktransformers/ktransformers_ext/cuda/ktlegacy_gguf/ktlegacy_gguf.cu",   # gguf-linear
        "ktransformers/ktransformers_ext/cuda/ktlegacy_gguf/ktlegacy_gguf.cuh",
        "ktransformers/operators/ktlegacy_gguf_linear.py",
        "ktransformers/models/modeling_deepseek.py",      # last-token-logits
        "ktransformers/models/modeling_deepseek_v3.py",
        "ktransformers/operators/linear.py",
        "ktransformers/operators/triton_attention.py",
        "ktransformers/server/backend/interfaces/ktransformers.py",
        "ktransformers/server/api/ktlegacy_api.py",           # server-api
        "ktransformers/server/api/__init__.py",
        "ktransformers/server/api/openai/__init__.py",
        "ktransformers/server/main.py",
        "ktransformers/server/args.py",                        # server-api: type=bool flags
        "ktransformers/util/custom_gguf.py",                   # server-api: load progress
        "ktransformers/server/backend/interfaces/transformers.py",
        "setup.py",
    ])


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (("key", k),))
        if not node:
            yield path, {}
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (("idx", i),))
        if not node:
            yield path, []
    else:
        yield path, node


def test_rules_lose_every_sm80_op_and_nothing_else(sdist_tree, patched):
    """Every op value is replaced by the op ktlegacy.core.gpu_linear.PATCHED_OP names (the GPU linears
    KLinearGGUF, KExpertsMarlin KExpertsTorch), lm_head's rule goes in front where a file left it a
    GPU nn.Linear, and nothing else changes: same keys and values, same lines and comments."""
    from ktlegacy.core.gpu_linear import PATCHED_OP, lm_head_devices
    files = sorted(p.relative_to(sdist_tree) for p in (sdist_tree / RULES).rglob("*.yaml"))
    assert len(files) >= 10
    replaced = active = heads = 0
    for rel in files:
        before_text = (sdist_tree / rel).read_text()
        after_text = (patched / rel).read_text()
        active += sum(1 for line in before_text.splitlines() if not line.lstrip().startswith("#")
                      and re.search("|".join(PATCHED_OP), line))
        before_rules = yaml.safe_load(before_text)
        head = lm_head_devices(before_rules) is not None
        after_rules = yaml.safe_load(after_text)
        if head:  # the lm_head rule, then the file as it was
            heads += 1
            assert after_rules[0]["match"] == {"name": "^lm_head$", "class": "torch.nn.Linear"}, rel
            after_rules = after_rules[1:]
        before, after = dict(_leaves(before_rules)), dict(_leaves(after_rules))
        assert before.keys() == after.keys(), rel
        for path, value in before.items():
            if value in PATCHED_OP:
                assert after[path] == PATCHED_OP[value], (rel, path)
                replaced += 1
            else:
                assert after[path] == value, (rel, path)
        assert not SM80_OPS & {v for v in after.values() if isinstance(v, str)}, rel
        # Layout and comments: same lines, and a changed line differs only in the op name.
        b_lines, a_lines = before_text.splitlines(), after_text.splitlines()
        if head:
            a_lines = a_lines[len(a_lines) - len(b_lines):]
        assert len(b_lines) == len(a_lines), rel
        for b, a in zip(b_lines, a_lines):
            if b != a:
                assert re.sub(r"KLinearMarlin|VLinearMarlin|KLinearFP8|KLinearTorch", "KLinearGGUF",
                              b.replace("KExpertsMarlin", "KExpertsTorch")) == a, (rel, b, a)
                assert not b.lstrip().startswith("#"), (rel, b)
    assert replaced == active > 0  # every uncommented op line of the sdist was one value we replaced
    assert heads >= 10  # every DeepSeek file leaves lm_head a default nn.Linear at this ref


def test_linear_default_op_is_gguf(patched):
    text = (patched / "ktransformers/operators/linear.py").read_text()
    assert 'generate_op: str| None = "KLinearGGUF"' in text
    assert not re.search(r'_op\s*:\s*str\s*\|\s*None\s*=\s*"KLinear(Marlin|Torch)"', text)


def test_no_flash_attention_2_is_requested(patched):
    for rel in ("ktransformers/local_chat.py", "ktransformers/server/backend/interfaces/ktransformers.py"):
        text = (patched / rel).read_text()
        assert not re.search(r"""(?<![=!<>])=\s*["']flash_attention_2["']""", text), rel
    assert 'attn_implementation="eager"' in (patched / "ktransformers/local_chat.py").read_text()


def test_prefill_calls_sdpa_and_flash_attn_is_optional(patched):
    text = (patched / "ktransformers/operators/attention.py").read_text()
    assert not re.search(r"(?<![\w.])flash_attn_func\(", text)
    assert text.count("ktlegacy_runtime.sdpa_prefill(") == 2
    tree = ast.parse(text)
    for node in tree.body:  # the flash_attn import may only sit inside try/except ImportError
        assert not (isinstance(node, ast.ImportFrom) and node.module == "flash_attn")
    assert "if os.name == 'nt' or ktlegacy_runtime.prefill_path() == \"windows\":" in text
    assert "if flashinfer_enabled and not ktlegacy_runtime.is_legacy():" in text


def test_triton_decode_stages_come_from_the_runtime(patched):
    text = (patched / "ktransformers/operators/triton_attention.py").read_text()
    assert "num_stages=2" not in text
    assert text.count("num_stages=ktlegacy_runtime.triton_decode_num_stages(),") == 2
    assert b"\r\n" in (patched / "ktransformers/operators/triton_attention.py").read_bytes()  # CRLF kept


def test_no_hard_coded_bf16_default_dtype(patched):
    for path in (patched / "ktransformers").rglob("*.py"):
        if "ktransformers/tests/" in path.as_posix():  # upstream's GPU dev scripts, not shipped code paths
            continue
        text = path.read_text()
        assert not re.search(r"set_default_dtype\(\s*(torch\.bfloat16|config\.torch_dtype)\s*\)", text), path
    assert "set_default_dtype(ktlegacy_runtime.default_dtype(config.torch_dtype))" in \
        (patched / "ktransformers/local_chat.py").read_text()
    assert "set_default_dtype(ktlegacy_runtime.default_dtype())" in \
        (patched / "ktransformers/server/backend/interfaces/ktransformers.py").read_text()


def test_patched_python_compiles_and_uses_existing_runtime_functions(sdist_tree, patched, tmp_path):
    runtime_src = (patched / "ktransformers/ktlegacy_runtime.py").read_text()
    runtime_names = {n.name for n in ast.parse(runtime_src).body if isinstance(n, ast.FunctionDef)}
    runtime_names |= {t.id for n in ast.parse(runtime_src).body if isinstance(n, ast.Assign)
                      for t in n.targets if isinstance(t, ast.Name)}
    py = [r for r in changed_files(sdist_tree, patched) if r.endswith(".py")]
    assert "ktransformers/operators/attention.py" in py
    for rel in py:
        py_compile.compile(str(patched / rel), cfile=str(tmp_path / "x.pyc"), doraise=True)
        tree = ast.parse((patched / rel).read_text())
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "ktlegacy_runtime"}
        if used and rel != "ktransformers/ktlegacy_runtime.py":
            assert used <= runtime_names, (rel, used - runtime_names)
            top_imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "ktransformers"
                           and any(a.name == "ktlegacy_runtime" for a in n.names)]
            assert top_imports, f"{rel} uses ktlegacy_runtime without importing it at module level"


def test_cpu_instruct_is_validated(patched, monkeypatch):
    """Run the patched setup.py's CpuInstructInfo class on its own, under several CPU_INSTRUCT values."""
    tree = ast.parse((patched / "setup.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CpuInstructInfo")
    code = compile(ast.Module(body=[cls], type_ignores=[]), "setup.py", "exec")

    def info(value):
        if value is None:
            monkeypatch.delenv("CPU_INSTRUCT", raising=False)
        else:
            monkeypatch.setenv("CPU_INSTRUCT", value)
        ns = {"os": os}
        exec(code, ns)
        return ns["CpuInstructInfo"]

    assert info(" avx2 ").CPU_INSTRUCT == "AVX2"
    assert info("AVX2").CMAKE_AVX2.split() == ["-DLLAMA_NATIVE=OFF", "-DLLAMA_FMA=ON", "-DLLAMA_F16C=ON",
                                               "-DLLAMA_AVX=ON", "-DLLAMA_AVX2=ON"]
    assert info(None).CPU_INSTRUCT == "NATIVE"  # upstream's default for a local build stays
    with pytest.raises(ValueError, match="CPU_INSTRUCT='AVX-2'"):  # upstream: silently NATIVE
        info("avx-2")
