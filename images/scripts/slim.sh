# The runtime stage's cuts (sourced after lib.sh by runtime_base.sh and install_wheels.sh; never by the
# toolchain, so editing them rebuilds no build stage).

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
  log "slim: headers, static libraries and byte-code caches removed from $sp ($before -> $(du -sm "$sp" | cut -f1) MiB)"
}
