#!/usr/bin/env bash
# NetworkPolicy at a busy node's scale: 250 local pods, 2,500 pods, 1,000 policies. Prints how long
# evaluating, rendering and applying the table take. Then end to end through the real daemon and
# plugin: the ADD with policies against without, a policy change to its rules in the kernel (p50,
# p99), TCP connections per second with 500 rules against none. Needs root; installs nftables if
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null
fi
cargo bench -q -p datapath --bench netpol_table
# The plugin and the daemon in release, for the end-to-end figures.
cargo build -q --release --bins
cargo bench -q -p ipamd --bench netpol
