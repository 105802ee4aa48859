#!/usr/bin/env bash
# Local-sign enrollments/s with the issuing key in a file vs in SoftHSM2, and with the TLS
# server key in SoftHSM2 (fresh mTLS connection per enrollment, P-256 everywhere, c=16).
#
# Usage: bench/pkcs11.sh          (release build; BIN=target/debug to use the debug build)
# Environment: EST_BENCH_SECONDS=N per run (default 12), EST_BENCH_OUT=DIR to keep the files.
# Needs Debian's softhsm2. Only loopback is used; the servers started here stop on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${EST_BENCH_SECONDS:-12}
OUT=${EST_BENCH_OUT:-$(mktemp -d /tmp/edge-est-pkcs11-bench.XXXXXX)}
BIN=${BIN:-$ROOT/target/release}
MODULE=/usr/lib/softhsm/libsofthsm2.so
PKI=$OUT/pki
mkdir -p "$OUT/tokens" "$OUT/results"

if [ "$BIN" = "$ROOT/target/release" ]; then
  cargo build --release --bin est-bench --bin edge-est
fi
echo "== machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== binaries: $BIN"

"$BIN/est-bench" pki --dir "$PKI" >/dev/null
export SOFTHSM2_CONF=$OUT/softhsm2.conf
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$OUT/tokens" >"$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 5678 >/dev/null
# The benchmark's own keys go into the token (a real deployment generates them there).
softhsm2-util --import "$PKI/issuing-p256.key" --token bench --label issuing --id 01 \
  --pin 1234 >/dev/null
softhsm2-util --import "$PKI/server.key" --token bench --label server --id 02 \
  --pin 1234 >/dev/null

# The device certificate authenticates through a trust set of the issuing CA (`issuer` would
# accept only certificates this server's journal recorded). `est-bench pki` writes it so
# itself now; older ones wrote `issuer`.
if grep -q 'client_trust = \["issuer"\]' "$PKI/sign-p256.toml"; then
sed -i -e 's|client_trust = \["issuer"\]|client_trust = ["devices"]|' \
  -e 's|match = \["certificate:issuer"\]|match = ["certificate:devices"]|' \
  -e '1a [trust.devices]\ncertificates = ["issuing-p256.pem"]' "$PKI/sign-p256.toml"
# (a table header mid-file would swallow the keys after it: move the trust set to the end)
python3 - "$PKI/sign-p256.toml" <<'PY'
import sys
p = sys.argv[1]
lines = open(p).read().split("\n")
trust = lines[1:3]
rest = lines[:1] + lines[3:]
open(p, "w").write("\n".join(rest) + "\n" + "\n".join(trust) + "\n")
PY
fi

token_key() { echo "pkcs11:token=bench;object=$1?pin-value=1234"; }
sed -e "s|^key = \"issuing-p256.key\"|key = \"$(token_key issuing)\"|" \
  -e "1a pkcs11_module = \"$MODULE\"" "$PKI/sign-p256.toml" >"$PKI/sign-token.toml"
sed -e "s|^key = \"server.key\"|key = \"$(token_key server)\"|" \
  -e "1a pkcs11_module = \"$MODULE\"" "$PKI/sign-p256.toml" >"$PKI/sign-token-tls.toml"
grep -q 'object=issuing' "$PKI/sign-token.toml"
grep -q 'object=server' "$PKI/sign-token-tls.toml"

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

run() {
  local name=$1 config=$2 log=$OUT/$1.log port= i
  (cd "$PKI" && exec "$BIN/edge-est" serve --config "$config" --listen 127.0.0.1:0) >"$log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for i in $(seq 200); do
    port=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'listen=127\.0\.0\.1:[0-9]*' | head -1 | cut -d: -f2 || true)
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || { echo "edge-est ($name) did not start:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "-- $name"
  "$BIN/est-bench" "https://localhost:$port/.well-known/est" --cacert "$PKI/root.pem" \
    --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" --concurrency 16 \
    --warmup 200 --duration "$SECS" --server-pid "$pid" --name "$name" \
    --json-out "$OUT/results/$name.json"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

run file-key sign-p256.toml
run token-issuer sign-token.toml
run token-tls sign-token-tls.toml
run file-key-again sign-p256.toml
