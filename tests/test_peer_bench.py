"""bench/peer_bench.py's parts that run without a GPU, and the peer's source/build scripts.

The llama-bench output is a real recording: tests/fixtures/peer/llama-bench-cpu.jsonl is what
the CPU build of the carried llama.cpp printed for the small peer model (see the file's README
line in tests/fixtures/peer/README.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import peer_bench  # noqa: E402
import peer_source  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "peer"


def test_summarize_median_and_spread():
    s = peer_bench.summarize([10.0, 14.0, 12.0])
    assert (s["median"], s["min"], s["max"]) == (12.0, 10.0, 14.0)
    assert s["spread"] == pytest.approx(4.0 / 24.0)
    assert s["runs"] == [10.0, 14.0, 12.0]
    with pytest.raises(ValueError):
        peer_bench.summarize([])


def test_parse_recorded_llama_bench_output():
    text = (FIXTURES / "llama-bench-cpu.jsonl").read_text()
    rows = peer_bench.parse_llama_bench(text)
    assert rows, "the recording holds no rows"
    pp = [r for r in rows if r["n_prompt"] > 0]
    tg = [r for r in rows if r["n_gen"] > 0]
    assert pp and tg
    for r in rows:
        assert len(r["samples_ts"]) >= 3 and all(s > 0 for s in r["samples_ts"])
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / len(r["samples_ts"]), rel=1e-3)
    pts = peer_bench.llama_points(rows)
    for r in pp:
        assert pts["prefill"][str(r["n_prompt"])]["median"] == pytest.approx(sorted(r["samples_ts"])[1])
    for r in tg:
        assert pts["decode"][str(r["n_depth"])]["decode_tokens"] == r["n_gen"]
    # the same rows as one JSON array (-o json) parse the same
    as_array = "[\n" + ",\n".join(ln for ln in text.splitlines() if ln.startswith("{")) + "\n]\n"
    assert peer_bench.parse_llama_bench(as_array) == rows
    # log lines around jsonl rows are ignored; a row without samples is refused
    assert peer_bench.parse_llama_bench("load: something\n" + text) == rows
    with pytest.raises(ValueError, match="samples_ts"):
        peer_bench.parse_llama_bench('{"n_prompt": 1, "n_gen": 0, "avg_ts": 1.0}')


def _raw_objects(text: str) -> list[dict]:
    """Every JSON object a line opens, all fields (the parser keeps only those it uses)."""
    dec, out, pos = json.JSONDecoder(), [], 0
    for m in re.finditer(r"^[ \t]*\{", text, re.M):
        if m.start() >= pos:
            obj, pos = dec.raw_decode(text, m.end() - 1)
            out.append(obj)
    return out


def test_parse_recorded_ik_llama_bench_output():
    """ik_llama.cpp's llama-bench (no -o jsonl): two -o json invocations as printed, log lines
    ("Computed blk.N.attn_k_b ...") among the array's rows on stdout (see the README)."""
    text = (FIXTURES / "ik-llama-bench-cpu.out").read_text()
    assert text.index("Computed blk.0.attn_k_b") > text.index("[")  # logs inside the JSON array
    with pytest.raises(json.JSONDecodeError):
        json.loads(text[: text.index("]") + 1])
    rows = peer_bench.parse_llama_bench(text)
    assert [(r["test"], r["n_prompt"], r["n_gen"], r["n_ubatch"]) for r in rows] == [
        ("pp64", 64, 0, 512), ("tg4", 0, 4, 512), ("tg4@pp64", 64, 4, 512),
        ("pp64", 64, 0, 128), ("tg4", 0, 4, 128), ("pp64", 64, 0, 256), ("tg4", 0, 4, 256)]
    for r in rows:
        assert r["n_depth"] == 0  # ik's rows have no n_depth: depth is -gp's prompt
        assert len(r["samples_ts"]) == 3 and all(x > 0 for x in r["samples_ts"])
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 3, rel=1e-3)
    raw = _raw_objects(text)
    assert len(raw) == len(rows)
    for r in raw:  # the flags each row was run with, under ik's field names
        assert (r["fused_moe"], r["mla_attn"], r["attn_max_batch"], r["override_tensor"], r["flash_attn"]) == (
            True, 3, 512, "exps=CPU", True)
        assert "n_depth" not in r and "tensor_buft_overrides" not in r
    assert [r["repack"] for r in raw] == [False] * 3 + [True] * 4
    # -gp (tg4@pp64) times the 4 generated tokens only: tokens/s = 4 / time, not (64 + 4) / time
    gp = raw[2]
    for ts, ns in zip(gp["samples_ts"], gp["samples_ns"]):
        assert ts * ns / 1e9 == pytest.approx(4, rel=1e-3)


