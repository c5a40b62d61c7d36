"""Compile ktransformers' C++/CUDA extensions for one GPU arch, then prove they target it.

The image's compile stage runs this, and so can a GPU machine without Docker:

    python images/scripts/compile_extensions.py --src TREE --out DIR --arch sm75 [--cpu-instruct AVX2] [--jobs 8] [--ptx]

TREE is a patched upstream tree (or its C++ side: setup.py, pyproject.toml, README.md, LICENSE,
ktransformers/__init__.py, ktransformers/ktransformers_ext/, third_party/). Upstream's own
``setup.py build_ext`` does the work, so the overlays' fixes to it (portable CPU flags) apply;
TORCH_CUDA_ARCH_LIST is set to exactly the requested arch. The built ``*.so`` land in DIR with
``ktlegacy-extensions.json`` (files, hashes, which hold device code). Every built .so
is then checked by ``check_cuda_arch.py`` (cuobjdump --list-elf): a CUDA extension without
SASS for the arch, or without any device code, fails the build by name.

``--allow-torch-cuda-major-mismatch`` is for CI only (tests/test_cuda118_compile.py): PyPI's torch
2.5.1 is a CUDA 12.4 build and the +cu118 one is out of CI's reach, so CI compiles against 2.5.1's
headers with nvcc 11.8 and tells torch's extension builder to compare nvcc with itself; the
host-compiler bounds of CUDA 11.8 are still enforced. Such extensions never ship: the image build
refuses the flag for any target after ``kernels`` (ktlegacy/build.py).

``--mode skip`` is for the no-CUDA stand-in base of the tests only: nothing is compiled and
the JSON says so, so the image's labels and smoke tests can say so too.
Uses only the standard library plus the torch/setuptools of the interpreter running it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

from check_cuda_arch import FACTS as _FACTS  # noqa: E402  beside this script; it loads ktlegacy/core/facts.py
# arch -> TORCH_CUDA_ARCH_LIST (one arch per image: SASS only, no PTX for other GPUs to JIT), and the CPU sets
ARCH_LISTS = {name: arch.torch_cuda_arch_list for name, arch in _FACTS.ARCHES.items()}
CPU_INSTRUCTS = _FACTS.CPU_INSTRUCTS
DEFAULT_CPU_INSTRUCT = _FACTS.DEFAULT_CPU_INSTRUCT
RECORD = "ktlegacy-extensions.json"


class BuildError(Exception):
    pass


def has_device_code(path: Path) -> bool:
    """True when the ELF file has a ``.nv_fatbin`` section (embedded cubins/PTX)."""
    with open(path, "rb") as fh:
        ident = fh.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit ELF only
            return False
        endian = "<" if ident[5] == 1 else ">"
        shoff, = struct.unpack_from(endian + "Q", ident, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", ident, 0x3A)
        if not shoff or not shnum:
            return False
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        sections = [struct.unpack_from(endian + "IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, str_off, str_size = sections[shstrndx]
        fh.seek(str_off)
        names = fh.read(str_size)
    for name_off, *_ in sections:
        end = names.find(b"\0", name_off)
        if names[name_off:end] == b".nv_fatbin":
            return True
    return False


def find_nvcc() -> str:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and Path(candidate, "bin", "nvcc").is_file():
            return str(Path(candidate, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    raise BuildError("no nvcc found (CUDA_HOME, /usr/local/cuda, PATH): compiling the extensions needs "
                     "the CUDA toolkit (the devel base image has it); only the no-CUDA stand-in uses --mode skip")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".cu", ".cuh", ".cmake", ".txt", ".in")


def source_digest(src: Path) -> str:
    """sha256 over the paths and contents of what the compile reads from the tree: setup.py and every
    C/C++/CUDA/CMake file (an overlay that edits C++ changes it; a Python-only overlay does not)."""
    h = hashlib.sha256()
    files = [p for p in Path(src).rglob("*") if p.is_file() and not p.is_symlink()
             and (p.suffix in SOURCE_SUFFIXES and (p.suffix != ".txt" or p.name == "CMakeLists.txt")
                  or p.relative_to(src).as_posix() == "setup.py")
             and not {".git", "build", "__pycache__"} & set(p.relative_to(src).parts)]
    for path in sorted(files, key=lambda p: p.relative_to(src).as_posix()):
        h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def check_prebuilt(src: Path, out: Path) -> None:
    """Extensions compiled earlier (``out``'s record) may be reused for ``src`` only if they were
    compiled from the same C++ sources: a C++ overlay change since then would be silently missing."""
    path = out / RECORD
    if not path.is_file():
        raise BuildError(f"{out} holds no {RECORD}: not a compile_extensions.py output; compile instead")
    recorded = json.loads(path.read_text()).get("source_digest")
    if recorded is None:
        raise BuildError(f"{path} records no source digest (compiled before it was recorded): "
                         "compile again instead of reusing these extensions")
    if recorded != source_digest(src):
        raise BuildError(f"the extensions in {out} were compiled from other C++ sources than {src} "
                         "(an overlay changed the C++ since): compile again instead of reusing them")


def arch_list(arch: str, ptx: bool = False) -> str:
    return ARCH_LISTS[arch] + ("+PTX" if ptx else "")


def build_env(arch: str, cpu: str, jobs: int, ptx: bool = False) -> dict:
    env = dict(os.environ)
    wanted = arch_list(arch, ptx)
    given = env.get("TORCH_CUDA_ARCH_LIST")
    if given and given.strip() != wanted:
        raise BuildError(f"TORCH_CUDA_ARCH_LIST={given!r} contradicts --arch {arch} (needs {wanted!r})")
    env.update({
        "TORCH_CUDA_ARCH_LIST": wanted,
        "CPU_INSTRUCT": cpu,
        "MAX_JOBS": str(jobs),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs),
        # upstream's bdist_wheel would otherwise try to download a prebuilt wheel from GitHub
        "KTRANSFORMERS_FORCE_BUILD": "TRUE",
    })
    # The git refs' setup.py no longer picks Ninja itself (its `import ninja` is commented out) and
    # CMake would fall back to make, which the toolchain does not install; 0.2.1.post1's picks
    # Ninja anyway. The images' toolchain has ninja (apt and pip).
    env.setdefault("CMAKE_GENERATOR", "Ninja")
    if shutil.which("ccache"):
        # cmake's launcher for cpuinfer_ext; the ccache masquerade dir for torch's ninja (c++)
        # and for nvcc's host compiler. CCACHE_DIR is the compile stage's cache mount.
        launchers = " ".join(f"-DCMAKE_{lang}_COMPILER_LAUNCHER=ccache" for lang in ("C", "CXX", "CUDA"))
        env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " " + launchers).strip()
        if Path("/usr/lib/ccache").is_dir():
            env["PATH"] = "/usr/lib/ccache:" + env.get("PATH", "")
        env.setdefault("CCACHE_DIR", str(Path.home() / ".ccache"))
    return env


# Runs upstream's setup.py with torch's nvcc/torch CUDA-major comparison waived (CI only, see above).
_MISMATCH_RUNNER = """
import re, runpy, subprocess, sys, torch, torch.utils.cpp_extension as ext
nvcc = re.search(r"release (\\d+[.]\\d+)", subprocess.run([sys.argv[1], "--version"], capture_output=True,
                                                           text=True).stdout).group(1)
print(f"compile: CI only: torch {torch.__version__} (CUDA {torch.version.cuda}) with nvcc {nvcc}: "
      "the CUDA major-version check is waived, the host-compiler bounds are not", flush=True)
_check = ext._check_cuda_version
def _same_cuda(*a, **k):
    real, torch.version.cuda = torch.version.cuda, nvcc
    try:
        return _check(*a, **k)
    finally:
        torch.version.cuda = real
ext._check_cuda_version = _same_cuda
sys.argv = ["setup.py"] + sys.argv[2:]
runpy.run_path("setup.py", run_name="__main__")
"""


# What a failed compile says first, in order of how directly it names the cause.
_CAUSES = (r"\berror: (?!command .* failed|ld returned)", r"fatal error", r"CMake Error", r"nvcc fatal",
           r"undefined reference", r"\w+Error: ", r"\berror\b")


def failure_cause(lines: list[str]) -> str:
    """The line of a failed build's output that names its cause (the compiler's first error beats the
    ninja/setuptools lines that follow it), else the last line."""
    import re
    for pattern in _CAUSES:
        for line in lines:
            if re.search(pattern, line):
                return line.strip()[:300]
    return next((ln.strip()[:300] for ln in reversed(lines) if ln.strip()), "no output")


def compile_tree(src: Path, out: Path, arch: str, cpu: str, jobs: int, ptx: bool = False,
                 allow_mismatch: bool = False) -> dict:
    if not (src / "setup.py").is_file():
        raise BuildError(f"{src} has no setup.py: pass a (patched) ktransformers tree with --src")
    sources = source_digest(src)  # before the build writes anything into the tree
    nvcc = find_nvcc()
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    env = build_env(arch, cpu, jobs, ptx)
    with tempfile.TemporaryDirectory(prefix="ktlegacy-ext-") as tmp:
        lib, temp = Path(tmp, "lib"), Path(tmp, "temp")
        cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp", str(temp)]
        if allow_mismatch:
            cmd[1:2] = ["-c", _MISMATCH_RUNNER, nvcc]
        print(f"compile: {' '.join(cmd)} (TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, "
              f"CPU_INSTRUCT={cpu}, MAX_JOBS={jobs})", flush=True)
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        tail: list[str] = []
        for line in proc.stdout:   # shown as it comes; the tail is kept to name the cause
            sys.stdout.write(line)
            tail = (tail + [line.rstrip()])[-400:]
        if proc.wait() != 0:
            raise BuildError(f"setup.py build_ext failed (exit {proc.returncode}) for {arch}: {failure_cause(tail)}")
        built = sorted(lib.rglob("*.so"))
        if not built:
            raise BuildError(f"setup.py build_ext produced no .so under {lib}")
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for so in built:
            rel = so.relative_to(lib)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, dest)
            files.append({"file": rel.as_posix(), "sha256": _sha256(dest), "device_code": has_device_code(dest)})
    record = {"mode": "build", "nvcc": " ".join(nvcc_version), "extensions": files, "source_digest": sources}
    if allow_mismatch:
        record["torch_cuda_major_mismatch_allowed"] = True
    return record


def check_arch(out: Path, record: dict, arch: str, ptx: bool = False) -> None:
    """check_cuda_arch.py over every built .so: host-only ones (cpuinfer_ext) pass, a CUDA
    extension without a cubin for exactly this arch fails, naming the file."""
    files = [out / f["file"] for f in record["extensions"]]
    checker = HERE / "check_cuda_arch.py"
    proc = subprocess.run([sys.executable, str(checker), "--arch", arch, *(["--expect-ptx"] if ptx else []),
                           *map(str, files)], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        first = next((ln.removeprefix("error: ") for ln in proc.stderr.splitlines() if ln.startswith("error: ")),
                     f"check_cuda_arch.py exit {proc.returncode}")
        raise BuildError(f"arch check failed for {arch}: {first} (the image would fail with "
                         "'no kernel image is available for execution on the device')")
    record["arch_check"] = {"arch": arch, "checked": [p.name for p in files], "result": "pass"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path, help="patched ktransformers tree (or its C++ side)")
    p.add_argument("--out", required=True, type=Path, help="directory for the built .so files and the record")
    p.add_argument("--arch", required=True, help="sm70 (V100) or sm75 (T4, RTX 2080 Ti)")
    p.add_argument("--cpu-instruct", default=DEFAULT_CPU_INSTRUCT, help="AVX2 (portable), AVX512, FANCY or NATIVE")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    p.add_argument("--ptx", action="store_true",
                   help="also embed the arch's PTX (e.g. 7.5+PTX) so a newer GPU can JIT it; for testing on "
                        "such GPUs, never for the images (they ship SASS for their one arch)")
    p.add_argument("--allow-torch-cuda-major-mismatch", action="store_true",
                   help="CI only: compile with an nvcc whose CUDA major differs from torch's (never shipped)")
    p.add_argument("--mode", choices=("build", "skip"), default="build",
                   help="skip: no-CUDA stand-in builds only; compiles nothing and records why")
    p.add_argument("--check-prebuilt", action="store_true",
                   help="compile nothing: check that the extensions already in --out were compiled from --src's C++ sources")
    args = p.parse_args(argv)
    if args.check_prebuilt:
        try:
            check_prebuilt(args.src, args.out)
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"compile: the extensions in {args.out} were compiled from these sources; reusing them")
        return 0
    try:
        arch = args.arch.strip().lower()
        if arch not in ARCH_LISTS:
            raise BuildError(f"arch {args.arch!r} is not built here: use {_FACTS.arch_choice()} (sm80+: the upstream images)")
        cpu = args.cpu_instruct.strip().upper()
        if cpu not in CPU_INSTRUCTS:
            raise BuildError(f"unknown CPU instruction set {args.cpu_instruct!r}: use one of {', '.join(CPU_INSTRUCTS)}")
        if args.mode == "skip":
            args.out.mkdir(parents=True, exist_ok=True)
            record = {"mode": "skip", "reason": "stand-in build, no CUDA", "extensions": []}
            print("compile: skipped (stand-in build, no CUDA): no extension is compiled", flush=True)
        else:
            record = compile_tree(args.src, args.out, arch, cpu, max(1, args.jobs), args.ptx,
                                  args.allow_torch_cuda_major_mismatch)
            check_arch(args.out, record, arch, args.ptx)
        record.update({"arch": arch, "torch_cuda_arch_list": arch_list(arch, args.ptx), "cpu_instruct": cpu})
        (args.out / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for f in record["extensions"]:
        print(f"compile: {f['file']} ({'device code' if f['device_code'] else 'host only'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
