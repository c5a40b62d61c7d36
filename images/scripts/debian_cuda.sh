#!/usr/bin/env bash
# The CUDA 11.8 base images from a Debian mirror alone (no Docker Hub, no NVIDIA registry):
#   debian_cuda.sh devel    Debian bookworm's non-free nvidia-cuda-toolkit 11.8.89 (nvcc, cicc,
#                           ptxas, cuobjdump, g++-11 as nvcc's host compiler) and /usr/local/cuda
#                           laid out like NVIDIA's devel images, so torch's extension builder and
#                           ktransformers' CMake (which links $CUDA_HOME/lib64/libcudart.so) find it.
#   debian_cuda.sh runtime  Debian's CUDA 11.8 runtime (libcudart11.0) and the C/C++ runtimes the
#                           extensions need; cuBLAS/cuDNN/NCCL come with torch's nvidia-*-cu11 wheels
#                           and the driver (libcuda) from the host's NVIDIA container runtime.
# Env: APT_MIRROR (default http://deb.debian.org/debian; its main, contrib and non-free are read),
#      the CA bundle secret as in lib.sh. Outside Docker it does the same to a bookworm host (root).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

kind="${1:-}"
export APT_MIRROR="${APT_MIRROR:-http://deb.debian.org/debian}" APT_COMPONENTS="main contrib non-free"
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || die "the Debian CUDA 11.8 bases need Debian bookworm (this is ${PRETTY_NAME:-unknown}); its non-free nvidia-cuda-toolkit is 11.8"

case "$kind" in
  devel)
    apt_install nvidia-cuda-toolkit nvidia-cuda-dev
    # The static CUDA libraries (2.7 GB: cuBLASLt, cuFFT, cuSPARSE, NPP...) are never linked here:
    # torch's extensions and ktransformers' CMake link the shared ones. nvcc's own defaults
    # (libcudart_static, libculibos, libcudadevrt) stay.
    dpkg -L nvidia-cuda-dev | grep -E '_static[^/]*\.a$' | grep -vE '/lib(cudart|culibos|cudadevrt)_static\.a$' \
      | xargs -r rm -f
    # /usr/local/cuda as in NVIDIA's images: bin (the real nvcc, whose nvcc.profile points at
    # g++-11 and Debian's include/lib dirs), include, lib64.
    real=/usr/lib/nvidia-cuda-toolkit
    [ -x "$real/bin/nvcc" ] || die "nvidia-cuda-toolkit installed no $real/bin/nvcc"
    mkdir -p /usr/local/cuda/bin
    for tool in "$real"/bin/*; do ln -sfn "$tool" /usr/local/cuda/bin/; done
    for tool in cuobjdump nvdisasm nvprune fatbinary ptxas; do
      [ -e "/usr/local/cuda/bin/$tool" ] || { [ -x "/usr/bin/$tool" ] && ln -sfn "/usr/bin/$tool" /usr/local/cuda/bin/; }
    done
    ln -sfn /usr/include /usr/local/cuda/include
    ln -sfn /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64
    [ -d "$real/libdevice" ] && ln -sfn "$real/libdevice" /usr/local/cuda/nvvm 2>/dev/null || true
    /usr/local/cuda/bin/nvcc --version | tail -1
    /usr/local/cuda/bin/cuobjdump --version | tail -1
    ;;
  runtime)
    apt_install libcudart11.0 libgomp1 libnuma1
    ;;
  *) die "usage: debian_cuda.sh devel|runtime" ;;
esac