def _pts(prefill: dict, decode: dict) -> dict:
    return {"prefill": {k: peer_bench.summarize(v) for k, v in prefill.items()},
            "decode": {k: peer_bench.summarize(v) for k, v in decode.items()}}


def _cfg(flags: str, prefill: dict, decode: dict) -> dict:
    return dict(_pts(prefill, decode), flags=flags)


def test_best_peer_ratios_bandwidth_fraction_auto_and_targets():
    results = {
        "model": {"decode_cpu_bytes_per_token": {"total": 500_000_000}},
        "bandwidth": {"best_gb_s": 100.0},          # limit: 100e9 / 5e8 = 200 tok/s
        "llama_cpp": {"configs": {
            "llama_cpp:default": _cfg("(defaults)", {"512": [100, 110, 90], "2048": [200, 210, 190], "8192": [100] * 3},
                                      {"1024": [40, 41, 39], "4096": [20, 20, 20]}),
            "llama_cpp:ub2048": _cfg("-b 2048 -ub 2048", {"2048": [260] * 3, "8192": [120] * 3}, {})}},
        "ik_llama_cpp": {"configs": {
            "ik_llama_cpp:fmoe-mla3": _cfg("-fmoe 1 -mla 3 -amb 512", {"512": [150] * 3, "2048": [250] * 3},
                                           {"1024": [45] * 3, "4096": [30] * 3})}},
        "ktlegacy": dict(_pts({"512": [300, 300, 300], "2048": [400, 300, 350], "8192": [150] * 3},
                              {"1024": [50, 50, 50], "4096": [110, 100, 105]}),
                         gpu_prefill_auto={"threshold": 700, "picked_faster_or_within_10pct": True}),
        "ktlegacy_windows": _pts({"512": [50, 50, 50]}, {}),
    }
    d = peer_bench.derive(results)
    assert d["prefill_tok_s"]["ktlegacy"] == {"512": 300, "2048": 350, "8192": 150}
    assert d["prefill_tok_s"]["llama_cpp:ub2048"] == {"2048": 260, "8192": 120}
    best = d["best_peer"]
    assert {k: (v["config"], v["tok_s"]) for k, v in best["prefill"].items()} == {
        "512": ("ik_llama_cpp:fmoe-mla3", 150), "2048": ("llama_cpp:ub2048", 260), "8192": ("llama_cpp:ub2048", 120)}
    assert best["prefill"]["2048"]["flags"] == "-b 2048 -ub 2048" and best["prefill"]["2048"]["peer"] == "llama_cpp"
    assert {k: v["config"] for k, v in best["decode"].items()} == {"1024": "ik_llama_cpp:fmoe-mla3",
                                                                   "4096": "ik_llama_cpp:fmoe-mla3"}
    r = d["ratio_vs_best_peer"]
    assert r["prefill"] == {"512": pytest.approx(2.0), "2048": pytest.approx(350 / 260), "8192": pytest.approx(1.25)}
    assert r["decode"] == {"1024": pytest.approx(50 / 45), "4096": pytest.approx(105 / 30)}
    assert d["decode_bandwidth_limit_tok_s"] == pytest.approx(200.0)
    assert d["decode_fraction_of_bandwidth_limit"] == {"1024": pytest.approx(0.25), "4096": pytest.approx(0.525)}
    assert d["decode_fraction_of_bandwidth_limit_all"]["llama_cpp:default"]["4096"] == pytest.approx(0.1)
    t = d["targets_met"]
    assert t["prefill_512_ge_1.0x_best_peer"]["met"] is True
    assert t["prefill_2048_ge_1.5x_best_peer"] == {"met": False, "ratio": pytest.approx(350 / 260),
                                                   "shortfall": pytest.approx(1.5 - 350 / 260)}
    assert t["prefill_8192_ge_1.5x_best_peer"]["met"] is False
    assert t["decode_1024_ge_1.2x_best_peer"]["met"] is False and t["decode_4096_ge_1.2x_best_peer"]["met"] is True
    assert t["decode_ge_0.6_of_bandwidth_limit"]["met"] is False
    assert t["auto_picks_faster_or_within_10pct"] == {"met": True}
    assert d["gpu_prefill_auto"]["threshold"] == 700
    # no peer measured: no best peer, no ratios, no targets
    only = peer_bench.derive({"ktlegacy": results["ktlegacy"]})
    assert "ratio_vs_best_peer" not in only and "targets_met" not in only


