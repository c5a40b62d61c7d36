#!/usr/bin/env bash
# source stage, step 1: a pristine upstream tree at DEST via the library (python -m ktlegacy.core fetch-source).
# Env: KTRANSFORMERS_REF, PIP_INDEX_URL (sdist refs come from the package index).
# An sdist placed in the wheelhouse seeds the library's cache, so a --wheelhouse build fetches
# nothing over the network; the library verifies the sha256 either way.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"
dest="${1:?usage: fetch_source.sh DEST}"
py="${KTLEGACY_VENV:?}/bin/python"
: "${KTRANSFORMERS_REF:?}"

export KTLEGACY_CACHE="${KTLEGACY_CACHE:-/tmp/ktlegacy-cache}"
if have_wheelhouse; then
  mkdir -p "$KTLEGACY_CACHE"
  for sdist in "$KTLEGACY_WHEELHOUSE"/ktransformers-*.tar.gz; do
    [ -f "$sdist" ] && cp "$sdist" "$KTLEGACY_CACHE/"
  done
fi
use_ca_secret
args=(--ref "$KTRANSFORMERS_REF" --dest "$dest")
[ -n "${PIP_INDEX_URL:-}" ] && args+=(--index-url "$PIP_INDEX_URL")
"$py" -m ktlegacy.core fetch-source "${args[@]}"
rm -rf "$KTLEGACY_CACHE"
