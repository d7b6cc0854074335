#!/usr/bin/env bash
# Installs what a real single Kubernetes node beside the test control plane needs
# (petl_tests::Cluster, scripts/dev-cluster.sh):
#   - Debian packages: containerd, runc, the CNI plugins, iptables, nftables (kube-proxy and its
#     --cleanup), conntrack (the node),
#     buildah and debootstrap (petl's images, scripts/setup/base-image.sh);
#   - kubelet, kube-scheduler and kube-proxy, built in scripts/setup/k8s.sh's throwaway module
#     at the same pinned release, into ~/.cache/petl/k8s-v$K8S_VERSION/bin/;
#   - CoreDNS from the Go module proxy, into ~/.cache/petl/coredns-v$COREDNS_VERSION/bin/;
#   - the pod sandbox ("pause") program, compiled from scripts/setup/pause.c.
# Idempotent: a second run with everything in place returns at once. Needs root (or sudo)
# for apt-get; the node itself runs as root.
#
# Env: PETL_CACHE_DIR (default ~/.cache/petl), PETL_BUILD_JOBS (go build -p, default nproc).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

# shellcheck source=scripts/setup/lib/k8s-build.sh
source "$here/lib/k8s-build.sh"
COREDNS_VERSION=1.15.0
# Only the plugins the node's Corefile uses (tests/src/node/dns.rs): the full CoreDNS pulls in
# every cloud provider's SDK, which makes a cold build many times slower.
COREDNS_PLUGINS=(bind errors log ready kubernetes)
COREDNS_DIR="$CACHE/coredns-v$COREDNS_VERSION"
COREDNS_BIN="$COREDNS_DIR/bin"
COREDNS_RECIPE="coredns=$COREDNS_VERSION plugins=${COREDNS_PLUGINS[*]}"
NODE_DIR="$CACHE/node"
PACKAGES=(containerd runc containernetworking-plugins iptables nftables conntrack buildah debootstrap)
# Changing what goes into a binary changes this recipe, which forces a rebuild.
NODE_RECIPE="k8s=$K8S_VERSION staging=$STAGING_VERSION ldflags=$K8S_LDFLAGS"
PAUSE_RECIPE="$(sha256sum "$here/pause.c" | cut -d' ' -f1)"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

packages_missing() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || { echo "$p"; }
  done
}

have_binaries() {
  [[ "$(cat "$K8S_BIN/.node-recipe" 2>/dev/null)" == "$NODE_RECIPE" ]] || return 1
  for b in kubelet kube-scheduler kube-proxy; do [[ -x "$K8S_BIN/$b" ]] || return 1; done
  [[ -x "$COREDNS_BIN/coredns" && "$(cat "$COREDNS_BIN/.recipe" 2>/dev/null)" == "$COREDNS_RECIPE" ]] || return 1
  [[ -x "$NODE_DIR/pause" && "$(cat "$NODE_DIR/.pause-recipe" 2>/dev/null)" == "$PAUSE_RECIPE" ]]
}

# --- Debian packages ------------------------------------------------------------
missing=$(packages_missing)
if [[ -n "$missing" ]]; then
  # containerd's maintainer scripts would start the system service; the node runs its own
  # containerd with its own root, state and socket, so forbid service starts for this install.
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    added_policy=1
  fi
  allow_services() { if [[ $added_policy -eq 1 ]]; then $SUDO rm -f "$policy"; added_policy=0; fi; }
  trap allow_services EXIT
  # One `apt-get update` per machine is enough: the stamp keeps reruns offline.
  stamp="$CACHE/apt-updated"
  # shellcheck disable=SC2086 # $missing is a list of package names
  if [[ ! -f $stamp ]] || ! apt-cache show $missing >/dev/null 2>&1; then
    log "apt-get update"
    $SUDO apt-get update -qq -o DPkg::Lock::Timeout=600
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
  fi
  log "apt-get install $(echo "$missing" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 $missing >/dev/null
  allow_services
  # Some images start services despite policy-rc.d; the node never uses the system one.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd 2>/dev/null; then
    $SUDO systemctl disable --now containerd >/dev/null 2>&1 || true
  fi
  log "installed: $(dpkg-query -W -f='${Package} ${Version}, ' "${PACKAGES[@]}")"
fi

if have_binaries; then
  log "kubelet, kube-scheduler, kube-proxy, coredns and pause present; nothing to do"
  exit 0
