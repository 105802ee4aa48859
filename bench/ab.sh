#!/usr/bin/env bash
# Interleaved A/B rounds of the local-sign P-256 scenario of bench/run.sh (fresh mTLS
# connection per enrollment, c=16): server CPU, voluntary context switches and p50 per
# enrollment, for two or more edge-est binaries in turn (A B A B ...), each round on a fresh
# server, so that a drift of the machine's speed lands on every binary alike.
#
# Usage: bench/ab.sh BIN_A BIN_B [BIN ...]   (`socket-floor` as a BIN: est-bench's socket floor)
# Environment: EST_BENCH_SECONDS=N per measurement (default 6), EST_BENCH_ROUNDS=N (default 4),
#              EST_BENCH_OUT=DIR keeps the files, EST_BENCH_RT=1 runs servers and est-bench
#              under `chrt -r 10` (a busy machine). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${EST_BENCH_SECONDS:-6}
ROUNDS=${EST_BENCH_ROUNDS:-4}
OUT=${EST_BENCH_OUT:-$(mktemp -d /tmp/edge-est-ab.XXXXXX)}
mkdir -p "$OUT"
BENCH=${EST_BENCH_BIN:-$ROOT/target/release/est-bench}
[ $# -ge 2 ] || { echo "usage: bench/ab.sh BIN_A BIN_B [BIN ...]" >&2; exit 2; }
[ -x "$BENCH" ] || cargo build --release --bin est-bench

PKI=$OUT/pki
"$BENCH" pki --dir "$PKI" >/dev/null
. "$ROOT/bench/lib.sh"
# EST_BENCH_RT=1: servers and est-bench at real-time priority (chrt -r 10), to measure on a
# machine others keep busy (they then preempt niced compilers).
RT=()
[ "${EST_BENCH_RT:-0}" = 1 ] && RT=(chrt -r 10)

machine_line
for round in $(seq "$ROUNDS"); do
  i=0
  for bin in "$@"; do
    if [ "$bin" = socket-floor ]; then
      start "server-$i.r$round" "${RT[@]}" "$BENCH" socket-floor --pki "$PKI"
    else
      start "server-$i.r$round" "${RT[@]}" "$bin" serve --config sign-p256.toml --listen 127.0.0.1:0
    fi
    "${RT[@]}" "$BENCH" "https://localhost:$PORT/.well-known/est" --cacert "$OUT/pki/root.pem" \
      --cert "$OUT/pki/device-p256.pem" --cert-key "$OUT/pki/device-p256.key" \
      --concurrency 16 --warmup 300 --duration "$SECS" --server-pid "$PID" \
      --json-out "$OUT/ab-$i.r$round.json" --json >/dev/null
    stop "$PID"
    awk -v bin="$(basename "$bin")" -v r="$round" '
      /"server_cpu_us_per_unit"/ { gsub(/[,]/, "", $2); cpu = $2 }
      /"voluntary_switches_per_unit"/ { gsub(/[,]/, "", $2); cs = $2 }
      /"p50"/ && !p50 { gsub(/[,]/, "", $2); p50 = $2 }
      /"failed"/ { gsub(/[,]/, "", $2); failed = $2 }
      /"other_cpu_share"/ { gsub(/[,]/, "", $2); other = $2 }
      END { printf "round %s  %-24s %6.0f µs server CPU  %5.2f wake-ups  p50 %6.2f ms  errors %s  others %.0f %%\n", r, bin, cpu, cs, p50, failed, other * 100 }
    ' "$OUT/ab-$i.r$round.json"
    i=$((i + 1))
  done
done
echo "files in $OUT"
