"""portable-cpu on the real sdist: a build that asks for AVX2 gets AVX2 flags and nothing of the host.

The patched tree's C++ extension (ktransformers/ktransformers_ext, with the bundled llama.cpp
and pybind11) is configured with cmake exactly as the patched setup.py would for each
CPU_INSTRUCT value (its CpuInstructInfo.CMAKE_* strings, read from the file), and the compile
commands CMake generates are inspected. No compiler runs. Two stand-ins make configuring
possible on a machine without CUDA and independent of its CPU:

* a FindCUDA.cmake that only reports a CUDA include directory (the extension's C++ code
  needs nothing else at configure time);
* an ``lscpu`` first on PATH that claims AVX512 and AMX, so a host probe leaking into the
  build would show (upstream v0.3.x probes lscpu; the sdist must not start to).

The NATIVE configuration is the control: it must show -march=native, proving the inspection
sees host-derived flags when they are there. The same inspection checks ktlegacy/core/facts.py's
CPU_FLAGS (what the doctor and the in-image smoke require of a CPU) against the flags each set
really compiles with.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ktlegacy.core.arch import get_arch
from ktlegacy.core.facts import CPU_FLAGS
from ktlegacy.core.overlay import patch_tree

EXT = "ktransformers/ktransformers_ext"


@pytest.fixture(scope="module")
def tree(sdist_tree, tmp_path_factory) -> Path:
    if not shutil.which("cmake") or not shutil.which("make") or not shutil.which("g++"):
        pytest.fail("cmake, make and g++ are needed (tests/host-setup installs them)")
    dest = tmp_path_factory.mktemp("portable") / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    patch_tree(dest, get_arch("sm75"), out=lambda line: None)
    return dest


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stand-ins")
    (root / "cmake").mkdir()
    (root / "cmake" / "FindCUDA.cmake").write_text(
        'set(CUDA_FOUND TRUE)\nset(CUDA_INCLUDE_DIRS "${CMAKE_CURRENT_LIST_DIR}/cuda-include")\n')
    (root / "bin").mkdir()
    lscpu = root / "bin" / "lscpu"
    lscpu.write_text("#!/bin/sh\necho 'Flags: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl amx_tile amx_int8'\n")
    lscpu.chmod(0o755)
    return root / "cmake", root / "bin"


def cmake_cpu_args(tree: Path, instruct: str) -> list[str]:
    """The LLAMA_* arguments the patched setup.py passes for ``instruct``."""
    module = ast.parse((tree / "setup.py").read_text())
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "CpuInstructInfo")
    ns = {"os": os}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), "setup.py", "exec"), ns)
    info = ns["CpuInstructInfo"]
    return getattr(info, "CMAKE_" + instruct).split()


def configure(tree: Path, stand_ins, instruct: str, build: Path) -> list[str]:
    """Every flag of every compile command for the extension configured for ``instruct``."""
    find_cuda, fake_bin = stand_ins
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cmd = ["cmake", "-S", str(tree / EXT), "-B", str(build), "-G", "Unix Makefiles",
           f"-DCMAKE_MODULE_PATH={find_cuda}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
           f"-DPYTHON_EXECUTABLE={shutil.which('python3')}", *cmake_cpu_args(tree, instruct)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = json.loads((build / "compile_commands.json").read_text())
    assert len(commands) > 20  # the extension, llamafile and llama.cpp/ggml sources
    return [flag for entry in commands for flag in entry["command"].split()]


def test_avx2_build_has_avx2_and_nothing_from_the_host(tree, stand_ins, tmp_path):
    flags = configure(tree, stand_ins, "AVX2", tmp_path / "build")
    assert "-mavx2" in flags and "-mfma" in flags and "-mf16c" in flags
    leaked = sorted({f for f in flags if f.startswith(("-march", "-mtune", "-mcpu", "-mavx512", "-mamx"))
                     or "__HAS_AMX__" in f or "__HAS_AVX512" in f or f.startswith("-D__AVX512")})
    assert leaked == []


def test_avx512_build_asks_for_avx512(tree, stand_ins, tmp_path):
    flags = configure(tree, stand_ins, "AVX512", tmp_path / "build")
    assert "-mavx512f" in flags and "-march=native" not in flags


def test_native_build_is_the_control(tree, stand_ins, tmp_path):
    flags = configure(tree, stand_ins, "NATIVE", tmp_path / "build")
    assert "-march=native" in flags


@pytest.mark.parametrize("instruct", list(CPU_FLAGS))
def test_cpu_flags_table_is_what_the_build_compiles_for(tree, stand_ins, tmp_path, instruct):
    """Each set's CPU flags in ktlegacy/core/facts.py are its compile flags, -m<flag> (without "_"),
    no more and no fewer: a CPU with those flags runs the code, one lacking any of them may not."""
    flags = configure(tree, stand_ins, instruct, tmp_path / "build")
    isa = {f for f in flags if re.fullmatch(r"-m(avx\w*|fma\w*|f16c|amx\w*|sse\w*|bmi\w*)|-march=\S+", f)}
    assert isa == {"-m" + flag.replace("_", "") for flag in CPU_FLAGS[instruct]}
