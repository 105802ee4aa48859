#!/usr/bin/env bash
# Builds the edge-est module image without any container registry: a statically linked
# binary (glibc, crt-static) in a FROM scratch image.
#
#   module/build-image.sh                 # binary, context and image edge-est:0.1.0-amd64
#   module/build-image.sh --context-only  # binary and context (module/rootfs) only
#
# Environment: TARGET (default x86_64-unknown-linux-gnu), IMAGE (default edge-est:<version>-amd64).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
target=${TARGET:-x86_64-unknown-linux-gnu}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
case "$target" in
  x86_64-*) platform=amd64 ;;
  aarch64-*) platform=arm64v8 ;;
  *) echo "unsupported TARGET $target" >&2; exit 2 ;;
esac
image=${IMAGE:-edge-est:$version-$platform}

# The explicit --target keeps crt-static away from proc-macros (they must stay dynamic).
(cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" --bin edge-est)
binary="$repo/target/$target/release/edge-est"
if ldd "$binary" 2>&1 | grep -q '=>'; then
  echo "$binary is not static" >&2; exit 1
fi

# rootfs: the binary, and the writable directories a non-root user (10001) needs; a named
# volume mounted on one of them starts with its owner (/var/run/edge-est: the API proxy socket).
rm -rf "$here/rootfs"
mkdir -p "$here/rootfs/data" "$here/rootfs/tmp" "$here/rootfs/var/run/edge-est"
install -m 0755 "$binary" "$here/rootfs/edge-est"
echo "binary: $(du -h "$binary" | cut -f1) ($binary)"
[ "${1:-}" = "--context-only" ] && exit 0

docker build --quiet -t "$image" -f "$here/Dockerfile.$platform" "$here"
docker image inspect "$image" --format 'image: {{.RepoTags}} {{.Size}} bytes'
