# CUDA 11.8 base images made from a Debian mirror: for builders who cannot pull nvidia/cuda from
# Docker Hub or nvcr.io (`invoke build --debian-bases`, docs/images.md), and CI's real compile.
#
# ROOTFS_IMAGE is a Debian bookworm root file system that `docker import` made from debootstrap
# (ktlegacy/standin.py): the stand-in's for devel, a lean one (`debian-rootfs --runtime`: python3 and
# ca-certificates, no git, perl or apt lists) for runtime; nothing here comes from a registry. Stages:
#   devel    + nvidia-cuda-toolkit 11.8 (non-free) laid out at /usr/local/cuda: the BASE_IMAGE
#   runtime  + libcudart 11.8 and the C/C++ runtimes, no compiler:          the RUNTIME_IMAGE
# Build args: ROOTFS_IMAGE, APT_MIRROR. Secret: ca_cert (as images/Dockerfile).
ARG ROOTFS_IMAGE=ktlegacy-standin/bookworm:base

FROM ${ROOTFS_IMAGE} AS devel
ARG APT_MIRROR=
COPY images/scripts/lib.sh images/scripts/debian_cuda.sh /ktlegacy-base/
RUN --mount=type=secret,id=ca_cert bash /ktlegacy-base/debian_cuda.sh devel && rm -rf /ktlegacy-base
# g++-11: CUDA 11.8 supports host compilers below 12 (torch's extension builder checks it), and
# bookworm's default g++ is 12; nvcc itself already uses g++-11 (Debian's nvcc.profile).
ENV CUDA_HOME=/usr/local/cuda \
    PATH=/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CC=gcc-11 CXX=g++-11 CUDAHOSTCXX=g++-11
LABEL io.ktlegacy.base="debian-cuda-11.8-devel"

FROM ${ROOTFS_IMAGE} AS runtime
ARG APT_MIRROR=
COPY images/scripts/lib.sh images/scripts/debian_cuda.sh /ktlegacy-base/
RUN --mount=type=secret,id=ca_cert bash /ktlegacy-base/debian_cuda.sh runtime && rm -rf /ktlegacy-base
# What NVIDIA's images declare for the NVIDIA container runtime: expose the GPUs and the driver.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL io.ktlegacy.base="debian-cuda-11.8-runtime"
