#!/usr/bin/env bash
# Security groups for pods where the node makes its branches (POD_ENI_MANAGER=node): a branch pod's
# ADD with a warm branch (against a pod without groups in the same run) and with a branch to make
# (against EC2's own latency), and the EC2 calls of a 20-pod rolling update. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ip >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi
cargo bench -q -p ipamd --bench branches
