#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or an old one: installs what it needs, then runs everything.
# Idempotent: a second run reuses the venv and the build.
set -euo pipefail
cd "$(dirname "$0")/.."

# The datapath and plugin tests run real namespaces, nftables, the reference CNI plugins, containerd
# and podman. Installed once; tests that still lack one say SKIPPED and why.
need_packages=()
command -v cc >/dev/null || need_packages+=(gcc)
command -v readelf >/dev/null || need_packages+=(binutils)
command -v ip >/dev/null || need_packages+=(iproute2)
command -v nft >/dev/null || need_packages+=(nftables)
command -v conntrack >/dev/null || need_packages+=(conntrack)
command -v iptables >/dev/null || need_packages+=(iptables)
command -v nsenter >/dev/null || need_packages+=(util-linux)
[ -x /usr/lib/cni/portmap ] || need_packages+=(containernetworking-plugins)
command -v containerd >/dev/null || need_packages+=(containerd)
command -v runc >/dev/null || need_packages+=(runc)
command -v podman >/dev/null || need_packages+=(podman)
# The test containers' root filesystem is one static busybox.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then need_packages+=(busybox-static); fi
if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
  need_packages+=(python3 python3-venv)
fi
if [ ${#need_packages[@]} -gt 0 ]; then
  echo "== installing ${need_packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo is required (the machine's Rust toolchain)" >&2
  exit 1
fi

# moto ships EC2's DescribeInstanceTypes data, from which the instance-limits table is generated.
# kubernetes-validate checks the rendered manifests against the Kubernetes schemas offline.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import moto, kubernetes_validate' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q 'moto[server]>=5.1,<6' 'kubernetes-validate>=1.31'
fi

echo "== instance-limits table matches DescribeInstanceTypes data"
.venv/bin/python scripts/gen-instance-limits.py --check

# Incremental state only helps edit-compile loops; on a CI disk it is gigabytes of nothing.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

echo "== cargo fmt and clippy"
cargo fmt --all -- --check
cargo clippy -q --all-targets -- -D warnings
# The image's installer build (deploy/Dockerfile) leaves vpcctl's `lab` feature out.
cargo clippy -q -p vpcctl --no-default-features -- -D warnings

# The plugin tests run the binary as shipped; it must need no shared library from the host.
echo "== the shipped plugin (scripts/build-plugin.sh) is statically linked"
scripts/build-plugin.sh
export VPC_CNI_PLUGIN="$PWD/target/plugin/vpc-cni"
if readelf -lW "$VPC_CNI_PLUGIN" | grep -q INTERP || readelf -dW "$VPC_CNI_PLUGIN" | grep -q NEEDED; then
  echo "scripts/test.sh: $VPC_CNI_PLUGIN is dynamically linked:" >&2
  readelf -dW "$VPC_CNI_PLUGIN" | grep NEEDED >&2 || true
  exit 1
fi

echo "== tests"
# Every test binary runs even after one fails, so a run names every failure at once.
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
status=${PIPESTATUS[0]}
set -e
# The control loop's tests need no root (issue 17): as root, run them again as nobody to prove it.
if [ "$(id -u)" = 0 ] && command -v runuser > /dev/null && id nobody > /dev/null 2>&1; then
  echo "== the control loop's tests as an unprivileged user"
  control_tests=$(cargo test -q --workspace --test control --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "control"][0])')
  # A copy nobody can reach wherever the clone lives (a home directory may be closed to others).
  unprivileged=$(mktemp -d)
  install -m 0755 "$control_tests" "$unprivileged/control"
  chmod 0755 "$unprivileged"
  log="$PWD/target/test.log"
  if ! (cd "$unprivileged" && runuser -u nobody -- ./control 2>&1 | tee -a "$log"); then
    status=1
  fi
  rm -rf "$unprivileged"
fi
echo "== summary (target/ holds $(du -sh target | cut -f1))"
python3 - <<'PY'
import re
passed = failed = ignored = 0
failures = []
for line in open("target/test.log"):
    m = re.match(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", line)
    if m:
        passed += int(m[1]); failed += int(m[2]); ignored += int(m[3])
    m = re.match(r"test (\S+) \.\.\. FAILED", line)
    if m:
        failures.append(m[1])
skipped = sum(1 for line in open("target/test.log") if line.startswith("SKIPPED"))
for name in failures:
    print(f"FAILED: {name}")
print(f"{passed} passed, {failed} failed, {ignored} ignored; {skipped} of the passed skipped their body (see SKIPPED lines)")
PY
if [ "$status" -ne 0 ]; then
  echo "scripts/test.sh: cargo test exited with $status" >&2
  exit "$status"
fi
