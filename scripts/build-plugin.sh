#!/usr/bin/env bash
# Builds the vpc-cni plugin as shipped, into target/plugin/vpc-cni: statically linked, because the
# DaemonSet copies it onto the host, whose glibc may be older than the build image's (Amazon Linux 2
# has 2.26, the image 2.36), and because a process started for every pod should not spend half a
# millisecond in the dynamic loader. Arguments go to cargo (for example --locked).
set -euo pipefail
cd "$(dirname "$0")/.."
# crt-static is given to the binary's crate only: the dependencies, compiled as usual, are linked
# statically by that last step, and nothing else in the workspace is rebuilt.
cargo rustc -q --profile plugin -p vpc-cni --bin vpc-cni "$@" -- -C target-feature=+crt-static
