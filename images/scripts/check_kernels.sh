#!/usr/bin/env bash
# kernels stage: every Triton kernel of the patched tree at SRC must compile for ARCH with the
# toolchain's Triton and fit the arch's shared memory (check_triton_kernels.py = ktlegacy check-triton;
# no GPU).
# A failure stops the build with one line naming kernel, arch and bytes. Writes OUT/ktlegacy-kernels.json.
# On the no-CUDA stand-in (KTLEGACY_EXTENSIONS=skip: CPU torch, no Triton) the check cannot run;
# the JSON records that instead of a pass. A stand-in given a Triton (TRITON_VERSION) runs it.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
src="${1:?usage: check_kernels.sh SRC OUT}"
out="${2:?usage: check_kernels.sh SRC OUT}"
py="${KTLEGACY_VENV:?}/bin/python"
: "${ARCH:?}"
mkdir -p "$out"
if [ "${KTLEGACY_EXTENSIONS:-build}" = skip ] && ! "$py" -c "import triton" 2>/dev/null; then
  log "Triton kernel check skipped: stand-in build, no CUDA torch/Triton"
  printf '{"arch": "%s", "result": "skipped", "reason": "stand-in build, no CUDA torch/Triton"}\n' "$ARCH" \
    >"$out/ktlegacy-kernels.json"
  exit 0
fi
"$py" "$here/check_triton_kernels.py" --src "$src" --arch "$ARCH" --json "$out/ktlegacy-kernels.json"
