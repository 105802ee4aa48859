#!/usr/bin/env bash
# Builds the edge-est module image for amd64 and/or arm64v8 without any container registry:
# a statically linked binary (glibc, crt-static) in a FROM scratch image, one build context per
# platform (module/rootfs-<platform>/), tagged as iotedgedev would tag it
# (<repository>:<version>-<platform>) and labelled with the right --platform.
#
#   module/build-image.sh                          # amd64: binary, context, image edge-est:<version>-amd64
#   module/build-image.sh --platform arm64v8       # arm64 (cross-compiled on an x86_64 host)
#   module/build-image.sh --platform all           # both
#   module/build-image.sh --context-only [...]     # binary and context only (no Docker needed);
#                                                  # `iotedgedev build` then builds the image
#
# The version is Cargo.toml's; module.json's tag version is rewritten to match it (the one
# version source). The binary comes from cargo's target directory (CARGO_TARGET_DIR and
# build.target-dir are honoured). Environment: REPOSITORY (default edge-est; e.g.
# myacr.azurecr.io/edge-est), IMAGE (the whole tag, one platform only).
#
# arm64 on x86_64 needs Debian's cross linker and Rust's aarch64 standard library:
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#   rustup target add aarch64-unknown-linux-gnu
# (CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER overrides the linker.)
set -euo pipefail
# -P: the real directory, so that a symlinked copy (iotedgedev's modules/edge-est -> module/)
# still finds the sources.
here=$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=${EDGE_EST_SOURCE:-$(dirname "$here")}
[ -f "$repo/Cargo.toml" ] || { echo "no Cargo.toml in $repo (set EDGE_EST_SOURCE to the edge-est sources)" >&2; exit 2; }

platforms=(amd64)
context_only=false
while [ $# -gt 0 ]; do
  case "$1" in
    --platform) shift; [ "${1:-}" = all ] && platforms=(amd64 arm64v8) || platforms=("${1:?--platform needs amd64, arm64v8 or all}") ;;
    --platform=*) v=${1#--platform=}; [ "$v" = all ] && platforms=(amd64 arm64v8) || platforms=("$v") ;;
    --context-only) context_only=true ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${IMAGE:-}" ] && [ "${#platforms[@]}" -gt 1 ]; then
  echo "IMAGE names one image: give one --platform" >&2; exit 2
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
[ -n "$version" ] || { echo "no version in $repo/Cargo.toml" >&2; exit 2; }
# module.json follows Cargo.toml (tests/module_image.rs checks that the two agree).
if ! grep -q "\"version\": \"$version\"" "$here/module.json"; then
  sed -i "s/\"version\": \"[^\"]*\"/\"version\": \"$version\"/" "$here/module.json"
  echo "module.json: tag version set to $version (from Cargo.toml)"
fi
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps --offline 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
target_dir=${target_dir:-${CARGO_TARGET_DIR:-$repo/target}}

for platform in "${platforms[@]}"; do
  case "$platform" in
    amd64) target=x86_64-unknown-linux-gnu; docker_platform=linux/amd64; machine='X86-64' ;;
    arm64v8) target=aarch64-unknown-linux-gnu; docker_platform=linux/arm64/v8; machine='AArch64' ;;
    *) echo "unsupported platform $platform (amd64, arm64v8)" >&2; exit 2 ;;
  esac
  if [ ! -d "$(rustc --print target-libdir --target "$target" 2>/dev/null)" ]; then
    echo "no Rust standard library for $target: rustup target add $target" >&2; exit 2
  fi
  host=$(rustc -vV | sed -n 's/^host: //p')
  if [ "$target" = aarch64-unknown-linux-gnu ] && [ "$host" != "$target" ]; then
    linker=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}
    command -v "$linker" >/dev/null || {
      echo "no aarch64 cross linker ($linker): apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross" >&2; exit 2; }
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=$linker
    export CC_aarch64_unknown_linux_gnu=${CC_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-gcc}
    export AR_aarch64_unknown_linux_gnu=${AR_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-ar}
  fi

  # The explicit --target keeps crt-static away from proc-macros (they must stay dynamic).
  start=$(date +%s)
  (cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" --bin edge-est)
  binary="$target_dir/$target/release/edge-est"
  # Static and of the right machine: no program interpreter, the platform's ELF machine.
  if readelf -lW "$binary" | grep -q 'Requesting program interpreter'; then
    echo "$binary is not static" >&2; exit 1
  fi
  readelf -hW "$binary" | grep -q "Machine:.*$machine" || { echo "$binary is not $machine" >&2; exit 1; }

  # The context of this platform alone: the binary, and the writable directories a non-root
  # user (10001) needs; a named volume mounted on one of them starts with its owner
  # (/var/run/edge-est: the API proxy socket).
  context="$here/rootfs-$platform"
  rm -rf "$context"
  mkdir -p "$context/data" "$context/tmp" "$context/var/run/edge-est"
  install -m 0755 "$binary" "$context/edge-est"
  echo "$platform: binary $(du -h "$binary" | cut -f1) ($binary, $(( $(date +%s) - start )) s), context $context"
  $context_only && continue

  image=${IMAGE:-$(echo "${REPOSITORY:-edge-est}:$version-$platform" | tr '[:upper:]' '[:lower:]')}
  docker build --quiet --platform "$docker_platform" -t "$image" -f "$here/Dockerfile.$platform" "$here" >/dev/null
  built=$(docker image inspect "$image" --format '{{.Os}}/{{.Architecture}}{{with .Variant}}/{{.}}{{end}}')
  case "$built" in
    "$docker_platform"|"${docker_platform%/v8}") ;;
    *) echo "$image is labelled $built, not $docker_platform" >&2; exit 1 ;;
  esac
  echo "$platform: image $image ($built, $(docker image inspect "$image" --format '{{.Size}}') bytes)"
done
