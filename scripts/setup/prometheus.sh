#!/usr/bin/env bash
# Installs the Prometheus server binary from Debian's `prometheus` package for the
# metrics tests, which start their own instance on loopback (the package's service is not used).
# Idempotent: returns at once when /usr/bin/prometheus exists.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  echo "[prometheus.sh] $(prometheus --version 2>&1 | sed -n 1p)" >&2
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# The package's maintainer scripts try to start a system service; the tests run
# their own server on a free port, so forbid service starts for this install only.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  added_policy=1
fi
cleanup() { if [[ $added_policy -eq 1 ]]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

# One `apt-get update` per machine is enough: the stamp keeps reruns offline.
stamp="${PETL_CACHE_DIR:-$HOME/.cache/petl}/apt-updated"
if [[ ! -f $stamp ]] || ! apt-cache show prometheus >/dev/null 2>&1; then
  echo "[prometheus.sh] apt-get update" >&2
  $SUDO apt-get update -qq
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi

echo "[prometheus.sh] apt-get install prometheus" >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# Some images start services despite policy-rc.d; the tests never use it, so stop it if it runs.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "[prometheus.sh] $(prometheus --version 2>&1 | sed -n 1p)" >&2
