"""gguf-linear: GPU linear layers that keep their GGUF blocks below sm80 (KLinearGGUF).

Below sm80 upstream's GPU linears are KLinearTorch, which dequantizes each GGUF weight to fp16 at
load; DeepSeek-V3/R1's non-expert weights then need ~30 GiB of VRAM instead of the ~9 GiB of their
blocks, more than one V100 or two 11 GB cards hold. This overlay adds our own operator and kernels
(``overlays/gguf_linear/``, written by ktlegacy from the public GGUF block layouts):

* ``ktransformers/operators/ktlegacy_gguf_linear.py``: ``KLinearGGUF`` (a KLinearTorch subclass:
  every tensor or setting it does not handle takes KLinearTorch's path), with the defaults of
  ``ktlegacy/core/facts.py`` (``GPU_LINEAR*``) written in;
* ``<cuda dir>/ktlegacy_gguf/ktlegacy_gguf.cu`` + ``.cuh``: the fused dequant-matvec (decode) and
  the dequantize-into-scratch kernel (prefill) for Q4_0, Q5_0, Q8_0, Q2_K-Q6_K and IQ4_XS, built by
  ``setup.py`` as the extension ``ktlegacy_gguf_ops`` next to KTransformersOps (the image's compile
  stage compiles it with the arch's TORCH_CUDA_ARCH_LIST; the arch check covers it);
* ``linear.py``'s ``LINEAR_MAP`` gains ``"KLinearGGUF"`` (linear.py imports the operator module
  right after the map, and the module registers itself there), which the rule overlay
  (``torch-linear-rules``) then names where the rules had Marlin, FP8 or KLinearTorch.

The CUDA sources sit beside upstream's ``custom_gguf/dequant.cu``: ``ktransformers/ktransformers_ext/cuda``
in the sdist, ``csrc/ktransformers_ext/cuda`` at the git refs; setup.py's ``ext_modules`` gets the
extension right after ``cpuinfer_ext`` in the list that builds KTransformersOps (the same lines at
every ref; from v0.3.1 the XPU and NPU branches have lists of their own, left alone).
"""

import re
from pathlib import Path

from ktlegacy.core import facts
from ktlegacy.core.gpu_linear import GPU_LINEAR_OP
from ktlegacy.core.overlay import Overlay

HERE = Path(__file__).resolve().parent / "gguf_linear"
OPERATOR_SOURCE = HERE / "ktlegacy_gguf_linear.py"
CUDA_SOURCES = (HERE / "ktlegacy_gguf.cu", HERE / "ktlegacy_gguf.cuh")
OPERATOR = "ktransformers/operators/ktlegacy_gguf_linear.py"
LINEAR = "ktransformers/operators/linear.py"
SETUP = "setup.py"
CUDA_DIRS = ("ktransformers/ktransformers_ext/cuda", "csrc/ktransformers_ext/cuda")  # sdist, git refs
EXTENSION = "ktlegacy_gguf_ops"
PLACEHOLDERS = {
    "@KTLEGACY_GPU_LINEAR_DEFAULT@": facts.GPU_LINEAR,
    "@KTLEGACY_GPU_LINEAR_MATVEC_MAX_ROWS@": str(facts.GPU_LINEAR_MATVEC_MAX_ROWS),
    "@KTLEGACY_GPU_LINEAR_SCRATCH_MIB@": str(facts.GPU_LINEAR_SCRATCH_MIB),
}
# the cpuinfer_ext entry of the CUDA build's ext_modules: the one followed by KTransformersOps
# (the sdist's inline CUDAExtension, the git refs' `ops_module`); the XPU/NPU lists have none
CPUINFER_ENTRY = re.compile(r'^(?P<indent>[ \t]+)CMakeExtension\("cpuinfer_ext"[^\n]*\),\n'
                            r"(?=(?P=indent)(?:ops_module,|CUDAExtension\('KTransformersOps'))", re.M)
