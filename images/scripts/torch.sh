# Which torch a pip step installs (sourced after lib.sh by toolchain.sh, runtime_base.sh, install_wheels.sh).
#   TORCH_REQ  torch==$TORCH_VERSION (the pin, from TORCH_INDEX_URL), or, when KTLEGACY_CI_TORCH is
#              set, torch==$KTLEGACY_CI_TORCH from PyPI (PIP_INDEX_URL) with TORCH_INDEX_URL unset.
# KTLEGACY_CI_TORCH is CI's one substitution (tests/test_runtime_lane.py): PyPI's build of the pin's
# release (a CUDA 12.4 build) stands in for the pin, which only PyTorch's own index serves. The
# image says so in its ci-torch label and `publish` refuses it; docs/images.md says what the
# substitution can hide.
if [ -n "${KTLEGACY_CI_TORCH:-}" ]; then
  TORCH_REQ="torch==${KTLEGACY_CI_TORCH}"
  unset TORCH_INDEX_URL
  log "CI only: torch==${KTLEGACY_CI_TORCH} from PyPI stands in for torch==${TORCH_VERSION:-?} (never published)"
else
  TORCH_REQ="torch==${TORCH_VERSION:?}"
fi

# slim_venv VENV: the runtime stage only, in the same RUN as the install (a later layer cannot take
# bytes back): drop what no import needs, C/C++ headers (torch/include, nvidia/*/include), static
# libraries (*.a) and pip's byte-code caches (__pycache__, 233 MiB: each process compiles what it
# imports instead, about 2-4 s more to import torch and ktransformers; docs/performance.md).
# Triton's own include/ stays: Triton compiles its launcher at run time against it.
# Never the toolchain: the compile stage builds against torch's headers.
slim_venv() {
  local venv="$1" sp before
  sp="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  before="$(du -sm "$sp" | cut -f1)"
  rm -rf "$sp/torch/include"
  if [ -d "$sp/nvidia" ]; then
    find "$sp/nvidia" -mindepth 2 -maxdepth 2 -type d -name include -prune -exec rm -rf {} +
  fi
  find "$sp" -path "$sp/triton" -prune -o -type f -name '*.a' -print0 | xargs -0 -r rm -f
  find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
  log "slim: headers and static libraries removed from $sp ($before -> $(du -sm "$sp" | cut -f1) MiB)"
}
