#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the archive bench/peer_source.py writes (issue 13).
#
#   bash bench/peer_build_llama.sh SRC_TARBALL BUILD_DIR [cuda|cpu]
#
# cuda: CMAKE_CUDA_ARCHITECTURES=75-virtual: PTX for compute capability 7.5 only, so a newer GPU
#       JIT-compiles Turing code, as our 7.5+PTX ktransformers build does; flash attention kernels
#       on (GGML_CUDA_FA, the default), the all-quants FA variants off (the default), no NCCL.
# cpu:  the same tree without CUDA (what the CPU test machine builds to prove the GGUF loads).
# CPU code: GGML_NATIVE=ON (what a user building llama.cpp on that machine gets) unless
# PEER_LLAMA_CPU=avx2 (AVX2+FMA+F16C only: the instruction level of ktlegacy's default image build).
# Only the llama-bench target is built; static libraries, so BUILD_DIR/bin/llama-bench stands alone
# (plus the CUDA runtime libraries of the machine).
set -euo pipefail
src_tar="${1:?usage: peer_build_llama.sh SRC_TARBALL BUILD_DIR [cuda|cpu]}"
build="${2:?usage: peer_build_llama.sh SRC_TARBALL BUILD_DIR [cuda|cpu]}"
mode="${3:-cuda}"
[ -f "$src_tar" ] || { echo "error: $src_tar not found: make it with python bench/peer_source.py --out $src_tar" >&2; exit 2; }
case "$mode" in cuda|cpu) ;; *) echo "error: mode must be cuda or cpu, not $mode" >&2; exit 2;; esac
case "${PEER_LLAMA_CPU:-native}" in
  native) cpu_flags=(-DGGML_NATIVE=ON) ;;
  avx2) cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
  *) echo "error: PEER_LLAMA_CPU must be native or avx2" >&2; exit 2 ;;
esac
rm -rf "$build" && mkdir -p "$build"
tar -C "$build" -xzf "$src_tar"
[ -f "$build/llama.cpp/CMakeLists.txt" ] || { echo "error: $src_tar has no llama.cpp/CMakeLists.txt" >&2; exit 2; }
flags=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF
  -DGGML_CCACHE=OFF -DGGML_OPENMP=ON "${cpu_flags[@]}"
)
if [ "$mode" = cuda ]; then
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=75-virtual -DGGML_CUDA_FA=ON
          -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF)
fi
jobs="${PEER_JOBS:-$(nproc)}"
cmake -S "$build/llama.cpp" -B "$build/build" "${flags[@]}" >"$build/cmake-configure.log" 2>&1 \
  || { tail -40 "$build/cmake-configure.log"; exit 3; }
cmake --build "$build/build" --target llama-bench -j "$jobs" >"$build/cmake-build.log" 2>&1 \
  || { grep -E "error|Error" "$build/cmake-build.log" | head -40; tail -20 "$build/cmake-build.log"; exit 4; }
bin="$build/build/bin/llama-bench"
[ -x "$bin" ] || { echo "error: the build finished without $bin" >&2; exit 4; }
echo "built $bin ($mode, PEER_LLAMA_CPU=${PEER_LLAMA_CPU:-native})"
