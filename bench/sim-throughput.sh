#!/usr/bin/env bash
# Replays the built-in 1,000-node, 24-hour scenario (over a million pod events) through the real pool engine
# and the simulated VPC, and prints pod events per second and the wall time against the 10 s target.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vpcctl
start=$(date +%s.%N)
./target/release/vpcctl simulate --scenario bench/bench-1000-nodes.toml --json > target/bench-1000-nodes.json
end=$(date +%s.%N)
python3 - "$start" "$end" <<'PY'
import json, sys
start, end = map(float, sys.argv[1:3])
r = json.load(open("target/bench-1000-nodes.json"))
wall = end - start
events = r["pod_events"]
print(f"nodes {r['nodes']}, simulated {r['simulated_secs']} s, pod events {events}, EC2 calls {sum(sum(c.values()) for c in r['ec2_calls'].values())}")
print(f"wall {wall:.2f} s, {events / wall:,.0f} pod events/s; ratio to the 10 s target: {wall / 10:.2f} (below 1 meets it)")
PY