def test_auto_check_compares_the_path_taken_with_both_forced():
    s = peer_bench.summarize
    out = {"prefill": {"512": dict(s([100] * 3), moe_layers_experts_on_gpu=0),
                       "2048": dict(s([400] * 3), moe_layers_experts_on_gpu=26),
                       "8192": dict(s([900] * 3), moe_layers_experts_on_gpu=0)},
           "experts_path": {"cpu": {"512": s([100] * 3), "2048": s([300] * 3), "8192": s([300] * 3)},
                            "gpu": {"512": s([105] * 3), "2048": s([400] * 3), "8192": s([900] * 3)}}}
    got = peer_bench.auto_check(out, 1000)
    assert got["points"]["512"]["picked_faster_or_within_10pct"] is True      # CPU, within 5% of the GPU
    assert got["points"]["2048"] == {"auto_path": "gpu", "auto_tok_s": 400, "cpu_tok_s": 300, "gpu_tok_s": 400,
                                     "faster_path": "gpu", "picked_faster_or_within_10pct": True}
    assert got["points"]["8192"]["picked_faster_or_within_10pct"] is False     # CPU at a third of the GPU
    assert got["picked_faster_or_within_10pct"] is False and got["threshold"] == 1000


def test_bandwidth_limit_from_the_model_record():
    from ktlegacy.testing.peer_model import LiteSpec, decode_cpu_bytes, tensor_plan
    per_token = decode_cpu_bytes(LiteSpec(), tensor_plan(LiteSpec()))["total"]
    # 26 MoE layers x 6 experts x 5,226,496 bytes + one Q8_0 embedding row
    assert per_token == 26 * 6 * 5_226_496 + 2176
    assert peer_bench.bandwidth_limit_tok_s(81.5, per_token) == pytest.approx(81.5e9 / per_token)


def test_triad_measures_and_checks_its_result(monkeypatch):
    got = peer_bench.triad(1 << 20, threads=1, reps=3)
    assert got["array_bytes"] == 8 << 20 and got["threads"] == 1 and got["reps"] == 3
    assert got["best_gb_s"] >= got["median_gb_s"] > 0
    import torch
    real_add = torch.add

    def wrong_add(b, c, alpha=1.0, out=None):
        real_add(b, c, alpha=alpha, out=out)
        out[0] = -1.0  # a triad that writes a wrong element must not report a rate
        return out
    monkeypatch.setattr(torch, "add", wrong_add)
    with pytest.raises(RuntimeError, match="wrong values"):
        peer_bench.triad(4096, threads=1, reps=1)


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    # cpu0/cpu2 and cpu1/cpu3 are SMT pairs on package 0; cpu4 is alone on package 1
    topo = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)}
    for cpu, (pkg, core) in topo.items():
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")
    assert peer_bench.physical_cores({0, 1, 2, 3, 4}, sysfs=tmp_path) == 3
    assert peer_bench.physical_cores({0, 2}, sysfs=tmp_path) == 1
    assert peer_bench.physical_cores({0, 9}, sysfs=tmp_path) == 2  # no topology for cpu9: count CPUs


