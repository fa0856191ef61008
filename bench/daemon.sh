#!/usr/bin/env bash
# vpc-ipamd: start to Ready, ADD round trip with a warm pool (against host-local in the same run),
# RSS with 250 pods assigned. Needs root; installs the reference plugins if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ip >/dev/null || [ ! -x /usr/lib/cni/host-local ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containernetworking-plugins iproute2 >/dev/null
fi
cargo bench -q -p ipamd --bench daemon
