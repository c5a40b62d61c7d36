#!/usr/bin/env bash
# toolchain stage: OS packages, then a venv with the pinned torch and the build tools.
# Env: KTLEGACY_VENV, TORCH_VERSION (or KTLEGACY_CI_TORCH, torch.sh), TRITON_VERSION (optional), KTLEGACY_EXTENSIONS (build|skip), TORCH_INDEX_URL, PIP_INDEX_URL, APT_MIRROR.
# Outside Docker (a GPU machine) it works the same given root for apt; set KTLEGACY_VENV to taste.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
. "$here/torch.sh"
reqs="$(cd "$here/../requirements" && pwd)"

: "${KTLEGACY_VENV:?}" "${TORCH_VERSION:?}"
mode="${KTLEGACY_EXTENSIONS:-build}"

# python3-venv brings ensurepip (python3.10 on ubuntu22.04, 3.11 on bookworm).
pkgs=(python3 python3-venv ca-certificates)
if [ "$mode" = build ]; then
  # cmake/ninja/g++: the cpuinfer_ext CMake build; python3-dev: pybind11 and torch extensions;
  # ccache: the compile stage's cache mount; libnuma-dev: USE_NUMA builds; git: llama.cpp's cmake.
  pkgs+=(g++ cmake ninja-build python3-dev ccache libnuma-dev git binutils)
fi
apt_install "${pkgs[@]}"

python3 -m venv "$KTLEGACY_VENV"
py="$KTLEGACY_VENV/bin/python"
extra=()
[ "$mode" = build ] && extra=(-r "$reqs/compile.txt")
# TRITON_VERSION: tests only, a Triton beside the stand-in's CPU torch so the kernels check runs
[ -n "${TRITON_VERSION:-}" ] && extra+=("triton==${TRITON_VERSION}")
pip_install "$py" "$TORCH_REQ" -r "$reqs/build.txt" "${extra[@]}"
"$py" -c 'import sys, torch; print("toolchain: python %d.%d, torch %s, cuda %s" % (sys.version_info[:2] + (torch.__version__, torch.version.cuda)))'
