#!/usr/bin/env bash
# The simulator at 10,000 nodes: a churn day ten times wider than churn-day-1000, against the
# 1,000-node day in the same run. Prints wall time, pod events per second and peak RSS of each, and
# the ratios to the targets (10,000 nodes: under 30 s and 4 GiB). Per-event cost should not grow
# with the number of nodes: compare the two events-per-second figures (pod events and EC2 calls).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vpcctl
run() {
  /usr/bin/time -f "%e %M" -o target/sim-time.txt ./target/release/vpcctl simulate --scenario "$1" --json > target/sim-report.json
  python3 - "$2" <<'PY'
import json, sys
label = sys.argv[1]
wall, kb = open("target/sim-time.txt").read().split()
wall, rss = float(wall), int(kb) / 1024
r = json.load(open("target/sim-report.json"))
events = r["pod_events"]
calls = sum(sum(c.values()) for c in r["ec2_calls"].values())
print(f"{label}: {r['nodes']} nodes, {events:,} pod events, wall {wall:.1f} s, {events / wall:,.0f} pod events/s, peak RSS {rss:,.0f} MiB")
# Thousands of nodes share the account's buckets, so each pod event costs more EC2 calls (most of
# them throttled) the wider the cluster: the cost per simulated event, pod event or EC2 call, is
# what must not grow.
print(f"  {calls:,} EC2 calls ({calls / events:.2f} per pod event); {(events + calls) / wall:,.0f} events/s (pod events and EC2 calls)")
if r["nodes"] >= 10000:
    print(f"  ratio to the targets: wall {wall / 30:.2f} (30 s), RSS {rss / 4096:.2f} (4 GiB); below 1 meets them")
PY
}
run crates/sim/scenarios/churn-day-1000.toml "churn-day-1000 "
run bench/bench-10000-nodes.toml "churn-day-10000"
