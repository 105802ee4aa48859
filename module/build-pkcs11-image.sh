#!/usr/bin/env bash
# Builds the edge-est module image that can load a PKCS#11 library: a dynamically linked
# edge-est, the glibc loader and every library it needs, and each --with file (a PKCS#11
# module, or a library such a module opens by name, e.g. a TPM TCTI) with the libraries they
# need, all at their paths on this machine, in a FROM scratch image (Dockerfile.pkcs11). For
# this machine's platform only (the libraries are this machine's).
#
#   module/build-pkcs11-image.sh --with /usr/lib/softhsm/libsofthsm2.so
#   module/build-pkcs11-image.sh --with /usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so \
#       --with /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0
#   module/build-pkcs11-image.sh --binary target/debug/edge-est --with ...   # a binary built already
#
# Without --binary it runs `cargo build --release --locked --bin edge-est` (dynamically linked:
# no crt-static). The image is <repository>:<version>-<platform>-pkcs11 (REPOSITORY, default
# edge-est; IMAGE names the whole tag). --context-only lays out module/rootfs-pkcs11/ (or
# CONTEXT_DIR, which the image build does not use) and stops.
set -euo pipefail
here=$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=${EDGE_EST_SOURCE:-$(dirname "$here")}
binary="" context_only=false
with=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift ;;
    --with) with+=("${2:?--with needs a library path}"); shift ;;
    --context-only) context_only=true ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "${#with[@]}" -gt 0 ] || { echo "name the PKCS#11 module with --with (see --help)" >&2; exit 2; }
for file in "${with[@]}"; do
  [ -f "$file" ] || { echo "$file: no such file" >&2; exit 1; }
done
if [ -n "${CONTEXT_DIR:-}" ] && ! $context_only; then
  echo "CONTEXT_DIR goes with --context-only (the image is built from module/rootfs-pkcs11)" >&2; exit 2
fi
case "$(uname -m)" in
  x86_64) platform=amd64 ;;
  aarch64) platform=arm64v8 ;;
  *) echo "unsupported machine $(uname -m)" >&2; exit 2 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)

if [ -z "$binary" ]; then
  (cd "$repo" && cargo build --release --locked --bin edge-est)
  target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps --offline 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  binary="${target_dir:-$repo/target}/release/edge-est"
fi
readelf -lW "$binary" | grep -q 'Requesting program interpreter' \
  || { echo "$binary is statically linked: it cannot load a PKCS#11 library" >&2; exit 1; }

context=${CONTEXT_DIR:-$here/rootfs-pkcs11}
rm -rf "$context"
mkdir -p "$context/data" "$context/tmp" "$context/var/run/edge-est"
install -m 0755 "$binary" "$context/edge-est"

# FILE and what the loader would load for it (ldd: "name => /path (addr)", the loader as
# "/path (addr)"), each at its path here.
copy_with_libraries() {
  local file=$1 line lib
  [ -f "$file" ] || { echo "$file: no such file" >&2; exit 1; }
  if ldd "$file" | grep -q 'not found'; then
    echo "$file needs libraries this machine lacks:" >&2; ldd "$file" | grep 'not found' >&2; exit 1
  fi
  while read -r line; do
    case "$line" in
      *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
      /*) lib=${line%% (*} ;;
      *) continue ;;
    esac
    mkdir -p "$context$(dirname "$lib")"
    cp -L "$lib" "$context$lib"
  done < <(ldd "$file")
}
copy_with_libraries "$binary"
for file in "${with[@]}"; do
  mkdir -p "$context$(dirname "$file")"
  cp -L "$file" "$context$file"
  copy_with_libraries "$file"
done
echo "context $context: $(du -sh "$context" | cut -f1), $(find "$context" -type f | wc -l) files"
$context_only && exit 0

image=${IMAGE:-$(echo "${REPOSITORY:-edge-est}:$version-$platform-pkcs11" | tr '[:upper:]' '[:lower:]')}
docker build --quiet -t "$image" -f "$here/Dockerfile.pkcs11" "$here" >/dev/null
echo "image $image ($(docker image inspect "$image" --format '{{.Size}}') bytes)"
