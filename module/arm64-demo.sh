#!/usr/bin/env bash
# The arm64v8 binary of the module image, cross-built on this x86_64 machine with Debian's
# toolchain, runs `edge-est demo` (a three-layer hierarchy on loopback whose middle and bottom
# layers enroll their CAs from the layer above; a child's identity, Edge CA and renewal signed
# at the bottom) under qemu-user. No Docker needed.
#
#   module/arm64-demo.sh            # builds (module/build-image.sh --platform arm64v8
#                                   # --context-only), then runs the demo under qemu-aarch64
#
# Needs: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static;
#        rustup target add aarch64-unknown-linux-gnu
set -euo pipefail
here=$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
"$here/build-image.sh" --platform arm64v8 --context-only
binary="$here/rootfs-arm64v8/edge-est"
qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
[ -n "$qemu" ] || { echo "no qemu-aarch64: apt-get install qemu-user-static" >&2; exit 2; }
readelf -hW "$binary" | grep -E 'Class|Machine'
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "running: $(basename "$qemu") $binary demo --dir $dir"
start=$(date +%s)
"$qemu" "$binary" demo --dir "$dir" | tee "$dir.out"
grep -q '^demo passed' "$dir.out" || { rm -f "$dir.out"; echo "the arm64 demo did not pass" >&2; exit 1; }
rm -f "$dir.out"
echo "arm64 demo passed under qemu-user in $(( $(date +%s) - start )) s"