# LINEAR_MAP gains the op by importing the operator module right after the map: the module
# registers itself (so importing either module first works: no import cycle can leave it out)
MAP_BLOCK = re.compile(r"^LINEAR_MAP = \{\n(?:[ \t]+[^\n]*\n)*\}\n", re.M)
REGISTER_LINE = f"import ktransformers.operators.ktlegacy_gguf_linear  # ktlegacy: registers {GPU_LINEAR_OP} in LINEAR_MAP\n"


class GgufLinearOverlay(Overlay):
    name = "gguf-linear"
    summary = "KLinearGGUF: GPU linears computed from their GGUF blocks (no fp16 copy) + its CUDA kernels"

    def shipped_files(self):
        return [OPERATOR_SOURCE, *CUDA_SOURCES]

    def apply(self, tree, ctx):
        cuda_dir = next((d for d in CUDA_DIRS if tree.exists(f"{d}/custom_gguf/dequant.cu")), None)
        if cuda_dir is None:
            raise tree.drift(f"{CUDA_DIRS[0]}/custom_gguf/dequant.cu",
                             f"upstream's CUDA extension sources in one of {', '.join(CUDA_DIRS)}")
        source = f"{cuda_dir}/ktlegacy_gguf/ktlegacy_gguf.cu"
        setup = tree.read(SETUP)
        if f"'{cuda_dir}/custom_gguf/dequant.cu'" not in setup:
            raise tree.drift(SETUP, f"KTransformersOps built from '{cuda_dir}/custom_gguf/dequant.cu'")
        entry = (f"{{indent}}CUDAExtension('{EXTENSION}', ['{source}'],  # ktlegacy: KLinearGGUF's kernels\n"
                 f"{{indent}}              extra_compile_args={{{{'cxx': ['-O3'], 'nvcc': ['-O3', '-Xcompiler', '-fPIC']}}}}),\n")
        if f"CUDAExtension('{EXTENSION}'" not in setup:
            found = list(CPUINFER_ENTRY.finditer(setup))
            if len(found) != 1:
                raise tree.drift(SETUP, f'one ext_modules entry CMakeExtension("cpuinfer_ext"...) followed by KTransformersOps, found {len(found)}')
            m = found[0]
            setup = setup[:m.end()] + entry.format(indent=m["indent"]) + setup[m.end():]
            tree.write(SETUP, setup, f"ext_modules: + CUDAExtension {EXTENSION} ({source})")

        for path in CUDA_SOURCES:
            text = path.read_text(encoding="utf-8")
            tree.write(f"{cuda_dir}/ktlegacy_gguf/{path.name}", text, f"KLinearGGUF's kernels ({len(text.splitlines())} lines)")

        text = OPERATOR_SOURCE.read_text(encoding="utf-8")
        for placeholder, value in PLACEHOLDERS.items():
            if text.count(placeholder) != 1:
                raise RuntimeError(f"{OPERATOR_SOURCE}: expected one {placeholder}")
            text = text.replace(placeholder, value)
        tree.write(OPERATOR, text, f"KLinearGGUF ({len(text.splitlines())} lines)")

        linear = tree.read(LINEAR)
        if not re.search(r"^class KLinearTorch\(KLinearBase\):", linear, re.M):
            raise tree.drift(LINEAR, "class KLinearTorch(KLinearBase) (KLinearGGUF's base)")
        if f"class {GPU_LINEAR_OP}(" not in text or f"LINEAR_MAP[{GPU_LINEAR_OP}.__name__]" not in text:
            raise RuntimeError(f"{OPERATOR_SOURCE} does not define and register {GPU_LINEAR_OP}")
        if REGISTER_LINE not in linear:
            found = list(MAP_BLOCK.finditer(linear))
            if len(found) != 1:
                raise tree.drift(LINEAR, f"one LINEAR_MAP = {{...}} block, found {len(found)}")
            end = found[0].end()
            tree.write(LINEAR, linear[:end] + REGISTER_LINE + linear[end:], f'LINEAR_MAP: + "{GPU_LINEAR_OP}" (imported after the map)')


OVERLAY = GgufLinearOverlay()
