#!/usr/bin/env bash
# Runs the module image as a container (host network, loopback only), enrolls a device with
# curl + openssl against it, verifies the chain, checks the health probe and the journal on the
# /data volume, and prints the image size. Opt-in: it needs a running Docker engine.
#
#   module/test-image.sh [IMAGE]      (default edge-est:<version>-amd64, built by build-image.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -1)
image=${1:-edge-est:$version-amd64}
if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED: no Docker engine (start dockerd, then build with module/build-image.sh)"; exit 0
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
work=$(mktemp -d)
data="$work/data"
mkdir -p "$data" && chown 10001:10001 "$data"
name="edge-est-test-$$"
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

docker run -d --name "$name" --network host -v "$data:/data" -e EDGE_EST_DEV_PASSWORD=image-test \
  "$image" serve --data-dir /data --listen "127.0.0.1:$port" >/dev/null
for _ in $(seq 50); do [ -s "$data/root.pem" ] && docker exec "$name" /edge-est health --addr "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.2; done
docker exec "$name" /edge-est health --addr "127.0.0.1:$port"

cd "$work"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key -subj /CN=image-device -out device.csr 2>/dev/null
curl -sf --cacert data/root.pem -u estuser:image-test -H 'Content-Type: application/pkcs10' --data-binary @device.csr \
  "https://localhost:$port/.well-known/est/simpleenroll" | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem
curl -sf --cacert data/root.pem "https://localhost:$port/.well-known/est/cacerts" | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem
openssl verify -CAfile data/root.pem -untrusted chain.pem device.pem
[ "$(wc -l < data/journal.jsonl)" -eq 1 ] || { echo "journal does not hold the certificate" >&2; exit 1; }
user=$(docker exec "$name" /edge-est health --addr "127.0.0.1:$port" >/dev/null && docker inspect "$name" --format '{{.Config.User}}')
[ "$user" = "10001:10001" ] || { echo "runs as $user, not as the non-root user" >&2; exit 1; }
echo "image $image: $(docker image inspect "$image" --format '{{.Size}}') bytes, runs as $user"
echo "image test passed"