def test_llama_bench_commands():
    p = peer_bench.llama_bench_cmd("/x/llama-bench", Path("/m/model.gguf"), 16, 3, prompts=[512, 2048, 8192])
    assert p[:3] == ["/x/llama-bench", "-m", "/m/model.gguf"]
    joined = " ".join(p)
    for part in ("-ngl 99", "-ot exps=CPU", "-fa 1", "-t 16", "-r 3", "-o jsonl", "-p 512,2048,8192", "-n 0"):
        assert part in joined
    d = " ".join(peer_bench.llama_bench_cmd("b", Path("m"), 8, 5, depths=[1024, 4096], n_gen=32))
    assert "-p 0 -n 32 -d 1024,4096" in d and "-t 8" in d and "-r 5" in d


def test_peer_configurations_measure_only_the_points_they_change():
    args = SimpleNamespace(prefill=[512, 2048, 8192], decode_ctx=[1024, 4096], decode_tokens=32, threads=16, runs=3,
                           long_runs=1)

    def commands(peer):
        got = {}
        for cfg, kind, cmd in peer_bench.peer_commands(args, peer, "b", Path("m")):
            got.setdefault((cfg.name, kind), []).append(" ".join(cmd))
        return got
    llama = commands("llama_cpp")
    assert set(llama) == {("default", "prefill"), ("default", "decode"), ("ub2048", "prefill"), ("ub4096", "prefill")}
    assert llama["default", "prefill"] == [  # 8192 tokens --long-runs times
        "b -m m -ngl 99 -ot exps=CPU -fa 1 -t 16 -r 3 -o jsonl --no-warmup -p 512,2048 -n 0",
        "b -m m -ngl 99 -ot exps=CPU -fa 1 -t 16 -r 1 -o jsonl --no-warmup -p 8192 -n 0"]
    assert llama["default", "decode"] == ["b -m m -ngl 99 -ot exps=CPU -fa 1 -t 16 -r 3 -o jsonl --no-warmup "
                                          "-p 0 -n 32 -d 1024,4096"]
    assert [c.split("--no-warmup ")[1] for c in llama["ub2048", "prefill"]] == [   # at 512, ub 2048 is ub 512
        "-b 2048 -ub 2048 -p 2048 -n 0", "-b 2048 -ub 2048 -p 8192 -n 0"]
    assert [c.split("--no-warmup ")[1] for c in llama["ub4096", "prefill"]] == [   # at 2048, ub 4096 is ub 2048
        "-b 4096 -ub 4096 -p 8192 -n 0"]
    ik = commands("ik_llama_cpp")
    assert set(ik) == {("fmoe-mla3", "prefill"), ("fmoe-mla3", "decode"), ("fmoe-mla3-ub2048", "prefill"),
                       ("fmoe-mla3-ub4096", "prefill")}
    every = [c for cs in ik.values() for c in cs]
    assert all("-ot exps=CPU -fa 1" in c and "-o json -w 0 -fmoe 1 -mla 3 -amb 512" in c for c in every)
    assert ik["fmoe-mla3", "prefill"] == [every[0]] and every[0].endswith("-p 512 -n 0")  # the default ubatch: 512 only
    assert ik["fmoe-mla3", "decode"][0].endswith("-p 0 -n 0 -gp 1024,32 -gp 4096,32")  # ik has no -d
    assert ik["fmoe-mla3-ub2048", "prefill"][1].endswith("-b 2048 -ub 2048 -p 8192 -n 0")


def test_projected_thresholds_move_the_copy_and_scale_the_cpu():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rt_for_projection", REPO / "overlays" / "runtime" / "ktlegacy_runtime.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    # a 334 MB layer copied in 6.7 ms (50 GB/s), CPU 100 ms for 1024 tokens on 14 threads, GPU 20 ms
    samples = [(1024, 0.1, 334e6 / 50e9, 0.02, 334e6)] * 2
    got = peer_bench.projected_thresholds(rt, samples, threads=14)
    one, two = got["pcie3_x16_12GBs_one_node_12_threads"], got["pcie3_x16_12GBs_two_nodes_26_threads"]
    c12, c26 = 0.1 * 14 / 12 / 1024, 0.1 * 14 / 26 / 1024
    g = (0.02 - 334e6 / 50e9) / 1024
    assert one["threshold"] == math.ceil((334e6 / 12e9) / (c12 - g))
    assert two["threshold"] == math.ceil((334e6 / 12e9) / (c26 - g)) > one["threshold"]
    assert "12.0 GB/s" in one["detail"]


