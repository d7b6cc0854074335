# Sourced by the scripts that build images: buildah with the project's own store under
# ~/.cache/petl/images (vfs: works on any filesystem and needs no fuse-overlayfs), so images
# neither touch nor depend on the machine's /var/lib/containers.
# shellcheck shell=bash disable=SC2034 # the sourcing scripts use these

BUILDAH_ROOT="${CACHE:?}/images/storage"
BUILDAH_RUNROOT="$CACHE/images/run"

# bah ARGS...: buildah on the project's store.
bah() {
  buildah --storage-driver vfs --root "$BUILDAH_ROOT" --runroot "$BUILDAH_RUNROOT" "$@"
}
