#!/usr/bin/env bash
# runtime stage, step 2: install the wheels the build made (ktransformers, flash-attn stub) from
# WHEELS, their dependencies from the wheelhouse or the index. Nothing else lands in the image:
# no source tree, no compiler.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
. "$here/torch.sh"
. "$here/slim.sh"
wheels="${1:?usage: install_wheels.sh WHEELS_DIR}"
: "${KTLEGACY_VENV:?}" "${TORCH_VERSION:?}"
py="$KTLEGACY_VENV/bin/python"

shopt -s nullglob
kt=("$wheels"/ktransformers-*.whl)
stub=("$wheels"/flash_attn-*.whl)
[ ${#kt[@]} -eq 1 ] || die "expected one ktransformers wheel in $wheels, found ${#kt[@]}"
[ ${#stub[@]} -eq 1 ] || die "expected one flash_attn (stub) wheel in $wheels, found ${#stub[@]}"
# torch stays at the pin installed in step 1; pip may not swap it for PyPI's build.
# runtime.txt: what the server imports but ktransformers' metadata does not declare.
pip_install "$py" "${kt[0]}" "${stub[0]}" "$TORCH_REQ" -r "$here/../requirements/runtime.txt"
"$py" -m pip check || die "installed packages have unmet requirements (pip check above)"
"$py" -m pip list --format=freeze >"$(dirname "$KTLEGACY_VENV")/installed.txt"
slim_venv "$KTLEGACY_VENV"
