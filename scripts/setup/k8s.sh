#!/usr/bin/env bash
# Builds the local Kubernetes control plane used by petl's operator tests:
# etcd, kube-apiserver, kube-controller-manager, kubectl and helm, from the Go
# module proxy (no download sites, no container registry), into
#   ~/.cache/petl/k8s-v$K8S_VERSION/bin/   and   ~/.cache/petl/helm-v$HELM_VERSION/bin/
# Idempotent: a second run with everything built returns at once.
#
# Env: PETL_CACHE_DIR (default ~/.cache/petl), PETL_BUILD_JOBS (go build -p, default nproc).
set -euo pipefail

# shellcheck source=scripts/setup/lib/k8s-build.sh
source "$(dirname "$0")/lib/k8s-build.sh"
ETCD_VERSION=3.6.8       # the etcd that k8s.io/kubernetes v1.36.3 requires in its go.mod
HELM_VERSION=3.22.0

HELM_DIR="$CACHE/helm-v$HELM_VERSION"
HELM_BIN="$HELM_DIR/bin"
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
# Changing what goes into a binary changes this recipe, which forces a rebuild.
RECIPE="k8s=$K8S_VERSION staging=$STAGING_VERSION etcd=$ETCD_VERSION ldflags=$K8S_LDFLAGS"

have_all() {
  [[ "$(cat "$K8S_BIN/.recipe" 2>/dev/null)" == "$RECIPE" ]] || return 1
  for b in etcd kube-apiserver kube-controller-manager kubectl; do
    [[ -x "$K8S_BIN/$b" ]] || return 1
  done
  [[ -x "$HELM_BIN/helm" ]]
}

if have_all; then
  log "all binaries present in $K8S_BIN and $HELM_BIN; nothing to do"
  exit 0
fi

require_go
mkdir -p "$K8S_BIN" "$HELM_BIN" "$GOMODCACHE" "$GOCACHE"

# Serialise concurrent runs (several test binaries may call this at once).
exec 9>"$K8S_LOCK"
flock 9
if have_all; then
  log "another run finished the build meanwhile; nothing to do"
  exit 0
fi
if [[ "$(cat "$K8S_BIN/.recipe" 2>/dev/null)" != "$RECIPE" ]]; then
  # Built by an older version of this script: rebuild (the Go cache keeps it quick).
  rm -f "$K8S_BIN"/{etcd,kube-apiserver,kube-controller-manager,kubectl}
fi

# --- Kubernetes -------------------------------------------------------------
# k8s.io/kubernetes replaces its staging modules with ./staging paths, which
# `go install pkg@version` refuses; a throwaway module pins them to their
# published v0.X.Y tags instead.
k8s_mod="$K8S_MODULE"
if [[ ! -f "$k8s_mod/.resolved" ]]; then
  log "resolving k8s.io/kubernetes v$K8S_VERSION"
  mkdir -p "$k8s_mod"
  kmod=$(cd "$k8s_mod" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module petl.dev/k8s-build"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 v'"$STAGING_VERSION"'#p' "$kmod"
    echo ")"
  } >"$k8s_mod/go.mod"
  cat >"$k8s_mod/tools.go" <<'EOF'
//go:build tools

// Package tools only anchors the module; the binaries are built by path.
package tools
EOF
  (cd "$k8s_mod" && go get "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@v$K8S_VERSION") 2>&1 | tail -n 5 >&2
  touch "$k8s_mod/.resolved"
fi
build_in "$k8s_mod" "$K8S_BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$K8S_LDFLAGS"
build_in "$k8s_mod" "$K8S_BIN/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_LDFLAGS"
build_in "$k8s_mod" "$K8S_BIN/kubectl" k8s.io/kubernetes/cmd/kubectl "$K8S_LDFLAGS"

# --- etcd ---------------------------------------------------------------------
# go.etcd.io/etcd/server/v3 also carries replace directives (../api, ../pkg, ...),
# so it gets the same treatment: pin its sibling modules to the same tag.
etcd_mod="$K8S_DIR/etcd-src"
if [[ ! -f "$etcd_mod/.resolved" ]]; then
  log "resolving go.etcd.io/etcd/server/v3 v$ETCD_VERSION"
  mkdir -p "$etcd_mod"
  cat >"$etcd_mod/go.mod" <<EOF
module petl.dev/etcd-build

go 1.24.0

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 v$ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 v$ETCD_VERSION
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 v$ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 v$ETCD_VERSION
)
EOF
  (cd "$etcd_mod" && go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION") 2>&1 | tail -n 5 >&2
  touch "$etcd_mod/.resolved"
fi
build_in "$etcd_mod" "$K8S_BIN/etcd" go.etcd.io/etcd/server/v3
echo "$RECIPE" >"$K8S_BIN/.recipe"

# --- helm -----------------------------------------------------------------------
# helm.sh/helm/v3 has no replace directives, so plain `go install` works.
if [[ ! -x "$HELM_BIN/helm" ]]; then
  log "helm: building helm.sh/helm/v3 v$HELM_VERSION"
  t0=$(date +%s)
  GOBIN="$HELM_BIN" GOFLAGS=-buildvcs=false go install -p "$JOBS" -trimpath -ldflags="$HELM_LDFLAGS" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  log "helm: built in $(( $(date +%s) - t0 ))s"
else
  log "helm: cached"
fi

"$K8S_BIN/kube-apiserver" --version >&2
"$K8S_BIN/etcd" --version | sed -n 1p >&2  # sed reads all: no SIGPIPE under pipefail
"$HELM_BIN/helm" version --short >&2
log "done: $K8S_BIN $HELM_BIN"
