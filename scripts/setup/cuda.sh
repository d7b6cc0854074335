#!/usr/bin/env bash
# Builds the trainer with `--features cuda` on a machine without a GPU or a CUDA install
# (reference/candle-notes.md §8):
#   1. nvcc 13.0 and the headers from PyPI wheels, unpacked into a toolkit-shaped tree at
#      ${PETL_CACHE_DIR:-~/.cache/petl}/cuda/nvidia/cu13 (13.0.x: the GPU machines' R580 driver
#      cannot JIT PTX from a newer nvcc);
#   2. the runtime libraries a binary links against (cuBLAS, cuRAND, NVRTC) from PyPI wheels,
#      with unversioned symlinks, and a stub libcuda.so (the driver ships in no wheel);
#      and NCCL (the trainer's NcclCollective links libnccl through cudarc);
#   3. cargo build -p petl-trainer --features cuda (PTX for sm_90 = H100/H200).
# Idempotent: wheels and the unpacked tree are cached; cargo rebuilds only what changed.
# usage: scripts/setup/cuda.sh [extra cargo args]   env: CARGO_TARGET_DIR (default target-cuda),
#   PETL_CUDA_CARGO (default "build --release"; "check" type-checks without linking)
set -euo pipefail

cache="${PETL_CACHE_DIR:-$HOME/.cache/petl}/cuda"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cr="$cache/nvidia/cu13"
wheels=(
  "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"
  # 2.30: the release whose API cudarc's `nccl` feature (nccl-02030) was generated from.
  "nvidia-nccl-cu13==2.30.7"
)

mkdir -p "$cache/wheels"
if [ ! -x "$cr/bin/nvcc" ] || [ ! -e "$cr/lib/libcublas.so" ] || [ ! -e "$cache/nvidia/nccl/lib/libnccl.so.2" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" "${wheels[@]}"
  for w in "$cache"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cache"; done
  chmod +x "$cr"/bin/* "$cr"/nvvm/bin/* 2>/dev/null || true
fi
"$cr/bin/nvcc" --version | tail -n 2

# Linkers look for unversioned names; the wheels ship only libfoo.so.N. NCCL's wheel unpacks
# beside the toolkit tree (nvidia/nccl), so it is linked into the tree's lib first.
ln -sf "$cache/nvidia/nccl/lib/libnccl.so.2" "$cr/lib/libnccl.so.2"
for lib in cublas cublasLt curand nvrtc cudart nccl; do
  so="$(ls "$cr/lib/lib$lib.so."* 2>/dev/null | sort | head -n1 || true)"
  [ -n "$so" ] && ln -sf "$(basename "$so")" "$cr/lib/lib$lib.so"
done

# A stub driver: cudarc links -lcuda (candle enables its `dynamic-linking`). Built from the
# undefined cu* symbols of the first link attempt; at run time the real driver replaces it
# (the stub's functions return CUDA_ERROR_STUB_LIBRARY = 34).
stub_dir="$cache/stub"
mkdir -p "$stub_dir"
make_stub() { # $@: symbol names
  { for s in "$@"; do echo "int $s(void) { return 34; }"; done; } > "$stub_dir/cuda_stub.c"
  cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/cuda_stub.c"
  ln -sf libcuda.so "$stub_dir/libcuda.so.1"
}
[ -e "$stub_dir/libcuda.so" ] || make_stub cuInit

export PATH="$cr/bin:$PATH" CUDA_ROOT="$cr" CUDA_PATH="$cr" CUDA_HOME="$cr"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
# The linker finds the libraries through LIBRARY_PATH (cc turns it into -L) and cudarc's own
# link-search of $CUDA_ROOT/lib. Not through RUSTFLAGS: a changed RUSTFLAGS rebuilds every
# dependency, so the CPU build's target dir could not be reused.
export LIBRARY_PATH="$cr/lib:$stub_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
cd "$root"
read -r -a cargo_cmd <<< "${PETL_CUDA_CARGO:-build --release}"
build() { cargo "${cargo_cmd[@]}" -p petl-trainer --features cuda "$@" 2>&1 | tee "$stub_dir/build.log"; }
start=$(date +%s)
# The linker names the driver symbols the stub lacks ("undefined reference to `cuX'" from GNU
# ld, "undefined symbol: cuX" from lld, which stops after 20 errors): add them and relink until
# nothing is missing.
mapfile -t symbols < <(grep -oE "cu[A-Za-z0-9_]+\(void\)" "$stub_dir/cuda_stub.c" 2>/dev/null | sed 's/(void)//' || true)
[ "${#symbols[@]}" -gt 0 ] || symbols=(cuInit)
for attempt in 1 2 3 4 5 6 7 8; do
  build "$@" && break
  missing=$(grep -oE "(undefined reference to \`|undefined symbol: )cu[A-Za-z0-9_]+" "$stub_dir/build.log" |
    grep -oE "cu[A-Za-z0-9_]+$" | sort -u || true)
  [ -n "$missing" ] || exit 1
  [ "$attempt" -lt 8 ] || exit 1
  mapfile -t symbols < <(printf '%s\n' "${symbols[@]}" $missing | sort -u)
  echo "cuda: regenerating the libcuda stub with ${#symbols[@]} driver symbols"
  make_stub "${symbols[@]}"
done
echo "cuda: build finished in $(( $(date +%s) - start )) s (target dir $CARGO_TARGET_DIR)"
