#!/usr/bin/env bash
# Makes the base images petl's runtime images are built on where no registry can be reached,
# from Debian's own archive with debootstrap, and imports them into buildah's store
# (~/.cache/petl/images/storage, vfs driver):
#   localhost/petl-base:bookworm     Debian 12 minbase, trimmed (docs, man pages, locales, apt
#                                    lists): the worker images (docker/Dockerfile's BASE)
#   localhost/petl-base-cc:bookworm  only glibc, libgcc and the users root and nonroot (65532):
#                                    the operator image (BASE_CC), like distroless/cc-debian12
# The root filesystems are cached as tarballs under ~/.cache/petl/images/; idempotent: a second
# run with both images in the store returns at once. Needs root (debootstrap, buildah).
#
# Env: PETL_CACHE_DIR (default ~/.cache/petl), PETL_DEBIAN_MIRROR (default: the first URI in
# /etc/apt/sources.list.d/debian.sources, else http://deb.debian.org/debian).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

CACHE="${PETL_CACHE_DIR:-$HOME/.cache/petl}"
IMAGES="$CACHE/images"
SUITE=bookworm
BASE_IMAGE="localhost/petl-base:$SUITE"
CC_IMAGE="localhost/petl-base-cc:$SUITE"
CC_PACKAGES=(libc6 libgcc-s1)
# What goes into the images; a change forces a rebuild. Bump the revision when changing the
# trimming or the cc base's extra files below.
RECIPE="suite=$SUITE variant=minbase cc=${CC_PACKAGES[*]} revision=1"
# shellcheck source=scripts/setup/lib/buildah.sh
source "$here/lib/buildah.sh"

started=$(date +%s)
log() { printf '[base-image.sh %4ds] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

have_images() {
  [[ "$(cat "$IMAGES/.base-recipe" 2>/dev/null)" == "$RECIPE" ]] &&
    bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 &&
    bah inspect --type image "$CC_IMAGE" >/dev/null 2>&1
}

for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "base-image.sh: '$tool' not found; run scripts/setup/node.sh first" >&2; exit 1; }
done
mkdir -p "$IMAGES"
if have_images; then
  log "$BASE_IMAGE and $CC_IMAGE present; nothing to do"
  exit 0
fi
exec 9>"$IMAGES/base.lock"
flock 9
if have_images; then
  log "another run made the images meanwhile; nothing to do"
  exit 0
fi

# --- the root filesystems --------------------------------------------------------------
base_tar="$IMAGES/petl-base-$SUITE.tar"
cc_tar="$IMAGES/petl-base-cc-$SUITE.tar"
if [[ "$(cat "$IMAGES/.base-tar-recipe" 2>/dev/null)" != "$RECIPE" || ! -f $base_tar || ! -f $cc_tar ]]; then
  mirror="${PETL_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  work="$(mktemp -d "$IMAGES/.rootfs-XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  log "debootstrap --variant=minbase $SUITE from $mirror (a few minutes)"
  mkdir -p "$IMAGES/debs"
  # The downloaded packages are kept, so a change to this script does not fetch them again.
  debootstrap --variant=minbase --cache-dir="$IMAGES/debs" "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }

  # Trim what a container never reads; the package database stays, so apt still works.
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* \
    "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/var/cache/debconf/*-old
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar --numeric-owner -C "$root" -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"

  # The cc base: the files of libc6 and libgcc-s1, base-files' os-release, the
  # merged-/usr links, a /tmp, and passwd/group with nonroot (65532).
  cc="$work/cc"
  mkdir -p "$cc/etc" "$cc/tmp" "$cc/home/nonroot"
  chmod 1777 "$cc/tmp"
  chown 65532:65532 "$cc/home/nonroot"
  for link in bin lib lib64 sbin; do
    [[ -L "$root/$link" ]] && cp -P "$root/$link" "$cc/$link"
  done
  {
    for pkg in "${CC_PACKAGES[@]}"; do
      dpkg-query --admindir="$root/var/lib/dpkg" -L "$pkg"
    done
    echo /etc/os-release
    echo /usr/lib/os-release
  } | while read -r path; do
    # Resolve the merged-/usr directory links (relative, so they resolve inside $root).
    real="$(readlink -f "$root$(dirname "$path")")/$(basename "$path")"
    if [[ -f "$real" || -L "$real" ]] && [[ ! -d "$real" ]]; then echo "${real#"$root"/}"; fi
  done | sort -u >"$work/cc-files"
  tar --numeric-owner -C "$root" --no-recursion -cf - -T "$work/cc-files" | tar -C "$cc" -xf -
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$cc/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$cc/etc/group"
  tar --numeric-owner -C "$cc" -cf "$cc_tar.tmp" .
  mv "$cc_tar.tmp" "$cc_tar"
  echo "$RECIPE" >"$IMAGES/.base-tar-recipe"
  log "root filesystems: $(du -h "$base_tar" | cut -f1) base, $(du -h "$cc_tar" | cut -f1) cc"
fi

# --- import into buildah ----------------------------------------------------------------
# import TAR IMAGE: one layer holding TAR, no command (the Dockerfiles set their own).
import() {
  local tar=$1 image=$2 container
  bah rmi -f "$image" >/dev/null 2>&1 || true
  container="$(bah from scratch)"
  bah add "$container" "$tar" / >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --os linux --arch amd64 "$container"
  bah commit --quiet --rm "$container" "$image" >/dev/null
  log "$image: $(bah inspect --type image --format '{{.FromImageID}}' "$image" | cut -c1-12)"
}
import "$base_tar" "$BASE_IMAGE"
import "$cc_tar" "$CC_IMAGE"
echo "$RECIPE" >"$IMAGES/.base-recipe"
log "done"
