#!/usr/bin/env bash
# Interleaved A/B rounds of the forwarding latency scenario of bench/run.sh (e): a top that
# signs and two layers that forward (RA credentials, pooled upstream connections), one
# enrollment at a time (c=1, fresh mTLS connection from the device each time, warm pools);
# p50 at the top directly and through one and two layers, and the CPU of all layers involved
# per enrollment, for two or more edge-est binaries in turn (A B A B ...), each round on
# fresh servers. Also prints the voluntary context switches of all layers involved per enrollment.
#
# Usage: bench/ab-forward.sh BIN_A BIN_B [BIN ...]
# Environment: EST_BENCH_SECONDS=N per measurement (default 4), EST_BENCH_ROUNDS=N (default 3),
#              EST_BENCH_OUT=DIR keeps the files. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${EST_BENCH_SECONDS:-4}
ROUNDS=${EST_BENCH_ROUNDS:-3}
OUT=${EST_BENCH_OUT:-$(mktemp -d /tmp/edge-est-abf.XXXXXX)}
mkdir -p "$OUT"
BENCH=${EST_BENCH_BIN:-$ROOT/target/release/est-bench}
[ $# -ge 2 ] || { echo "usage: bench/ab-forward.sh BIN_A BIN_B [BIN ...]" >&2; exit 2; }
[ -x "$BENCH" ] || cargo build --release --bin est-bench
PKI=$OUT/pki
"$BENCH" pki --dir "$PKI" >/dev/null

. "$ROOT/bench/lib.sh"

machine_line
for round in $(seq "$ROUNDS"); do
  i=0
  for bin in "$@"; do
    tag=$i.r$round
    rm -f "$PKI"/journal-*.jsonl
    start "top.$tag" "$bin" serve --config top.toml --listen 127.0.0.1:0
    TOP_PID=$PID TOP_PORT=$PORT
    sed "s/@UPSTREAM_PORT@/$TOP_PORT/" "$PKI/forward-1.toml.in" >"$PKI/forward-1.toml"
    start "f1.$tag" "$bin" serve --config forward-1.toml --listen 127.0.0.1:0
    F1_PID=$PID F1_PORT=$PORT
    sed "s/@UPSTREAM_PORT@/$F1_PORT/" "$PKI/forward-2.toml.in" >"$PKI/forward-2.toml"
    start "f2.$tag" "$bin" serve --config forward-2.toml --listen 127.0.0.1:0
    F2_PID=$PID F2_PORT=$PORT
    ports=("$TOP_PORT" "$F1_PORT" "$F2_PORT")
    pids=("$TOP_PID" "$TOP_PID,$F1_PID" "$TOP_PID,$F1_PID,$F2_PID")
    line=""
    for n in 0 1 2; do
      "$BENCH" "https://localhost:${ports[$n]}/.well-known/est" --cacert "$PKI/root.pem" \
        --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
        --concurrency 1 --warmup 200 --duration "$SECS" --server-pid "${pids[$n]}" \
        --json-out "$OUT/fwd-$n.$tag.json" --json >/dev/null
      line+=$(awk -v n="$n" '
        /"server_cpu_us_per_unit"/ { gsub(/[,]/, "", $2); cpu = $2 }
        /"voluntary_switches_per_unit"/ { gsub(/[,]/, "", $2); cs += $2 }
        /"p50"/ && !p50 { gsub(/[,]/, "", $2); p50 = $2 }
        /"failed"/ { gsub(/[,]/, "", $2); failed = $2 }
        END { printf "  %d: p50 %5.2f ms %5.0f µs %4.1f cs err %s", n, p50, cpu, cs, failed }
      ' "$OUT/fwd-$n.$tag.json")
    done
    for pid in "$F2_PID" "$F1_PID" "$TOP_PID"; do stop "$pid"; done
    printf "round %s %-18s%s\n" "$round" "$(basename "$bin")" "$line"
    i=$((i + 1))
  done
done
echo "files in $OUT"
