#!/usr/bin/env bash
# The tuner on the 1,000-node day (bench/bench-1000-nodes.toml, p99 ADD wait bound 2 s): the fast
# search (settings stopped as soon as they break a bound) against the exhaustive grid in the same
# run. Prints the wall time of each, the ratio of the fast search to the 30 s target and to the
# exhaustive run, and whether both recommend the same setting.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vpcctl
for mode in fast exhaustive; do
  flag=$([ "$mode" = exhaustive ] && echo --exhaustive || true)
  /usr/bin/time -f "%e %M" -o "target/tune-$mode.time" \
    ./target/release/vpcctl tune --scenario bench/bench-1000-nodes.toml --max-p99-wait 2s --json $flag \
    > "target/tune-$mode.json"
done
python3 - <<'PY'
import json
def load(mode):
    wall, kb = open(f"target/tune-{mode}.time").read().split()
    r = json.load(open(f"target/tune-{mode}.json"))
    rec = r["candidates"][r["recommended"]]["settings"] if r["recommended"] is not None else None
    return float(wall), int(kb) / 1024, rec, len(r["out_of_bounds"])
fast, full = load("fast"), load("exhaustive")
print(f"fast search:       {fast[0]:6.1f} s wall, peak RSS {fast[1]:,.0f} MiB, {fast[3]} settings stopped early")
print(f"exhaustive search: {full[0]:6.1f} s wall, peak RSS {full[1]:,.0f} MiB")
print(f"ratio to the 30 s target {fast[0] / 30:.2f} (below 1 meets it); fast / exhaustive {fast[0] / full[0]:.2f}")
print(f"same recommendation: {fast[2] == full[2]} ({fast[2]})")
if fast[2] != full[2]:
    raise SystemExit("the fast search recommends something else than the exhaustive grid")
PY
