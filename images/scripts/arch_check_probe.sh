#!/usr/bin/env bash
# Proof, on any host with nvcc (a GPU host with CUDA 13 included), that check_cuda_arch.py
# passes a real 7.5 / 7.5+PTX CUDA extension and fails it for sm_70 with one line:
#   bash images/scripts/arch_check_probe.sh [OUTDIR]
# Builds a one-kernel shared object named like the real extension with the host nvcc
# (sm_75 SASS; sm_75 SASS + compute_75 PTX), then runs four checks and prints each exit code.
# Expected: sm75 --expect-ptx on the PTX build 0; sm75 on the SASS build 0; sm70 1; sm75
# --expect-ptx on the SASS-only build 1. Exits non-zero if any result differs.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
out="${1:-$(mktemp -d)}"
mkdir -p "$out/ptx" "$out/sass"
echo "nvcc: $nvcc ($("$nvcc" --version | tail -1))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader
cat > "$out/axpy.cu" <<'CU'
extern "C" __global__ void ktlegacy_axpy(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
void ktlegacy_launch(float a, const float* x, float* y, int n) { ktlegacy_axpy<<<(n + 255) / 256, 256>>>(a, x, y, n); }
CU
so=KTransformersOps.cpython-311-x86_64-linux-gnu.so
"$nvcc" -shared -Xcompiler -fPIC -gencode arch=compute_75,code=sm_75 -gencode arch=compute_75,code=compute_75 \
  "$out/axpy.cu" -o "$out/ptx/$so" || exit 2
"$nvcc" -shared -Xcompiler -fPIC -gencode arch=compute_75,code=sm_75 "$out/axpy.cu" -o "$out/sass/$so" || exit 2
bad=0
probe() {  # expected-exit args...
  local want="$1"; shift
  echo "== check_cuda_arch.py $*"
  python3 "$here/check_cuda_arch.py" "$@"
  local got=$?
  echo "exit=$got (expected $want)"
  [ "$got" = "$want" ] || bad=1
}
probe 0 --arch sm75 --expect-ptx "$out/ptx"
probe 0 --arch sm75 "$out/sass"
probe 1 --arch sm70 "$out/ptx"
probe 1 --arch sm75 --expect-ptx "$out/sass"
exit $bad
