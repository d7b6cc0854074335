#!/usr/bin/env bash
# A local Kubernetes cluster to try petl by hand: the end-to-end tests' control plane and real
# node (containerd, kubelet, kube-scheduler, kube-proxy, CoreDNS) with petl's images loaded,
# run in the background by the petl-dev-cluster binary (tests/src/bin/). Needs root.
#
# usage: scripts/dev-cluster.sh up       start (or show) the cluster; prints the KUBECONFIG
#        scripts/dev-cluster.sh down     stop it; nothing is left behind
#        scripts/dev-cluster.sh status
# Env: PETL_CACHE_DIR (default ~/.cache/petl); the cluster's state is in $PETL_CACHE_DIR/dev-cluster.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
state="${PETL_CACHE_DIR:-$HOME/.cache/petl}/dev-cluster"
export PETL_DEV_CLUSTER_DIR="$state"
pid_file="$state/pid"
log_file="$state/cluster.log"

running() { [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

up() {
  mkdir -p "$state"
  if running; then
    echo "already running (pid $(cat "$pid_file"))"
    cat "$state/ready" 2>/dev/null || echo "still starting; log: $log_file"
    return
  fi
  echo "building petl-dev-cluster" >&2
  cargo build --manifest-path "$repo/Cargo.toml" -p petl-tests --bin petl-dev-cluster
  target="$(cargo metadata --manifest-path "$repo/Cargo.toml" --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  rm -f "$state/ready"
  # setsid: the cluster outlives this shell; its components die with it (parent-death signal).
  setsid "$target/debug/petl-dev-cluster" >"$log_file" 2>&1 </dev/null &
  echo $! >"$pid_file"
  echo "starting (pid $!, log $log_file); the first start builds images and may take minutes" >&2
  while [[ ! -f "$state/ready" ]]; do
    if ! running; then
      echo "petl-dev-cluster exited; the end of its log:" >&2
      tail -n 30 "$log_file" >&2
      rm -f "$pid_file"
      exit 1
    fi
    sleep 1
  done
  cat "$state/ready"
  echo "export KUBECONFIG=$state/kubeconfig"
}

down() {
  if ! running; then
    echo "not running"
    rm -f "$pid_file"
    return
  fi
  local pid; pid="$(cat "$pid_file")"
  kill -TERM "$pid"
  for _ in $(seq 1 120); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file"
      tail -n 3 "$log_file"
      return
    fi
    sleep 0.5
  done
  echo "petl-dev-cluster (pid $pid) did not stop within 60s; see $log_file" >&2
  exit 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if running; then cat "$state/ready" 2>/dev/null || echo "starting"; else echo "not running"; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
