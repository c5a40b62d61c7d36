"""images/scripts/check_cuda_arch.py on real cubins, built on this host (no GPU needed).

The toolchain comes from PyPI into a cached venv (tests/cached_venv.py):
  * CUDA 11.8's ptxas (``nvidia-cuda-nvcc-cu11==11.8.89``: the wheel holds ptxas and libnvvm,
    not the nvcc driver) assembles a small PTX kernel into real sm_70 and sm_75 cubins;
  * CUDA 13.0's ``fatbinary`` packs them, and gcc links the fatbin into a shared object with
    the sections nvcc gives a CUDA extension (``.nv_fatbin`` + the ``.nvFatBinSegment``
    wrapper), which is where cuobjdump looks;
  * CUDA 13.0's nvcc (``nvidia-cuda-nvcc==13.0.88`` + runtime/crt/nvvm/cccl) builds a .cu
    extension for sm_75 (SASS, and SASS+PTX) the ordinary way, as a cross-check
    (CUDA 13 cannot target sm_70 any more);
  * ``nvidia-cuda-cuobjdump`` provides cuobjdump.
These run on the host, not in a container: the stand-in base has no gcc, and a package
install inside it would go through the TLS proxy for no gain in what is being tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cached_venv import cached_venv, site_packages

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "images" / "scripts" / "check_cuda_arch.py"

CUDA_TOOLS = [
    "nvidia-cuda-nvcc-cu11==11.8.89",   # ptxas 11.8: the CUDA of the images
    "nvidia-cuda-nvcc==13.0.88",        # fatbinary, nvcc 13.0
    "nvidia-cuda-runtime==13.0.96",     # nvcc 13.0's headers and cudart
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-cuobjdump==13.2.51",
]

# y = a*x + y; PTX ISA 7.0, which ptxas 11.8 reads, assembled for each arch below.
AXPY_PTX = """\
.version 7.0
.target sm_70
.address_size 64

