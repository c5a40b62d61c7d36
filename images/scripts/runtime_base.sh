#!/usr/bin/env bash
# runtime stage, step 1: Python, the non-root user, and a venv with the pinned torch (its own
# layer: a new ktransformers wheel does not reinstall torch).
# Env: KTLEGACY_VENV, TORCH_VERSION (or KTLEGACY_CI_TORCH, torch.sh), KTLEGACY_EXTENSIONS (build|skip),
#      TORCH_INDEX_URL, PIP_INDEX_URL, APT_MIRROR.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
. "$here/torch.sh"
. "$here/slim.sh"
: "${KTLEGACY_VENV:?}"

# libgomp1: OpenMP of cpuinfer_ext; libnuma1: NUMA-aware builds (not needed by the stand-in,
# which has no extensions). gcc, libc6-dev, python3-dev: Triton compiles its CUDA launcher (a small
# C module, against Python.h) the first time a kernel runs on the GPU, and fails without a C
# compiler ("Failed to find C compiler"); tests/smoke/check_triton.py builds one the same way.
# No CUDA toolkit, no C++ compiler, no source tree.
pkgs=(python3 python3-venv ca-certificates)
[ "${KTLEGACY_EXTENSIONS:-build}" = build ] && pkgs+=(libgomp1 libnuma1 gcc libc6-dev python3-dev)
apt_install "${pkgs[@]}"
rm -f /var/cache/apt/*.bin   # apt's package caches (76 MiB), rebuilt by any later apt-get update
# Static libraries that came with gcc and python3-dev and that Triton's launcher (one shared object
# linked against libc.so and nothing of Python's) never links: libpython, libc, libm, the sanitizers.
find /usr/lib \( -name 'libpython3*.a' -o -name 'lib*san.a' -o -name libc.a -o -name 'libm.a' -o -name 'libm-*.a' \
  -o -name libmvec.a \) -type f -delete
# ... and what gcc brings that a plain C build never runs: the LTO back end, the sanitizers' runtimes,
# translations and manual pages (about 60 MiB; /usr/share/doc keeps the copyright files).
rm -rf /usr/lib/gcc/x86_64-linux-gnu/*/lto1 /usr/lib/gcc/x86_64-linux-gnu/*/lto-wrapper \
  /usr/lib/x86_64-linux-gnu/lib{a,t,l,ub,hwa}san.so* /usr/share/locale/* /usr/share/man/*

id ktlegacy >/dev/null 2>&1 || useradd --create-home --uid 1000 --shell /bin/bash ktlegacy
python3 -m venv "$KTLEGACY_VENV"
extra=()
# CI only (torch.sh): PyPI's torch brings CUDA 12 libraries; the extensions link CUDA 11.8's
# libcudart.so.11.0, which the pin (a CUDA 11.8 build) brings as the nvidia-cuda-runtime-cu11 wheel.
[ -n "${KTLEGACY_CI_TORCH:-}" ] && extra=(-r "$here/../requirements/ci-cuda-runtime.txt")
pip_install "$KTLEGACY_VENV/bin/python" "$TORCH_REQ" "${extra[@]}"
slim_venv "$KTLEGACY_VENV"
