#!/usr/bin/env bash
# runtime stage, step 1: Python, the non-root user, and a venv with the pinned torch (its own
# layer: a new ktransformers wheel does not reinstall torch).
# Env: KTLEGACY_VENV, TORCH_VERSION, KTLEGACY_EXTENSIONS (build|skip), TORCH_INDEX_URL, PIP_INDEX_URL, APT_MIRROR.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
: "${KTLEGACY_VENV:?}" "${TORCH_VERSION:?}"

# libgomp1: OpenMP of cpuinfer_ext; libnuma1: NUMA-aware builds (not needed by the stand-in,
# which has no extensions). No compiler in the runtime.
pkgs=(python3 python3-venv ca-certificates)
[ "${KTLEGACY_EXTENSIONS:-build}" = build ] && pkgs+=(libgomp1 libnuma1)
apt_install "${pkgs[@]}"

id ktlegacy >/dev/null 2>&1 || useradd --create-home --uid 1000 --shell /bin/bash ktlegacy
python3 -m venv "$KTLEGACY_VENV"
pip_install "$KTLEGACY_VENV/bin/python" "torch==${TORCH_VERSION}"