.visible .entry ktlegacy_axpy(.param .f32 a, .param .u64 x, .param .u64 y, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .f32 %f<5>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<8>;

    ld.param.f32 %f1, [a];
    ld.param.u64 %rd1, [x];
    ld.param.u64 %rd2, [y];
    ld.param.u32 %r2, [n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.s32 %p1, %r1, %r2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd3, %rd2;
    cvta.to.global.u64 %rd4, %rd1;
    mul.wide.s32 %rd5, %r1, 4;
    add.s64 %rd6, %rd4, %rd5;
    ld.global.f32 %f2, [%rd6];
    add.s64 %rd7, %rd3, %rd5;
    ld.global.f32 %f3, [%rd7];
    fma.rn.f32 %f4, %f2, %f1, %f3;
    st.global.f32 [%rd7], %f4;
DONE:
    ret;
}
"""

# The host side nvcc emits for a CUDA extension: the fatbin in .nv_fatbin and the wrapper
# {magic, version, data, filename} that __cudaRegisterFatBinary receives in .nvFatBinSegment.
EMBED_S = """\
    .section .nv_fatbin, "a"
    .balign 8
fatbin_data:
    .incbin FATBIN
    .section .nvFatBinSegment, "aw"
    .balign 8
    .long 0x466243b1
    .long 1
    .quad fatbin_data
    .quad 0
    .section .note.GNU-stack,"",@progbits
"""

AXPY_CU = """\
extern "C" __global__ void ktlegacy_axpy(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
void ktlegacy_launch(float a, const float* x, float* y, int n) {
  ktlegacy_axpy<<<(n + 255) / 256, 256>>>(a, x, y, n);
}
"""

HOST_C = "int ktlegacy_host_only(int x) { return 2 * x; }\n"


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def cuda_tools() -> dict:
    python = cached_venv("cuda-tools", CUDA_TOOLS)
    sp = site_packages(python)
    tools = {
        "ptxas": sp / "nvidia" / "cuda_nvcc" / "bin" / "ptxas",
        "fatbinary": sp / "nvidia" / "cu13" / "bin" / "fatbinary",
        "nvcc": sp / "nvidia" / "cu13" / "bin" / "nvcc",
        "cuobjdump": sp / "nvidia" / "cu13" / "bin" / "cuobjdump",
        "cu13": sp / "nvidia" / "cu13",
    }
    for name, path in tools.items():
        assert path.exists(), f"{name}: {path} missing from {CUDA_TOOLS}"
    assert "release 11.8" in _run([tools["ptxas"], "--version"]).stdout
    return tools


@pytest.fixture(scope="session")
def extensions(cuda_tools, tmp_path_factory) -> dict:
    """Shared objects with real device code: name -> path."""
    d = tmp_path_factory.mktemp("cuda-ext")
    (d / "axpy.ptx").write_text(AXPY_PTX)
    (d / "embed.S").write_text(EMBED_S)
    out = {}
    for sm in ("70", "75"):
        _run([cuda_tools["ptxas"], f"-arch=sm_{sm}", d / "axpy.ptx", "-o", d / f"axpy{sm}.cubin"])
        _run([cuda_tools["fatbinary"], f"--create={d}/axpy{sm}.fatbin", "-64",
              f"--image3=kind=elf,sm={sm},file={d}/axpy{sm}.cubin"])
        so = d / f"sm{sm}" / "KTransformersOps.cpython-311-x86_64-linux-gnu.so"
        so.parent.mkdir()
        _run(["gcc", "-shared", "-fPIC", f'-DFATBIN="{d}/axpy{sm}.fatbin"', d / "embed.S", "-o", so])
        out[f"ptxas118-sm{sm}"] = so
    (d / "host.c").write_text(HOST_C)
    host = d / "host" / "cpuinfer_ext.cpython-311-x86_64-linux-gnu.so"
    host.parent.mkdir()
    _run(["gcc", "-shared", "-fPIC", d / "host.c", "-o", host])
    out["host"] = host
    # nvcc 13.0, the ordinary way, for sm_75 only
    (d / "axpy.cu").write_text(AXPY_CU)
    cu13 = cuda_tools["cu13"]
    for name, code in (("nvcc13-sm75", "sm_75"), ("nvcc13-sm75ptx", "[sm_75,compute_75]")):
        so = d / name / "KTransformersOps.cpython-311-x86_64-linux-gnu.so"
        so.parent.mkdir()
        _run([cuda_tools["nvcc"], "-shared", "-Xcompiler", "-fPIC", "-gencode", f"arch=compute_75,code={code}",
              f"-I{cu13}/include", f"-L{cu13}/lib", d / "axpy.cu", "-o", so])
        out[name] = so
    return out


def check(cuda_tools, *args):
    env = dict(os.environ, CUOBJDUMP=str(cuda_tools["cuobjdump"]))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def one_error(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.slow
def test_sm70_cubin_from_cuda_118_passes_sm70(cuda_tools, extensions):
    proc = check(cuda_tools, "--arch", "sm70", extensions["ptxas118-sm70"], extensions["host"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"KTransformersOps\S+\s+SASS sm_70\s+pass", proc.stdout), proc.stdout
    assert re.search(r"cpuinfer_ext\S+\s+none \(host-only\)\s+host-only", proc.stdout), proc.stdout


@pytest.mark.slow
def test_sm70_cubin_fails_sm75_naming_file_and_fix(cuda_tools, extensions):
    line = one_error(check(cuda_tools, "--arch", "sm75", extensions["ptxas118-sm70"]))
    assert line == ("error: KTransformersOps.cpython-311-x86_64-linux-gnu.so holds sm_70 only; "
                    "expected sm_75: rebuild with TORCH_CUDA_ARCH_LIST=7.5")


@pytest.mark.slow
def test_sm75_cubin_from_cuda_118_passes_sm75_and_fails_sm70(cuda_tools, extensions):
    assert check(cuda_tools, "--arch", "sm75", extensions["ptxas118-sm75"]).returncode == 0
    line = one_error(check(cuda_tools, "--arch", "sm70", extensions["ptxas118-sm75"]))
    assert "holds sm_75 only; expected sm_70: rebuild with TORCH_CUDA_ARCH_LIST=7.0" in line


@pytest.mark.slow
def test_directory_and_json(cuda_tools, extensions, tmp_path):
    both = extensions["ptxas118-sm75"].parent.parent
    out = tmp_path / "arch.json"
    proc = check(cuda_tools, "--arch", "sm75", "--json", out, both / "sm75", both / "host")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = {Path(f["file"]).name.split(".")[0]: f for f in json.loads(out.read_text())["files"]}
    assert files["KTransformersOps"]["elf"] == ["sm_75"] and files["KTransformersOps"]["verdict"] == "pass"
    assert files["cpuinfer_ext"]["verdict"] == "host-only"


@pytest.mark.slow
def test_wheel_is_unpacked_and_checked(cuda_tools, extensions, tmp_path):
    import zipfile
    whl = tmp_path / "ktransformers-0.2.1.post1-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(extensions["ptxas118-sm70"], "KTransformersOps.cpython-311-x86_64-linux-gnu.so")
        z.write(extensions["host"], "cpuinfer_ext.cpython-311-x86_64-linux-gnu.so")
    assert check(cuda_tools, "--arch", "sm70", whl).returncode == 0
    line = one_error(check(cuda_tools, "--arch", "sm75", whl))
    assert f"{whl.name}:KTransformersOps.cpython-311-x86_64-linux-gnu.so holds sm_70 only" in line


@pytest.mark.slow
def test_extension_without_device_code_fails(cuda_tools, extensions, tmp_path):
    fake = tmp_path / "KTransformersOps.cpython-311-x86_64-linux-gnu.so"
    fake.write_bytes(extensions["host"].read_bytes())
    line = one_error(check(cuda_tools, "--arch", "sm75", fake, extensions["ptxas118-sm75"].parent.parent / "host"))
    assert "KTransformersOps.cpython-311-x86_64-linux-gnu.so holds no device code; expected sm_75" in line
    # host-only files alone: nothing was built for the GPU at all
    line = one_error(check(cuda_tools, "--arch", "sm75", extensions["host"]))
    assert "no CUDA extension was built for sm_75" in line


@pytest.mark.slow
def test_nvcc13_cross_check_and_expect_ptx(cuda_tools, extensions):
    sass_only, with_ptx = extensions["nvcc13-sm75"], extensions["nvcc13-sm75ptx"]
    assert check(cuda_tools, "--arch", "sm75", sass_only).returncode == 0
    proc = check(cuda_tools, "--arch", "sm75", "--expect-ptx", with_ptx)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SASS sm_75 + PTX compute_75" in proc.stdout
    line = one_error(check(cuda_tools, "--arch", "sm75", "--expect-ptx", sass_only))
    assert "holds no compute_75 PTX" in line and "TORCH_CUDA_ARCH_LIST=7.5+PTX" in line
    line = one_error(check(cuda_tools, "--arch", "sm70", with_ptx))
    assert "holds sm_75 (+PTX compute_75) only; expected sm_70" in line


def test_bad_usage_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "sm86", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown arch 'sm86'" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "sm75", "--cuobjdump", str(tmp_path / "nope"),
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not an executable file" in proc.stderr

