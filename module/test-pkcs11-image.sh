#!/usr/bin/env bash
# Runs the PKCS#11 module image (module/build-pkcs11-image.sh --with
# /usr/lib/softhsm/libsofthsm2.so) as a container with the issuing CA key in a SoftHSM2 token
# mounted from the host, as an operator would: the token directory owned by a group the
# container joins (--group-add), not by the container's user; the PIN in a file
# (pin-source=file:). Enrolls a device with curl + openssl and verifies the chain; then checks
# that the container without the group cannot use the token, and that a wrong PIN stops it at
# start with the PIN kept out of its log.
#
#   module/test-pkcs11-image.sh [--require] [IMAGE]
#
# The key is made with openssl and imported into the token with softhsm2-util (then the file is
# deleted); tests/pkcs11.rs checks keys generated in the token. Needs Docker, softhsm2, curl,
# openssl and a built edge-est (target/debug or target/release) for hash-password. Without a
# Docker engine it says SKIPPED and exits 0, or fails with --require.
set -euo pipefail
here=$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -1)
case "$(uname -m)" in x86_64) platform=amd64 ;; aarch64) platform=arm64v8 ;; *) platform=$(uname -m) ;; esac
require=false image=edge-est:$version-$platform-pkcs11
while [ $# -gt 0 ]; do
  case "$1" in
    --require) require=true ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) image=$1 ;;
  esac
  shift
done
skip() { if $require; then echo "FAILED: $1" >&2; exit 1; else echo "SKIPPED: $1"; exit 0; fi; }
docker info >/dev/null 2>&1 || skip "no Docker engine"
docker image inspect "$image" >/dev/null 2>&1 || skip "no image $image (module/build-pkcs11-image.sh)"
command -v softhsm2-util >/dev/null || skip "no softhsm2-util (apt-get install softhsm2)"
edge_est=""
for b in "$here/../target/release/edge-est" "$here/../target/debug/edge-est"; do
  [ -x "$b" ] && edge_est=$b && break
done
[ -n "$edge_est" ] || skip "no edge-est binary to hash the password with (cargo build)"

pin=7731-image-pin
group=4242   # the token's group on the host; the container joins it
work=$(mktemp -d)
names=()
cleanup() { for n in "${names[@]}"; do docker rm -f "$n" >/dev/null 2>&1 || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
mkdir tokens config secrets
# SoftHSM's configuration as the container sees it (/tokens); the host's points at ./tokens.
printf 'directories.tokendir = /tokens\nobjectstore.backend = file\nlog.level = ERROR\n' > config/softhsm2.conf
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" > host-softhsm2.conf
export SOFTHSM2_CONF=$work/host-softhsm2.conf
softhsm2-util --init-token --free --label edge-est-ca --pin "$pin" --so-pin so-0000 >/dev/null

# The PKI: a root, the issuing CA (key into the token), the TLS server (key file).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout root.key -subj "/CN=image root" \
  -days 30 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -out config/root.pem 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out issuing.key 2>/dev/null
openssl req -new -key issuing.key -subj "/CN=image token issuing CA" -out issuing.csr
openssl x509 -req -in issuing.csr -CA config/root.pem -CAkey root.key -CAcreateserial -days 30 -out issuing.pem \
  -extfile <(printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n') 2>/dev/null
cat issuing.pem config/root.pem > config/issuing-ca.pem
softhsm2-util --import issuing.key --token edge-est-ca --label issuing-ca --id 01 --pin "$pin" >/dev/null
rm -f issuing.key
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout config/server.key -subj /CN=localhost -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA config/root.pem -CAkey root.key -CAcreateserial -days 30 -out config/server.pem \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') 2>/dev/null
printf '%s\n' "$pin" > secrets/hsm-pin
printf 'wrong-4242\n' > secrets/wrong-pin
hash=$(printf 'image-test' | "$edge_est" hash-password)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > config/edge-est.toml <<TOML
listen = "127.0.0.1:$port"
journal = "/data/journal.jsonl"
pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"
[tls]
certificate = "server.pem"
key = "server.key"
[users]
estuser = "$hash"
[issuers.plant]
certificate = "issuing-ca.pem"
key = "pkcs11:token=edge-est-ca;object=issuing-ca?pin-source=file:/run/secrets/hsm-pin"
[[labels]]
issuer = "plant"
client_trust = ["issuer"]
[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
TOML
sed 's|/run/secrets/hsm-pin|/run/secrets/wrong-pin|' config/edge-est.toml > config/wrong-pin.toml

# Permissions as on a gateway: the token directory read-write for the token's group (SoftHSM
# takes locks in it) and the PIN readable by it, nothing for others; the configuration and
# certificates are not secret.
mkdir -p data
chown -R root:$group tokens secrets
chown 10001:10001 data
chmod -R u=rwX,g=rwX,o= tokens
chmod -R u=rwX,g=rX,o= secrets
chmod -R a+rX config
chmod g+s tokens $(find tokens -type d)

run() { # NAME, then docker run arguments before the image, then the command
  local name=$1; shift
  names+=("$name")
  docker run -d --name "$name" --network host \
    -v "$work/tokens:/tokens" -v "$work/config:/config:ro" -v "$work/secrets:/run/secrets:ro" -v "$work/data:/data" \
    -e SOFTHSM2_CONF=/config/softhsm2.conf "$@" >/dev/null
}
run ok --group-add $group "$image" serve --config /config/edge-est.toml
for _ in $(seq 150); do
  docker exec ok /edge-est health --addr "127.0.0.1:$port" >/dev/null 2>&1 && break
  [ "$(docker inspect ok --format '{{.State.Running}}')" = true ] || { docker logs ok >&2; echo "the container stopped" >&2; exit 1; }
  sleep 0.2
done
docker exec ok /edge-est health --addr "127.0.0.1:$port"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key -subj "/CN=image-device" -out device.csr 2>/dev/null
curl -s --fail-with-body --cacert config/root.pem -u estuser:image-test -H 'Content-Type: application/pkcs10' --data-binary @device.csr \
  "https://localhost:$port/.well-known/est/simpleenroll" | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem
openssl verify -CAfile config/root.pem -untrusted config/issuing-ca.pem device.pem
openssl x509 -in device.pem -noout -issuer | grep -q "image token issuing CA"
user=$(docker inspect ok --format '{{.Config.User}}')
[ "$user" = "10001:10001" ] || { echo "runs as $user, not as the non-root user" >&2; exit 1; }
docker rm -f ok >/dev/null

# Without the token's group, the container cannot open the token: it stops at start.
run nogroup "$image" serve --config /config/edge-est.toml
docker wait nogroup >/dev/null
logs=$(docker logs nogroup 2>&1)
echo "$logs" | grep -q "issuers.plant" || { echo "without the group: $logs" >&2; exit 1; }
echo "without --group-add $group: $(echo "$logs" | grep -m1 issuers.plant)"

# A wrong PIN: stopped at start, the URI named, the PIN nowhere.
run wrongpin --group-add $group "$image" serve --config /config/wrong-pin.toml
docker wait wrongpin >/dev/null
logs=$(docker logs wrongpin 2>&1)
echo "$logs" | grep -q "wrong PIN" || { echo "wrong PIN: $logs" >&2; exit 1; }
if echo "$logs" | grep -q -e wrong-4242 -e "$pin"; then echo "a PIN shows in the log: $logs" >&2; exit 1; fi
echo "wrong PIN: $(echo "$logs" | grep -m1 'wrong PIN')"
echo "PKCS#11 image test passed: $image ($(docker image inspect "$image" --format '{{.Size}}') bytes), runs as $user with group $group"
