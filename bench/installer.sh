#!/usr/bin/env bash
# The DaemonSet's installer: vpcctl as the image builds it (--no-default-features: no simulator, no
# testbed) against the full operator build, side by side: binary size and start-up (the mean of 200
# runs of `vpcctl max-pods m5.large`). Then the image's size, when an image has been built here.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vpcctl
cargo build --release -q -p vpcctl --no-default-features --target-dir target/installer
full=target/release/vpcctl
installer=target/installer/release/vpcctl

startup_ms() {
  python3 - "$1" <<'PY'
import subprocess, sys, time
binary = sys.argv[1]
subprocess.run([binary, "max-pods", "m5.large"], check=True, capture_output=True)
runs = 200
start = time.perf_counter()
for _ in range(runs):
    subprocess.run([binary, "max-pods", "m5.large"], check=True, capture_output=True)
print(f"{(time.perf_counter() - start) / runs * 1000:.2f}")
PY
}

full_size=$(stat -c %s "$full")
installer_size=$(stat -c %s "$installer")
full_ms=$(startup_ms "$full")
installer_ms=$(startup_ms "$installer")
printf '%-36s %12s %14s\n' build bytes "start-up (ms)"
printf '%-36s %12d %14s\n' "vpcctl (operator, default features)" "$full_size" "$full_ms"
printf '%-36s %12d %14s\n' "vpcctl --no-default-features (image)" "$installer_size" "$installer_ms"
python3 -c "print(f'installer/operator: size {$installer_size / $full_size:.2f}, start-up {$installer_ms / $full_ms:.2f}')"

for tool in podman docker; do
  if command -v "$tool" > /dev/null && "$tool" image exists vpc-cni-rs:0.1.0 2> /dev/null; then
    echo "image vpc-cni-rs:0.1.0 ($tool): $("$tool" image inspect vpc-cni-rs:0.1.0 --format '{{.Size}}') bytes"
    exit 0
  fi
done
echo "image: none built here (podman build -f deploy/Dockerfile -t vpc-cni-rs:0.1.0 . builds it; run this again)"
