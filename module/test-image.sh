#!/usr/bin/env bash
# Runs the module image of each platform as a container (host network, loopback only), enrolls
# a device with curl + openssl against it, verifies the chain, checks the health probe, the
# journal on the /data volume and the non-root user, and prints the image's platform and size.
# arm64v8 runs under qemu-user (binfmt_misc with qemu-aarch64 registered, as Debian's
# qemu-user-static does on a host with systemd-binfmt).
#
#   module/test-image.sh [--platform amd64|arm64v8|all] [--require] [IMAGE]
#
# Images default to edge-est:<version>-<platform>, as module/build-image.sh tags them. Without
# a Docker engine (or, for arm64v8 on another machine, without qemu-aarch64 in binfmt_misc) it
# says SKIPPED and exits 0, or fails with --require.
set -euo pipefail
here=$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -1)
platforms=(amd64)
require=false
image_arg=
while [ $# -gt 0 ]; do
  case "$1" in
    --platform) shift; [ "${1:-}" = all ] && platforms=(amd64 arm64v8) || platforms=("${1:?}") ;;
    --platform=*) v=${1#--platform=}; [ "$v" = all ] && platforms=(amd64 arm64v8) || platforms=("$v") ;;
    --require) require=true ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) image_arg=$1 ;;
  esac
  shift
done
skip() { if $require; then echo "FAILED: $1" >&2; exit 1; else echo "SKIPPED: $1"; exit 0; fi; }
docker info >/dev/null 2>&1 || skip "no Docker engine (start dockerd, then build with module/build-image.sh)"

for platform in "${platforms[@]}"; do
  case "$platform" in
    amd64) docker_platform=linux/amd64 machine=x86_64 ;;
    arm64v8) docker_platform=linux/arm64/v8 machine=aarch64 ;;
    *) echo "unsupported platform $platform" >&2; exit 2 ;;
  esac
  image=${image_arg:-edge-est:$version-$platform}
  if [ "$(uname -m)" != "$machine" ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-$machine ]; then
    skip "$platform: this $(uname -m) host cannot run $machine binaries (apt-get install qemu-user-static; qemu-$machine must be registered in /proc/sys/fs/binfmt_misc)"
  fi
  built=$(docker image inspect "$image" --format '{{.Os}}/{{.Architecture}}{{with .Variant}}/{{.}}{{end}}') \
    || skip "no image $image (module/build-image.sh --platform $platform)"
  case "$built" in
    "$docker_platform"|"${docker_platform%/v8}") ;;
    *) echo "$image is labelled $built, not $docker_platform" >&2; exit 1 ;;
  esac

  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  work=$(mktemp -d)
  data="$work/data"
  mkdir -p "$data" && chown 10001:10001 "$data"
  name="edge-est-test-$platform-$$"
  trap 'docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

  docker run -d --name "$name" --platform "$docker_platform" --network host -v "$data:/data" \
    -e EDGE_EST_DEV_PASSWORD=image-test "$image" serve --data-dir /data --listen "127.0.0.1:$port" >/dev/null
  # Emulated, the first start (key generation) takes longer.
  for _ in $(seq 300); do
    [ -s "$data/root.pem" ] && docker exec "$name" /edge-est health --addr "127.0.0.1:$port" >/dev/null 2>&1 && break
    sleep 0.2
  done
  docker exec "$name" /edge-est health --addr "127.0.0.1:$port"

  (
    cd "$work"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key -subj "/CN=image-device-$platform" -out device.csr 2>/dev/null
    curl -s --fail-with-body --cacert data/root.pem -u estuser:image-test -H 'Content-Type: application/pkcs10' --data-binary @device.csr \
      "https://localhost:$port/.well-known/est/simpleenroll" | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem
    curl -s --fail-with-body --cacert data/root.pem "https://localhost:$port/.well-known/est/cacerts" | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem
    openssl verify -CAfile data/root.pem -untrusted chain.pem device.pem
  )
  [ "$(wc -l < "$data/journal.jsonl")" -eq 1 ] || { echo "journal does not hold the certificate" >&2; exit 1; }
  user=$(docker inspect "$name" --format '{{.Config.User}}')
  [ "$user" = "10001:10001" ] || { echo "runs as $user, not as the non-root user" >&2; exit 1; }
  echo "image $image ($built): $(docker image inspect "$image" --format '{{.Size}}') bytes, runs as $user"
  echo "image test passed: $platform"
  docker rm -f "$name" >/dev/null 2>&1 || true
  rm -rf "$work"
  trap - EXIT
done
