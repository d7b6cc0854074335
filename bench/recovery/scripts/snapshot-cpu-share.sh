#!/usr/bin/env bash
# The share of a 2-rank LST job's CPU that snapshotting takes, with a snapshot every step:
# `perf record` samples every process of `petl run` (launcher, ranks, agents); over the window in
# which snapshots are taken (first to last sample of a snapshot thread), the samples of the
# ranks' snapshot threads (`petl-snapshot-*`) and of the agent processes (the ones running tokio,
# which no rank does), against all of the job's samples. Other load on the machine slows the job
# but barely changes these shares, which wall-clock step times cannot say on a busy machine.
#
#   bench/recovery/scripts/snapshot-cpu-share.sh [petl binary] [steps]
# Needs perf (Debian: linux-perf) and permission to use it (root, or perf_event_paranoid ≤ 1).
set -euo pipefail
petl="${1:-target/release/petl}"
steps="${2:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed -e "s/maxSteps: 120/maxSteps: $steps/" -e 's|^  workers:|  snapshot: { everySteps: 1 }\n  workers:|' \
  "$here/../../../examples/lst-minilm-2-ranks.yaml" > "$work/job.yaml"
perf record -q -F 199 -o "$work/perf.data" -- "$petl" run "$work/job.yaml" --output "$work/out" \
  > "$work/run.log" 2>&1 || { tail -20 "$work/run.log"; exit 1; }
perf script -i "$work/perf.data" -F comm,pid,time 2>/dev/null > "$work/samples.txt"
python3 - "$work/samples.txt" <<'PY'
import sys
rows = []
for line in open(sys.argv[1]):
    *comm, pid, t = line.split()
    rows.append((" ".join(comm), int(pid), float(t.rstrip(":"))))
snap = [t for c, _, t in rows if c.startswith("petl-snapshot")]
if not snap:
    sys.exit("no snapshot thread was sampled: did the job snapshot?")
t0, t1 = min(snap), max(snap)
window = [r for r in rows if t0 <= r[2] <= t1]
ranks = {p for c, p, _ in window if c.startswith("petl-compute")}
agents = {p for c, p, _ in window if c.startswith("tokio-rt-worker")} - ranks
threads = sum(1 for c, _, _ in window if c.startswith("petl-snapshot"))
agent = sum(1 for _, p, _ in window if p in agents)
print(f"window {t1 - t0:.1f} s, {len(window)} samples of the job; ranks {sorted(ranks)}, agents {sorted(agents)}")
print(f"  ranks' snapshot threads {threads} ({100 * threads / len(window):.2f} %), agents {agent} ({100 * agent / len(window):.2f} %)")
print(f"  snapshotting: {100 * (threads + agent) / len(window):.2f} % of the job's CPU (target < 2 %)")
PY
