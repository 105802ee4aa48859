#!/usr/bin/env bash
# Where edge-est's CPU goes during local-sign enrollment with a fresh mTLS connection each:
# builds unstripped release edge-est and est-bench (separate target directory, about 7 minutes the first
# time), loads it with est-bench for 14 s, records it with `perf record -g` for 8 s, and
# prints the profile grouped by kind (crypto, kernel, allocator, ...) and the top symbols.
#
# Usage: bench/profile.sh [socket-floor]   (the argument profiles est-bench's socket floor
#        instead; needs `perf`: apt-get install linux-perf; run as root or with
#        kernel.perf_event_paranoid <= 1)
# Environment: EST_BENCH_PERF_TARGET=DIR for the unstripped build (default
#              /tmp/edge-est-perf-target), EST_BENCH_OUT=DIR to keep the files.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${EST_BENCH_OUT:-$(mktemp -d /tmp/edge-est-profile.XXXXXX)}
PERF_TARGET=${EST_BENCH_PERF_TARGET:-/tmp/edge-est-perf-target}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

CARGO_TARGET_DIR=$PERF_TARGET CARGO_PROFILE_RELEASE_STRIP=false \
  CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --bin edge-est --bin est-bench
PKI=$OUT/pki
"$PERF_TARGET/release/est-bench" pki --dir "$PKI" >/dev/null
. "$ROOT/bench/lib.sh"

if [ "${1:-}" = socket-floor ]; then
  start server "$PERF_TARGET/release/est-bench" socket-floor --pki "$PKI"
else
  start server "$PERF_TARGET/release/edge-est" serve --config sign-p256.toml --listen 127.0.0.1:0
fi

"$PERF_TARGET/release/est-bench" "https://localhost:$PORT/.well-known/est" \
  --cacert "$OUT/pki/root.pem" --cert "$OUT/pki/device-p256.pem" \
  --cert-key "$OUT/pki/device-p256.key" --concurrency 16 --warmup 300 --duration 14 \
  --server-pid "$PID" >"$OUT/bench.txt" 2>&1 &
BENCH=$!
sleep 4
perf record -F 999 -g -p "$PID" -o "$OUT/perf.data" -- sleep 8 2>/dev/null
wait "$BENCH"
cat "$OUT/bench.txt"

perf report -i "$OUT/perf.data" --no-children --sort dso,symbol -g none 2>/dev/null \
  | grep '%' | grep -v '^#' >"$OUT/flat.txt"
echo
echo "== server CPU by kind (perf samples of the edge-est process)"
awk '
  {
    pct = $1; sub("%", "", pct); line = $0
    if (line ~ /\[kernel/) k = "kernel (TCP/loopback, fdatasync, scheduling, ...)"
    else if (line ~ /libc.*(malloc|free|_int_|realloc|calloc|tcache)/) k = "allocator (glibc malloc/free)"
    else if (line ~ /nistz256|ecp_|p256|beeu|bn_|BN_/) k = "crypto: P-256 (ECDSA, chain + CertificateVerify + CSR)"
    else if (line ~ /x25519|curve25519/) k = "crypto: X25519 key exchange"
    else if (line ~ /sha512/) k = "crypto: SHA-384 (TLS13_AES_256_GCM_SHA384, no SHA-NI)"
    else if (line ~ /sha256|aes|gcm|ghash|aws_lc/) k = "crypto: other (SHA-256, AES-GCM, ...)"
    else if (line ~ /libc/) k = "libc other (memcpy, ...)"
    else if (line ~ /rustls|webpki/) k = "rustls/webpki"
    else if (line ~ /hyper|http::|httparse/) k = "hyper/http"
    else if (line ~ /tokio|mio/) k = "tokio"
    else if (line ~ /tracing|fmt/) k = "tracing/formatting"
    else if (line ~ /x509|der|asn1|rcgen|yasna/) k = "x509/der/rcgen"
    else k = "other"
    sum[k] += pct
  }
  END { for (k in sum) printf "%6.2f%%  %s\n", sum[k], k }
' "$OUT/flat.txt" | sort -rn
echo
echo "== top symbols"
head -25 "$OUT/flat.txt" | cut -c1-110
echo
echo "perf data in $OUT/perf.data"