def test_ik_decode_rows_are_points_at_their_prompt_depth():
    rows = peer_bench.parse_llama_bench((FIXTURES / "ik-llama-bench-cpu.out").read_text())
    first = rows[:3]    # -p 64 -n 4 -gp 64,4 at -ub 512: pp64, tg4 (depth 0), tg4@pp64 (depth 64)
    pts = peer_bench.llama_points(first)
    assert set(pts["prefill"]) == {"64"} and set(pts["decode"]) == {"0", "64"}
    assert pts["decode"]["64"]["runs"] == first[2]["samples_ts"] and pts["decode"]["64"]["decode_tokens"] == 4


def test_cli_refusals(tmp_path):
    script = REPO / "bench" / "peer_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path), "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no ktlegacy-peer-model.json" in proc.stderr
    assert not (tmp_path / "o.json").exists()
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path), "--out", str(tmp_path / "o.json"),
                           "--runs", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--runs must be at least 3" in proc.stderr
    # --ik-llama-bench is taken (stored for ik_llama.cpp's configurations; bench/peer_run.sh passes it)
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path), "--out", str(tmp_path / "o.json"),
                           "--ik-llama-bench", str(tmp_path / "ik-llama-bench")], capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no ktlegacy-peer-model.json" in proc.stderr


def test_jit_warmup_runs_every_configuration_once_untimed(tmp_path):
    """--jit-warmup: a prompt and a few decode steps per configuration, each peer's own flags and
    command form; a failing run is reported (exit 1) and the others still run."""
    log = tmp_path / "argv.log"
    stand_in = tmp_path / "llama-bench"
    stand_in.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {log}\ncase \"$*\" in *-gp*) exit 3;; esac\n")
    stand_in.chmod(0o755)
    args = SimpleNamespace(engines=["llama_cpp", "ik_llama_cpp"], llama_bench=str(stand_in), ik_llama_bench=str(stand_in),
                           threads=4)
    assert peer_bench.jit_warmup(args, tmp_path / "m.gguf") == 1      # ik's decode form (-gp) fails here
    lines = log.read_text().splitlines()
    configs = [c for c in peer_bench.PEER_CONFIGS if c.peer in args.engines]
    assert len(lines) == 2 * len(configs)
    for cfg, prompt, decode in zip(configs, lines[::2], lines[1::2]):
        assert " -p 512 -n 0" in prompt and " -r 1 " in prompt
        assert all(flag in prompt and flag in decode for flag in cfg.flags)
        if cfg.peer == "ik_llama_cpp":
            assert "-gp 16,4" in decode
        else:
            assert "-n 4 -d 16" in decode
    # only the engines asked for
    log.unlink()
    assert peer_bench.jit_warmup(SimpleNamespace(**(vars(args) | {"engines": ["llama_cpp"]})), tmp_path / "m.gguf") == 0
    assert len(log.read_text().splitlines()) == 2 * len([c for c in configs if c.peer == "llama_cpp"])


# ---------------------------------------------------------------- the source archive

def _fake_sdist(path: Path, changelog: str) -> Path:
    files = {
        "CHANGELOG.md": changelog,
        "vendor/llama.cpp/CMakeLists.txt": "project(x)\n",
        "vendor/llama.cpp/src/llama.cpp": "// src\n",
        "vendor/llama.cpp/tools/llama-bench/llama-bench.cpp": "// bench\n",
        "vendor/llama.cpp/tools/server/server.cpp": "// dropped\n",
        "vendor/llama.cpp/models/ggml-vocab-x.gguf": "dropped",
        "vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu": "// kept\n",
        "vendor/llama.cpp/ggml/src/ggml-vulkan/v.cpp": "// dropped\n",
        "llama_cpp/llama.py": "# not vendored\n",
    }
    return _write_tar(path, f"llama_cpp_python-{peer_source.SDIST_VERSION}/", files)