fi

# --- kubelet, kube-scheduler, kube-proxy ------------------------------------------
# The control plane's build resolves the throwaway module and fills the Go cache first.
bash "$here/k8s.sh"
require_go
mkdir -p "$COREDNS_BIN" "$NODE_DIR"
exec 9>"$K8S_LOCK"
flock 9
if [[ "$(cat "$K8S_BIN/.node-recipe" 2>/dev/null)" != "$NODE_RECIPE" ]]; then
  rm -f "$K8S_BIN"/{kubelet,kube-scheduler,kube-proxy}
fi
if [[ ! -f "$K8S_MODULE/.resolved-node" ]]; then
  log "resolving the node's commands in k8s.io/kubernetes v$K8S_VERSION"
  (cd "$K8S_MODULE" && go get "k8s.io/kubernetes/cmd/kubelet@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-proxy@v$K8S_VERSION") 2>&1 | tail -n 5 >&2
  touch "$K8S_MODULE/.resolved-node"
fi
build_in "$K8S_MODULE" "$K8S_BIN/kubelet" k8s.io/kubernetes/cmd/kubelet "$K8S_LDFLAGS"
build_in "$K8S_MODULE" "$K8S_BIN/kube-scheduler" k8s.io/kubernetes/cmd/kube-scheduler "$K8S_LDFLAGS"
build_in "$K8S_MODULE" "$K8S_BIN/kube-proxy" k8s.io/kubernetes/cmd/kube-proxy "$K8S_LDFLAGS"
echo "$NODE_RECIPE" >"$K8S_BIN/.node-recipe"

# --- CoreDNS ------------------------------------------------------------------------
# A main package of our own in a throwaway module, importing coremain and the chosen plugins
# (CoreDNS's documented way to pick plugins without editing its plugin.cfg).
if [[ ! -x "$COREDNS_BIN/coredns" || "$(cat "$COREDNS_BIN/.recipe" 2>/dev/null)" != "$COREDNS_RECIPE" ]]; then
  coredns_mod="$COREDNS_DIR/src"
  rm -rf "$coredns_mod" "$COREDNS_BIN/coredns"
  mkdir -p "$coredns_mod"
  {
    echo "// Package main is CoreDNS with the plugins petl's test node uses; see scripts/setup/node.sh."
    echo "package main"
    echo
    echo "import ("
    echo '	"github.com/coredns/coredns/coremain"'
    for plugin in "${COREDNS_PLUGINS[@]}"; do echo "	_ \"github.com/coredns/coredns/plugin/$plugin\""; done
    echo ")"
    echo
    echo "func main() { coremain.Run() }"
  } >"$coredns_mod/main.go"
  printf 'module petl.dev/coredns-build\n\ngo 1.26.0\n\nrequire github.com/coredns/coredns v%s\n' \
    "$COREDNS_VERSION" >"$coredns_mod/go.mod"
  log "coredns: resolving github.com/coredns/coredns v$COREDNS_VERSION (plugins: ${COREDNS_PLUGINS[*]})"
  (cd "$coredns_mod" && go mod tidy) >"$COREDNS_DIR/resolve.log" 2>&1 ||
    { tail -n 20 "$COREDNS_DIR/resolve.log" >&2; exit 1; }
  build_in "$coredns_mod" "$COREDNS_BIN/coredns" . "-s -w"
  echo "$COREDNS_RECIPE" >"$COREDNS_BIN/.recipe"
else
  log "coredns: cached"
fi

# --- pause --------------------------------------------------------------------------
# The sandbox image's only program; static, so its image needs nothing else.
if [[ ! -x "$NODE_DIR/pause" || "$(cat "$NODE_DIR/.pause-recipe" 2>/dev/null)" != "$PAUSE_RECIPE" ]]; then
  log "pause: compiling $here/pause.c"
  cc -Os -static -Wall -Werror -o "$NODE_DIR/pause.tmp" "$here/pause.c"
  strip "$NODE_DIR/pause.tmp"
  mv "$NODE_DIR/pause.tmp" "$NODE_DIR/pause"
  echo "$PAUSE_RECIPE" >"$NODE_DIR/.pause-recipe"
fi

"$K8S_BIN/kubelet" --version >&2
"$COREDNS_BIN/coredns" -version | sed -n 1p >&2
log "done: $K8S_BIN $COREDNS_BIN $NODE_DIR/pause"
