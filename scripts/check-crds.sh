#!/usr/bin/env bash
# Regenerates the PetlJob CRD from the Rust types and fails, showing the diff, when the chart's
# committed copy differs. `scripts/check-crds.sh --write` refreshes the committed copy instead.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
committed="$root/charts/petl-operator/crds/petljobs.petl.dev.yaml"

# Build crdgen with the whole workspace's feature set so CI reuses the test build instead of
# compiling k8s-openapi a second time with another feature set.
crdgen() {
  cargo build --quiet --manifest-path "$root/Cargo.toml" --workspace --bin crdgen
  local target
  target=$(cargo metadata --quiet --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  "$target/debug/crdgen" "$@"
}

if [[ "${1:-}" == "--write" ]]; then
  crdgen "$committed"
  echo "wrote $committed"
  exit 0
fi

fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
crdgen "$fresh"
if [[ ! -f "$committed" ]]; then
  echo "check-crds: $committed is missing; run scripts/check-crds.sh --write and commit it" >&2
  exit 1
fi
if ! diff -u "$committed" "$fresh"; then
  echo "check-crds: $committed is stale (diff above: committed → generated);" \
       "run scripts/check-crds.sh --write and commit the result" >&2
  exit 1
fi
echo "check-crds: $committed is up to date"
