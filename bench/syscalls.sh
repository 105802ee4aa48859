#!/usr/bin/env bash
# System calls per enrollment, a machine-independent count (issue 18): the local-sign P-256
# scenario of bench/run.sh (fresh mTLS connection per enrollment, c=16) against each given
# edge-est binary and against the socket floor (est-bench socket-floor), with `strace -c -f`
# attached to the server for a fixed number of enrollments. Binaries are measured in
# interleaved rounds (A B A B ...), so that two builds can be compared.
#
# Usage: bench/syscalls.sh [EDGE_EST_BIN ...]   (default: target/release/edge-est)
# Environment: EST_BENCH_REQUESTS=N enrollments per measurement (default 2000),
#              EST_BENCH_ROUNDS=N rounds (default 2), EST_BENCH_OUT=DIR keeps the files.
# strace slows the server down: the counts hold, the times do not. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${EST_BENCH_REQUESTS:-2000}
ROUNDS=${EST_BENCH_ROUNDS:-2}
OUT=${EST_BENCH_OUT:-$(mktemp -d /tmp/edge-est-syscalls.XXXXXX)}
mkdir -p "$OUT"
BENCH=${EST_BENCH_BIN:-$ROOT/target/release/est-bench}
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=("$ROOT/target/release/edge-est")
command -v strace >/dev/null || { echo "strace is needed" >&2; exit 1; }
[ -x "$BENCH" ] || cargo build --release --bin est-bench

PKI=$OUT/pki
"$BENCH" pki --dir "$PKI" >/dev/null
. "$ROOT/bench/lib.sh"

# count NAME: strace -c -f on $PID during N enrollments; prints the calls per enrollment.
count() {
  local name=$1 trace=$OUT/$1.strace
  "$BENCH" "https://localhost:$PORT/.well-known/est" --cacert "$OUT/pki/root.pem" \
    --cert "$OUT/pki/device-p256.pem" --cert-key "$OUT/pki/device-p256.key" \
    --concurrency 16 --requests 200 --distinct-keys 64 --json >/dev/null
  strace -c -f -q -p "$PID" -o "$trace" &
  local tracer=$!
  sleep 0.5
  "$BENCH" "https://localhost:$PORT/.well-known/est" --cacert "$OUT/pki/root.pem" \
    --cert "$OUT/pki/device-p256.pem" --cert-key "$OUT/pki/device-p256.key" \
    --concurrency 16 --requests "$N" --distinct-keys 64 --json >"$OUT/$name.json"
  sleep 0.3
  kill -INT "$tracer"
  wait "$tracer" 2>/dev/null || true
  local ok
  ok=$(grep -o '"ok": [0-9]*' "$OUT/$name.json" | grep -o '[0-9]*$')
  awk -v n="$N" -v name="$name" -v ok="$ok" '
    $NF != "total" && $4 ~ /^[0-9]+$/ { calls[$NF] = $4 }
    $NF != "total" && $5 ~ /^[0-9]+$/ && $4 ~ /^[0-9]+$/ { calls[$NF] = $4 }
    /total$/ { total = $3 ~ /^[0-9]+$/ && $4 !~ /^[0-9]+$/ ? $3 : $4 }
    END {
      line = ""
      for (c in calls) if (calls[c] / n >= 0.05) line = line sprintf(" %s %.2f", c, calls[c] / n)
      printf "%-34s %6.2f syscalls per enrollment (%s of %d right):%s\n", name, total / n, ok, n, line
    }' "$trace"
}

for round in $(seq "$ROUNDS"); do
  start "floor.r$round" "$BENCH" socket-floor --pki "$PKI"
  count "socket-floor.r$round"
  stop "$PID"
  for i in "${!BINS[@]}"; do
    start "edge-est-$i.r$round" "${BINS[$i]}" serve --config sign-p256.toml --listen 127.0.0.1:0
    count "edge-est-$i.r$round ($(basename "${BINS[$i]}"))"
    stop "$PID"
  done
done
echo "files in $OUT"