def _write_tar(path: Path, top: str, files: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_source_archive_keeps_what_the_build_reads(tmp_path):
    sdist = _fake_sdist(tmp_path / "s.tar.gz", "## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n")
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    rec = peer_source.make_archive(sdist, tmp_path / "out" / "src.tar.gz", sha256=sha)
    assert rec["llama_cpp_commit"] == "0c1e57098"
    with tarfile.open(tmp_path / "out" / "src.tar.gz") as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile("llama.cpp/KTLEGACY-SOURCE.json").read())
    assert names == ["llama.cpp/CMakeLists.txt", "llama.cpp/KTLEGACY-SOURCE.json",
                     "llama.cpp/ggml/src/ggml-cuda/fattn.cu", "llama.cpp/src/llama.cpp",
                     "llama.cpp/tools/llama-bench/llama-bench.cpp"]
    assert meta["llama_cpp_commit"] == "0c1e57098" and meta["sdist_sha256"] == sha
    assert not (tmp_path / "out" / "src.tar.gz.partial").exists()


def test_source_archive_refuses_a_wrong_sdist(tmp_path):
    sdist = _fake_sdist(tmp_path / "s.tar.gz", "no commit named here\n")
    with pytest.raises(SystemExit, match="expected"):
        peer_source.make_archive(sdist, tmp_path / "a.tar.gz")  # the pinned hash
    with pytest.raises(ValueError, match="names no llama.cpp commit"):
        peer_source.make_archive(sdist, tmp_path / "a.tar.gz", sha256=hashlib.sha256(sdist.read_bytes()).hexdigest())
    assert not (tmp_path / "a.tar.gz").exists() and not (tmp_path / "a.tar.gz.partial").exists()


IK_FILES = {
    # kept: what the CPU + CUDA llama-bench build reads
    "vendor/ik_llama.cpp/CMakeLists.txt": "project(x)\n",
    "vendor/ik_llama.cpp/src/llama.cpp": "// src\n",
    "vendor/ik_llama.cpp/examples/llama-bench/CMakeLists.txt": "set(TARGET llama-bench)\n",
    "vendor/ik_llama.cpp/examples/llama-bench/llama-bench.cpp": "// bench\n",
    "vendor/ik_llama.cpp/ggml/src/iqk/iqk_mul_mat.cpp": "// iqk\n",
    "vendor/ik_llama.cpp/ggml/src/ggml-cuda/fattn.cu": "// cuda\n",
    "vendor/ik_llama.cpp/vendor/nlohmann/json.hpp": "// json\n",
    # dropped
    "vendor/ik_llama.cpp/examples/CMakeLists.txt": "add_subdirectory(main)\n",
    "vendor/ik_llama.cpp/examples/main/main.cpp": "// another example\n",
    "vendor/ik_llama.cpp/examples/server/public/index.html.gz": "web ui",
    "vendor/ik_llama.cpp/models/ggml-vocab-x.gguf": "vocab",
    "vendor/ik_llama.cpp/github-data/issues.json": "{}",
    "vendor/ik_llama.cpp/convert_hf_to_gguf.py": "# converter\n",
    "vendor/ik_llama.cpp/ggml/src/ggml-vulkan.cpp": "// vulkan\n",
    "vendor/ik_llama.cpp/ggml/src/kompute/k.cpp": "// kompute\n",
    "vendor/ik_llama.cpp/vendor/miniaudio/miniaudio.h": "// audio\n",
    "ik_llama_cpp/llama.py": "# not vendored\n",
}


def _fake_ik_sdist(path: Path, drop: str = "") -> Path:
    return _write_tar(path, f"ik_llama_cpp_python-{peer_source.PEERS['ik_llama_cpp'].version}/",
                      {name: text for name, text in IK_FILES.items() if name != drop})


