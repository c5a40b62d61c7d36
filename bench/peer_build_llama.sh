#!/usr/bin/env bash
# Build a peer's llama-bench from the archive bench/peer_source.py writes (issues 13, 26):
# llama.cpp's (top folder llama.cpp/) or ik_llama.cpp's (top folder ik_llama.cpp/), told apart by
# the archive's top folder.
#
#   bash bench/peer_build_llama.sh SRC_TARBALL BUILD_DIR [cuda|cpu]
#
# cuda: CMAKE_CUDA_ARCHITECTURES=75-virtual: PTX for compute capability 7.5 only, so a newer GPU
#       JIT-compiles Turing code, as our 7.5+PTX ktransformers build does; the all-quants FA
#       variants off (the default), no NCCL. llama.cpp: flash attention kernels on (GGML_CUDA_FA,
#       the default). ik_llama.cpp has no GGML_CUDA_FA switch (its FA kernels are always built);
#       its IQK CPU paths keep their defaults (GGML_IQK_MUL_MAT, GGML_IQK_FLASH_ATTENTION,
#       GGML_IQK_FA_ALL_QUANTS all ON): the fused MoE path (-fmoe), MLA and run-time repacking are
#       run-time flags of llama-bench, not build options.
# cpu:  the same tree without CUDA (what the CPU test machine builds to prove the GGUF loads).
# CPU code: GGML_NATIVE=ON (what a user building the peer on that machine gets) unless
# PEER_LLAMA_CPU=avx2 (AVX2+FMA+F16C only: the instruction level of ktlegacy's default image build).
# Only the llama-bench target is built; static libraries, so BUILD_DIR/build/bin/llama-bench stands
# alone (plus the CUDA runtime libraries of the machine), for either peer.
# ik_llama.cpp's examples/CMakeLists.txt adds every example (the archive keeps only llama-bench),
# so its build goes through BUILD_DIR/ktlegacy-ik/CMakeLists.txt, written here: ik's top
# CMakeLists.txt with examples, tests and server off, then examples/llama-bench alone, the way
# ik-llama-cpp-python's own CMakeLists.txt adds examples/quantize.
set -euo pipefail
usage="usage: peer_build_llama.sh SRC_TARBALL BUILD_DIR [cuda|cpu]"
src_tar="${1:?$usage}"
build="${2:?$usage}"
mode="${3:-cuda}"
[ -f "$src_tar" ] || { echo "error: $src_tar not found: make it with python bench/peer_source.py --out $src_tar" >&2; exit 2; }
case "$mode" in cuda|cpu) ;; *) echo "error: mode must be cuda or cpu, not $mode" >&2; exit 2;; esac
case "${PEER_LLAMA_CPU:-native}" in
  native) cpu_flags=(-DGGML_NATIVE=ON) ;;
  avx2) cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
  *) echo "error: PEER_LLAMA_CPU must be native or avx2" >&2; exit 2 ;;
esac
# a build stopped part-way (peer_run.sh stops an unfinished one) resumes where it was if the archive,
# mode and CPU flags are the same; anything else starts from a fresh tree
want="$(sha256sum "$src_tar" | cut -d' ' -f1) $mode ${PEER_LLAMA_CPU:-native}"
if [ -d "$build/build" ] && [ "$(cat "$build/ktlegacy-build.want" 2>/dev/null)" = "$want" ]; then
  echo "resuming the build in $build (same archive, mode and CPU flags)"
else
  rm -rf "$build" && mkdir -p "$build"
  tar -C "$build" -xzf "$src_tar"
  echo "$want" >"$build/ktlegacy-build.want"
fi
if [ -f "$build/ik_llama.cpp/CMakeLists.txt" ]; then
  peer=ik_llama.cpp
elif [ -f "$build/llama.cpp/CMakeLists.txt" ]; then
  peer=llama.cpp
else
  echo "error: $src_tar has no llama.cpp/CMakeLists.txt or ik_llama.cpp/CMakeLists.txt" >&2; exit 2
fi
flags=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
  -DGGML_CCACHE=OFF -DGGML_OPENMP=ON "${cpu_flags[@]}"
)
if [ "$peer" = llama.cpp ]; then
  cmake_src="$build/llama.cpp"
  flags+=(-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
          -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF)
  [ "$mode" = cuda ] && flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=75-virtual -DGGML_CUDA_FA=ON
                                -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF)
else
  cmake_src="$build/ktlegacy-ik"
  mkdir -p "$cmake_src"
  cat >"$cmake_src/CMakeLists.txt" <<'CMAKE'
# written by ktlegacy's bench/peer_build_llama.sh: ik_llama.cpp's llama-bench alone
cmake_minimum_required(VERSION 3.14)
project(ktlegacy_ik_llama_bench C CXX)
set(CMAKE_CXX_STANDARD 20)
set(CMAKE_CXX_STANDARD_REQUIRED true)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(IK_SRC ${CMAKE_CURRENT_SOURCE_DIR}/../ik_llama.cpp)
add_subdirectory(${IK_SRC} ik_llama.cpp)
include_directories(${IK_SRC}/examples)
add_subdirectory(${IK_SRC}/examples/llama-bench examples/llama-bench)
CMAKE
  # ik-llama-cpp-python's sdist leaves out common/cmake/build-info-gen-cpp.cmake (ik's .gitignore has
  # "build*"), the script common/CMakeLists.txt runs to write common/build-info.cpp from
  # build-info.cpp.in; without it the build stops there. This is that script as ik_llama.cpp and
  # llama.cpp have it: cmake/build-info.cmake's values (commit "unknown" without .git) into the template.
  gen="$build/ik_llama.cpp/common/cmake/build-info-gen-cpp.cmake"
  if [ ! -f "$gen" ]; then
    mkdir -p "$(dirname "$gen")"
    cat >"$gen" <<'CMAKE'
# written by ktlegacy's bench/peer_build_llama.sh (missing from the ik-llama-cpp-python sdist)
include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/build-info.cmake)
configure_file(${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in ${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp)
CMAKE
  fi
  flags+=(-DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NCCL=OFF)
  [ "$mode" = cuda ] && flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=75-virtual -DGGML_CUDA_FA_ALL_QUANTS=OFF)
fi
jobs="${PEER_JOBS:-$(nproc)}"
cmake -S "$cmake_src" -B "$build/build" "${flags[@]}" >"$build/cmake-configure.log" 2>&1 \
  || { tail -40 "$build/cmake-configure.log"; exit 3; }
cmake --build "$build/build" --target llama-bench -j "$jobs" >"$build/cmake-build.log" 2>&1 \
  || { grep -E "error|Error" "$build/cmake-build.log" | head -40; tail -20 "$build/cmake-build.log"; exit 4; }
bin="$build/build/bin/llama-bench"
[ -x "$bin" ] || { echo "error: the build finished without $bin" >&2; exit 4; }
echo "built $bin ($peer, $mode, PEER_LLAMA_CPU=${PEER_LLAMA_CPU:-native})"
