#!/usr/bin/env bash
# ADD and DEL latency of the vpc-cni plugin against Debian's ptp + host-local, 100 pods each, same run,
# and of its IPv6 pods (with v4if0) against its IPv4 ones.
# Needs root; installs the reference plugins if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/lib/cni/ptp ] || ! command -v ip >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containernetworking-plugins iproute2 >/dev/null
fi
# Ours as shipped (statically linked, profile `plugin`), not the bench profile's build.
scripts/build-plugin.sh
VPC_CNI_PLUGIN="$PWD/target/plugin/vpc-cni" cargo bench -q -p vpc-cni --bench plugin_latency
