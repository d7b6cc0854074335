# Sourced by scripts/setup/k8s.sh and scripts/setup/node.sh: the pinned Kubernetes release,
# the Go environment (caches under ~/.cache/petl/go, shared by every Go build of the project),
# the version stamp Kubernetes' own build puts into its binaries, and a build helper.
# shellcheck shell=bash disable=SC2034 # the sourcing scripts use these

K8S_VERSION=1.36.3
STAGING_VERSION=0.36.3   # k8s.io/* staging modules are tagged v0.X.Y for Kubernetes v1.X.Y

CACHE="${PETL_CACHE_DIR:-$HOME/.cache/petl}"
K8S_DIR="$CACHE/k8s-v$K8S_VERSION"
K8S_BIN="$K8S_DIR/bin"
# The throwaway module that builds every k8s.io/kubernetes command (see k8s.sh).
K8S_MODULE="$K8S_DIR/src"
# One lock for every build that touches K8S_MODULE or K8S_BIN.
K8S_LOCK="$CACHE/k8s-setup.lock"

export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
JOBS="${PETL_BUILD_JOBS:-$(nproc)}"

# Stamp the release into the binaries as Kubernetes' own build does
# (hack/lib/version.sh); otherwise they report v0.0.0-master, which kubectl,
# helm (chart kubeVersion), the kubelet's node status and tests would all see.
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=${K8S_VERSION%%.*}"
  K8S_LDFLAGS+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$K8S_VERSION") -X $pkg.gitTreeState=clean"
  K8S_LDFLAGS+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

started=$(date +%s)
# log MESSAGE: a timestamped line on stderr, prefixed with the calling script's name.
log() { printf '[%s %4ds] %s\n' "$(basename "$0")" "$(( $(date +%s) - started ))" "$*" >&2; }

require_go() {
  command -v go >/dev/null || { echo "$(basename "$0"): 'go' not found on PATH; install Go >= 1.26" >&2; exit 1; }
}

# build_in MODULE_DIR OUT PACKAGE [LDFLAGS]: builds PACKAGE inside the throwaway module
# MODULE_DIR, writing to a temp name first so a killed build leaves no binary.
build_in() {
  local dir=$1 out=$2 pkg=$3 ldflags=${4:-"-s -w"}
  if [[ -x "$out" ]]; then
    log "$(basename "$out"): cached"
    return
  fi
  log "$(basename "$out"): building $pkg (slow on a cold cache)"
  local t0; t0=$(date +%s)
  (cd "$dir" && go build -p "$JOBS" -trimpath -ldflags="$ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  log "$(basename "$out"): built in $(( $(date +%s) - t0 ))s"
}
