#!/usr/bin/env bash
# The local demo: builds the binaries and runs `vpcctl demo` (the simulated VPC over HTTP, node
# namespaces with the real vpc-ipamd, pods wired by the real plugin, traffic between them).
# Needs root; installs iproute2 and nftables when missing. Arguments go to `vpcctl demo`
# (--pods N, --nodes K, --prefix-delegation, --custom-networking, --instance-type T, --vpc FILE,
# --set KEY=VALUE, --keep, --json, --ipv6).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/demo.sh: the demo creates network namespaces and nftables rules: run it as root (sudo scripts/demo.sh)" >&2
  exit 1
fi
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release -q -p vpcctl -p ipamd -p vpc-cni
status=0
target/release/vpcctl demo "$@" || status=$?
# On stderr: with --json, stdout is the report alone.
echo "vpcctl is $PWD/target/release/vpcctl; to run it as \`vpcctl\`: export PATH=\"$PWD/target/release:\$PATH\"" >&2
exit "$status"
