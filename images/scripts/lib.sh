# Shared shell helpers for the image build scripts (sourced, never run).
#
# Every network step of the build goes through here, so three things hold everywhere:
#  * a CA bundle passed as the BuildKit secret `ca_cert` is used by apt, pip and git for the
#    one RUN that mounts it, and is never copied into a layer;
#  * a wheelhouse mounted at /wheelhouse (the `wheelhouse` stage) makes pip work with
#    `--no-index --find-links` and nothing else: no network at all;
#  * PIP_INDEX_URL / TORCH_INDEX_URL / APT_MIRROR overrides reach every step (APT_COMPONENTS:
#    the Debian components read from APT_MIRROR, default main; the CUDA toolkit is in non-free).
# The same scripts run outside Docker (a GPU machine): nothing here assumes a container.

set -euo pipefail

KTLEGACY_CA_SECRET="${KTLEGACY_CA_SECRET:-/run/secrets/ca_cert}"
KTLEGACY_WHEELHOUSE="${KTLEGACY_WHEELHOUSE:-/wheelhouse}"

log() { echo "ktlegacy-build: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# Point pip, requests, OpenSSL users and git at the mounted CA bundle, if one is mounted.
use_ca_secret() {
  if [ -s "$KTLEGACY_CA_SECRET" ]; then
    export PIP_CERT="$KTLEGACY_CA_SECRET" REQUESTS_CA_BUNDLE="$KTLEGACY_CA_SECRET" \
           SSL_CERT_FILE="$KTLEGACY_CA_SECRET" GIT_SSL_CAINFO="$KTLEGACY_CA_SECRET" \
           CURL_CA_BUNDLE="$KTLEGACY_CA_SECRET"
    log "using the CA bundle secret for this step"
  fi
}

have_wheelhouse() {
  [ -d "$KTLEGACY_WHEELHOUSE" ] && [ -n "$(ls -A "$KTLEGACY_WHEELHOUSE" 2>/dev/null)" ]
}

# pip_install VENV_PYTHON ARGS... : install from the wheelhouse only (when mounted) or from the
# indexes (PIP_INDEX_URL, plus TORCH_INDEX_URL as an extra index for the +cuXXX torch builds).
pip_install() {
  local py="$1"; shift
  local args=(-m pip install --disable-pip-version-check --no-input)
  if have_wheelhouse; then
    args+=(--no-index --find-links "$KTLEGACY_WHEELHOUSE")
    log "pip: wheelhouse only (no network)"
  else
    use_ca_secret
    [ -n "${PIP_INDEX_URL:-}" ] && args+=(--index-url "$PIP_INDEX_URL")
    [ -n "${TORCH_INDEX_URL:-}" ] && args+=(--extra-index-url "$TORCH_INDEX_URL")
  fi
  "$py" "${args[@]}" "$@"
}

# apt_install PKG... : install the Debian/Ubuntu packages that are missing; a no-op (and no
# network) when all are present, which is how the stand-in base gets through.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && { log "apt: $* already present"; return 0; }
  log "apt: installing ${missing[*]}"
  local opts=(-o Acquire::Retries=3)
  if [ -s "$KTLEGACY_CA_SECRET" ]; then
    opts+=(-o "Acquire::https::CAInfo=$KTLEGACY_CA_SECRET")
  fi
  if [ -n "${APT_MIRROR:-}" ]; then
    # One mirror for everything; the vendor lists in sources.list.d (e.g. NVIDIA's CUDA repo,
    # unreachable behind most firewalls) are not needed for our packages and are ignored.
    . /etc/os-release
    local list=/tmp/ktlegacy-apt-mirror.list components="main"
    case "$ID" in
      ubuntu) components="main universe"
              printf 'deb %s %s %s\ndeb %s %s-updates %s\n' "$APT_MIRROR" "$VERSION_CODENAME" "$components" \
                     "$APT_MIRROR" "$VERSION_CODENAME" "$components" >"$list" ;;
      *)      printf 'deb %s %s %s\n' "$APT_MIRROR" "$VERSION_CODENAME" "${APT_COMPONENTS:-main}" >"$list" ;;
    esac
    opts+=(-o "Dir::Etc::SourceList=$list" -o "Dir::Etc::SourceParts=-")
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get "${opts[@]}" update -qq
  apt-get "${opts[@]}" install -y -qq --no-install-recommends "${missing[@]}"
  rm -rf /var/lib/apt/lists/* /tmp/ktlegacy-apt-mirror.list
}
