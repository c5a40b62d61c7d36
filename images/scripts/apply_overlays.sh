#!/usr/bin/env bash
# source stage, step 2: apply the overlays for ARCH (python -m ktlegacy.core patch), then check the tree
# against what the build claims in its labels (KTRANSFORMERS_COMMIT, OVERLAY_DIGEST).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
src="${1:?usage: apply_overlays.sh SRC}"
py="${KTLEGACY_VENV:?}/bin/python"
: "${ARCH:?}"

"$py" -m ktlegacy.core patch --src "$src" --arch "$ARCH"
"$py" "$here/check_source.py" --src "$src" --arch "$ARCH" \
    --expect-commit "${KTRANSFORMERS_COMMIT:-}" --expect-digest "${OVERLAY_DIGEST:-}"