def test_ik_source_archive_keeps_what_the_build_reads(tmp_path):
    sdist = _fake_ik_sdist(tmp_path / "s.tar.gz")
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    rec = peer_source.make_archive(sdist, tmp_path / "out" / "ik.tar.gz", sha256=sha, peer="ik_llama_cpp")
    with tarfile.open(tmp_path / "out" / "ik.tar.gz") as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile("ik_llama.cpp/KTLEGACY-SOURCE.json").read())
    assert names == ["ik_llama.cpp/CMakeLists.txt", "ik_llama.cpp/KTLEGACY-SOURCE.json",
                     "ik_llama.cpp/examples/llama-bench/CMakeLists.txt",
                     "ik_llama.cpp/examples/llama-bench/llama-bench.cpp",
                     "ik_llama.cpp/ggml/src/ggml-cuda/fattn.cu", "ik_llama.cpp/ggml/src/iqk/iqk_mul_mat.cpp",
                     "ik_llama.cpp/src/llama.cpp", "ik_llama.cpp/vendor/nlohmann/json.hpp"]
    assert rec["files"] == 7 and rec["peer"] == "ik_llama_cpp"
    # the sdist records no ik_llama.cpp commit: the record says so instead of inventing one
    assert meta["ik_llama_cpp_commit"] is None and "records no commit" in meta["commit_note"]
    assert meta["sdist_sha256"] == sha and meta["from"] == "PyPI ik-llama-cpp-python 0.1.5 sdist"
    assert "examples/llama-bench/" in meta["kept_only"] and "ggml/src/ggml-vulkan.cpp" in meta["dropped"]
    assert "common/cmake/build-info-gen-cpp.cmake" in meta["missing_from_sdist"]  # peer_build_llama.sh writes it
    assert not (tmp_path / "out" / "ik.tar.gz.partial").exists()


def test_ik_source_archive_refuses_a_wrong_sdist(tmp_path):
    sdist = _fake_ik_sdist(tmp_path / "s.tar.gz", drop="vendor/ik_llama.cpp/examples/llama-bench/llama-bench.cpp")
    with pytest.raises(SystemExit, match="ik-llama-cpp-python 0.1.5's sdist"):
        peer_source.make_archive(sdist, tmp_path / "a.tar.gz", peer="ik_llama_cpp")  # the pinned hash
    with pytest.raises(ValueError, match="holds no .*examples/llama-bench/llama-bench.cpp"):
        peer_source.make_archive(sdist, tmp_path / "a.tar.gz", sha256=hashlib.sha256(sdist.read_bytes()).hexdigest(),
                                 peer="ik_llama_cpp")
    # llama.cpp's sdist is not ik's: its vendored tree is elsewhere
    other = _fake_sdist(tmp_path / "l.tar.gz", "- update llama.cpp to ggml-org/llama.cpp@0c1e57098\n")
    with pytest.raises(ValueError, match="holds no"):
        peer_source.make_archive(other, tmp_path / "a.tar.gz", sha256=hashlib.sha256(other.read_bytes()).hexdigest(),
                                 peer="ik_llama_cpp")
    assert not (tmp_path / "a.tar.gz").exists() and not (tmp_path / "a.tar.gz.partial").exists()


@pytest.mark.parametrize("peer, dist, top", [("llama_cpp", "llama-cpp-python", "llama.cpp"),
                                             ("ik_llama_cpp", "ik-llama-cpp-python", "ik_llama.cpp")])
def test_peer_table_pins_each_sdist(peer, dist, top):
    p = peer_source.PEERS[peer]
    assert (p.dist, p.top) == (dist, top) and len(p.sha256) == 64 and int(p.sha256, 16) >= 0
    assert p.sdist_name == f"{dist.replace('-', '_')}-{p.version}.tar.gz"
    assert p.keep("CMakeLists.txt") and p.keep("ggml/src/ggml-cuda/fattn.cu") and not p.keep("models/x.gguf")
    # the llama.cpp names callers used before there were two peers
    assert (peer_source.SDIST_VERSION, peer_source.SDIST_SHA256) == (
        peer_source.PEERS["llama_cpp"].version, peer_source.PEERS["llama_cpp"].sha256)


