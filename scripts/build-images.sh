#!/usr/bin/env bash
# Builds petl's runtime images from docker/Dockerfile with buildah, out of binaries already
# compiled on this machine (no registry, no Docker daemon), and writes each as an OCI archive
# that `ctr images import` loads:
#   localhost/petl-operator:TAG  localhost/petl-worker:TAG  localhost/petl-probe:TAG
#   localhost/petl-pause:PAUSE_TAG (the node's sandbox image, from scripts/setup/pause.c)
# An image is rebuilt only when its inputs changed (its binaries, the Dockerfile, the base).
# Prints the archives' paths, one a line.
#
# usage: scripts/build-images.sh --binaries DIR [--tag TAG] [--out DIR]
#   --binaries  folder with petl-operator, petl-trainer, petl, petl-snapshot-agent, petl-probe
#               (e.g. target/debug after `cargo build --bins`)
#   --tag       default: the appVersion of charts/petl-operator/Chart.yaml
#   --out       default: ~/.cache/petl/images/archives
# Needs scripts/setup/node.sh and scripts/setup/base-image.sh to have run; root (buildah).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

CACHE="${PETL_CACHE_DIR:-$HOME/.cache/petl}"
# shellcheck source=scripts/setup/lib/buildah.sh
source "$repo/scripts/setup/lib/buildah.sh"
BASE_IMAGE="localhost/petl-base:bookworm"
CC_IMAGE="localhost/petl-base-cc:bookworm"
PAUSE_BINARY="$CACHE/node/pause"
PAUSE_IMAGE="localhost/petl-pause:1.0"
DOCKERFILE="$repo/docker/Dockerfile"

binaries="" tag="" out="$CACHE/images/archives"
while [[ $# -gt 0 ]]; do
  case $1 in
    --binaries) binaries=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "build-images.sh: unknown argument $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
[[ -n $binaries ]] || { echo "build-images.sh: --binaries DIR is required" >&2; exit 2; }
if [[ -z $tag ]]; then
  tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$repo/charts/petl-operator/Chart.yaml")"
  [[ -n $tag ]] || { echo "build-images.sh: no appVersion in charts/petl-operator/Chart.yaml" >&2; exit 1; }
fi

started=$(date +%s)
log() { printf '[build-images.sh %4ds] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

for image in "$BASE_IMAGE" "$CC_IMAGE"; do
  bah inspect --type image "$image" >/dev/null 2>&1 ||
    { echo "build-images.sh: base image $image missing; run scripts/setup/base-image.sh" >&2; exit 1; }
done
[[ -x $PAUSE_BINARY ]] || { echo "build-images.sh: $PAUSE_BINARY missing; run scripts/setup/node.sh" >&2; exit 1; }

mkdir -p "$out"
exec 9>"$CACHE/images/build.lock"
flock 9

# Binaries are staged without debug info (the dev profile keeps line tables), hard-linked into
# one build context per image so buildah copies only what that image holds.
stage="$CACHE/images/stage"
rm -rf "$stage"
mkdir -p "$stage/all"
declare -A contents=(
  [operator]="petl-operator"
  [worker]="petl-trainer petl-snapshot-agent petl"
  [probe]="petl-probe"
)
for target in "${!contents[@]}"; do
  mkdir -p "$stage/$target/bin"
  for bin in ${contents[$target]}; do
    [[ -x "$binaries/$bin" ]] || { echo "build-images.sh: $binaries/$bin missing; build it first (cargo build --bins)" >&2; exit 1; }
    [[ -e "$stage/all/$bin" ]] || objcopy --strip-debug "$binaries/$bin" "$stage/all/$bin"
    ln "$stage/all/$bin" "$stage/$target/bin/$bin"
  done
done

image_id() { bah inspect --type image --format '{{.FromImageID}}' "$1"; }

# fresh ARCHIVE INPUTS: whether ARCHIVE was built from exactly INPUTS.
fresh() { [[ -f $1 && "$(cat "$1.inputs" 2>/dev/null)" == "$2" ]]; }

# save IMAGE ARCHIVE INPUTS: writes IMAGE as an uncompressed OCI archive (local use only:
# compression would cost more time than the copy it saves), then drops it from the store.
save() {
  local image=$1 archive=$2 inputs=$3
  rm -f "$archive"
  bah push --quiet --disable-compression "$image" "oci-archive:$archive.tmp:$image" >/dev/null
  mv "$archive.tmp" "$archive"
  echo "$inputs" >"$archive.inputs"
  bah rmi -f "$image" >/dev/null
}

# --- pause -------------------------------------------------------------------------------
pause_archive="$out/petl-pause-${PAUSE_IMAGE##*:}.tar"
pause_inputs="$(sha256sum "$PAUSE_BINARY" | cut -d' ' -f1)"
if ! fresh "$pause_archive" "$pause_inputs"; then
  log "$PAUSE_IMAGE: building"
  container="$(bah from scratch)"
  bah copy "$container" "$PAUSE_BINARY" /pause >/dev/null
  bah config --entrypoint '["/pause"]' --user 65535:65535 --os linux --arch amd64 "$container"
  bah commit --quiet --rm "$container" "$PAUSE_IMAGE" >/dev/null
  save "$PAUSE_IMAGE" "$pause_archive" "$pause_inputs"
fi
echo "$pause_archive"

# --- petl's images, from docker/Dockerfile -----------------------------------------------
dockerfile_sum="$(sha256sum "$DOCKERFILE" | cut -d' ' -f1)"
for target in operator worker probe; do
  image="localhost/petl-$target:$tag"
  archive="$out/petl-$target-$tag.tar"
  inputs="dockerfile=$dockerfile_sum base=$(image_id "$BASE_IMAGE") cc=$(image_id "$CC_IMAGE")"
  inputs+=" $(cd "$stage/$target/bin" && sha256sum -- * | tr -s ' ' | tr '\n' ' ')"
  if fresh "$archive" "$inputs"; then
    log "$image: up to date"
  else
    log "$image: building"
    bah bud --quiet --layers=false --target "$target" \
      --build-arg BINARIES=prebuilt --build-arg BASE="$BASE_IMAGE" --build-arg BASE_CC="$CC_IMAGE" \
      -f "$DOCKERFILE" -t "$image" "$stage/$target" >/dev/null
    save "$image" "$archive" "$inputs"
    log "$image: $(du -h "$archive" | cut -f1)"
  fi
  echo "$archive"
done
# Intermediate stages (the prebuilt binaries) leave unnamed images behind.
bah rmi --prune >/dev/null 2>&1 || true
rm -rf "$stage"
log "done"
