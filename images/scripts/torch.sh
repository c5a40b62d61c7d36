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
