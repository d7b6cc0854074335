#!/usr/bin/env bash
# Regenerates the PetlJob CRD from the Rust types and fails, showing the diff, when the chart's
# committed copy differs. `scripts/check-crds.sh --write` refreshes the committed copy instead.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
committed="$root/charts/petl-operator/crds/petljobs.petl.dev.yaml"

if [[ "${1:-}" == "--write" ]]; then
  cargo run --quiet --manifest-path "$root/Cargo.toml" -p petl-crds --bin crdgen -- "$committed"
  echo "wrote $committed"
  exit 0
fi

fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
cargo run --quiet --manifest-path "$root/Cargo.toml" -p petl-crds --bin crdgen -- "$fresh"
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