# ---------------------------------------------------------------- the GPU-machine scripts

def test_scripts_parse_and_refuse_missing_inputs(tmp_path):
    for script in ("peer_run.sh", "peer_build_llama.sh", "gpu_run.sh"):
        subprocess.run(["bash", "-n", str(REPO / "bench" / script)], check=True)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PEER_WORK=str(tmp_path / "work"),
               PEER_LLAMA_SRC=str(tmp_path / "none.tar.gz"))
    env.pop("PEER_LLAMA_PREBUILT", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "peer_run.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.tar.gz'} is missing: run python bench/peer_source.py --out "
        f"{tmp_path / 'none.tar.gz'} here and carry .whl/"]
    proc = subprocess.run(["bash", str(REPO / "bench" / "peer_build_llama.sh"), str(tmp_path / "none.tar.gz"),
                           str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "bench/peer_source.py" in proc.stderr and not (tmp_path / "b").exists()
    (tmp_path / "x.tar.gz").write_bytes(b"")
    proc = subprocess.run(["bash", str(REPO / "bench" / "peer_build_llama.sh"), str(tmp_path / "x.tar.gz"),
                           str(tmp_path / "b"), "metal"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: mode must be cuda or cpu, not metal"
    # an archive with neither peer's top folder is refused before anything is built
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("whisper.cpp/CMakeLists.txt")
        tar.addfile(info, io.BytesIO(b""))
    proc = subprocess.run(["bash", str(REPO / "bench" / "peer_build_llama.sh"), str(tmp_path / "other.tar.gz"),
                           str(tmp_path / "b"), "cpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {tmp_path / 'other.tar.gz'} has no llama.cpp/CMakeLists.txt or ik_llama.cpp/CMakeLists.txt")


def test_cpu_expert_wait_times_and_restores(monkeypatch):
    """The timer wraps KExpertsCPU's three entry points and puts them back (a stand-in class:
    the real one needs the compiled cpuinfer extension, which only the GPU machine has)."""
    import time
    import types

    class KExpertsCPU:
        def forward(self, x):
            time.sleep(0.02)
            return x + 1

        def submit_for_one_decode(self, x):
            return "submitted"

        def sync_for_one_decode(self):
            time.sleep(0.01)
            return "synced"
    originals = {n: KExpertsCPU.__dict__[n] for n in peer_bench.CpuExpertWait.METHODS}
    mod = types.ModuleType("ktransformers.operators.experts")
    mod.KExpertsCPU = KExpertsCPU
    for name in ("ktransformers", "ktransformers.operators"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "ktransformers.operators.experts", mod)
    e = KExpertsCPU()
    with peer_bench.CpuExpertWait() as w:
        assert e.forward(1) == 2 and e.submit_for_one_decode(0) == "submitted" and e.sync_for_one_decode() == "synced"
    assert 0.03 <= w.seconds < 1.0
    assert {n: KExpertsCPU.__dict__[n] for n in originals} == originals
    with pytest.raises(ZeroDivisionError):
        with peer_bench.CpuExpertWait():
            1 / 0
    assert {n: KExpertsCPU.__dict__[n] for n in originals} == originals


def test_logits_agreement():
    import torch
    from peer_bench import logits_agreement
    a = torch.tensor([0.0, 1.0, 5.0, 2.0, 3.0, 4.0, -1.0])
    same = logits_agreement(a, a.clone())
    assert same == {"relative_l2": 0.0, "cosine": pytest.approx(1.0), "same_argmax": True, "top5_overlap": 5}
    other = logits_agreement(torch.tensor([5.0, 1.0, 0.0, 2.0, 3.0, 4.0, -1.0]), a)
    assert other["same_argmax"] is False and other["top5_overlap"] == 4 and other["relative_l2"] > 0.5


def test_gpu_prefill_path_bench_refuses_without_a_gpu():
    """bench/gpu_prefill_path.py needs CUDA: without it, one line and exit 2, nothing written."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = REPO / "build" / "gpu_prefill_path_should_not_exist.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_prefill_path.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("error: needs a CUDA GPU")
    assert not out.exists()
