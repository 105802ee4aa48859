#!/usr/bin/env bash
# The edge-est benchmark, in one go on this machine (see BENCHMARKS.md):
#   (a) the crypto floor of one enrollment on one core (est-bench floor, in memory);
#   (b) local-sign enrollment, fresh mTLS connection each: P-256 issuer (three rounds, each
#       with the socket floor (est-bench socket-floor: a minimal responder on the same stack)
#       just before it and the in-memory floor after it), RSA-2048 issuer, and the IoT Edge
#       shape (simpleenroll + cacerts on two connections);
#   (c) cacerts with keep-alive;
#   (d) idle RSS of a fresh server, and RSS over 100,000 enrollments;
#   (e) enrollment forwarded through one and two layers (when edge-est has mode = "forward");
#   (f) a storm: 10,000 distinct devices (client certificates of their own) re-enrolling in
#       the IoT Edge shape at the bottom of three fresh layers, c=64;
# then every result next to the floors, checked against the targets of issues 7 and 18.
#
# Usage: bench/run.sh            (about 6 minutes once the release build is done)
# Environment: EST_BENCH_OUT=DIR keeps everything (PKI, configs, logs, JSON results) in DIR
#              instead of a fresh temporary directory; EST_BENCH_SECONDS=N changes the length
#              of each timed run (default 12); EST_BENCH_STORM=N the storm's devices (10000).
# Only loopback addresses are used; the servers started here are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${EST_BENCH_SECONDS:-12}
STORM=${EST_BENCH_STORM:-10000}
OUT=${EST_BENCH_OUT:-$(mktemp -d /tmp/edge-est-bench.XXXXXX)}
mkdir -p "$OUT/results"
PKI=$OUT/pki
RES=$OUT/results
BIN=$ROOT/target/release
started_at=$(date +%s)

echo "== building release binaries"
cargo build --release --bin est-bench --bin edge-est

echo "== machine"
echo "  $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "  $(. /etc/os-release && echo "$PRETTY_NAME"), Linux $(uname -r), $(rustc --version)"
echo "  results in $OUT"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN {exit !(l > 1.0)}'; then
  echo "  WARNING: load average $load before starting: other processes are using the CPUs, and"
  echo "  throughput and latency will be lower and noisier (CPU per request holds up better)."
fi

"$BIN/est-bench" pki --dir "$PKI"

. "$ROOT/bench/lib.sh"

# start_server NAME CONFIG: starts edge-est on a free loopback port; sets PID and PORT.
start_server() { start "$1" "$BIN/edge-est" serve --config "$2" --listen 127.0.0.1:0; }
stop_server() { stop "$1"; }

url() { echo "https://localhost:$1/.well-known/est"; }

bench() { "$BIN/est-bench" "$@" --cacert "$PKI/root.pem"; }

echo
echo "== (a) crypto floor, one core, no sockets"
taskset -c 0 "$BIN/est-bench" floor --json-out "$RES/floor.json"

# The socket floor: a minimal responder on the same stack, same certificates.
start socket-floor "$BIN/est-bench" socket-floor --pki "$PKI"
FLOOR_PID=$PID FLOOR_PORT=$PORT

echo
echo "== (b) local-sign enrollment, P-256 issuer, fresh mTLS connection per enrollment: three"
echo "   rounds of: the socket floor (minimal responder, same client, same certificates), then"
echo "   edge-est, then the crypto floor again (the machine's speed drifts: a VM sharing its"
echo "   host); each round is set against the mean of the floors around it, and the summary"
echo "   takes the median round"
start_server sign-p256 sign-p256.toml
for round in 1 2 3; do
  suffix=$([ "$round" = 1 ] && echo "" || echo ".r$round")
  echo "-- round $round: socket floor"
  bench "$(url "$FLOOR_PORT")" --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
    --concurrency 16 --warmup 500 --duration "$SECS" --server-pid "$FLOOR_PID" \
    --name "socket-floor$suffix" --json-out "$RES/socket-floor$suffix.json"
  echo "-- round $round: edge-est"
  bench "$(url "$PORT")" --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
    --concurrency 16 --warmup 500 --duration "$SECS" --server-pid "$PID" \
    --name "sign-p256$suffix" --json-out "$RES/sign-p256$suffix.json"
  taskset -c 0 "$BIN/est-bench" floor --json-out "$RES/floor-end$suffix.json" | grep FLOOR
done
stop_server "$FLOOR_PID"
echo
echo "== (b) the IoT Edge shape: simpleenroll + cacerts at once on two fresh mTLS connections"
bench "$(url "$PORT")" --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
  --shape iot-edge --concurrency 8 --duration "$SECS" --server-pid "$PID" \
  --name iot-edge --json-out "$RES/iot-edge.json"
echo
echo "== (c) cacerts with keep-alive"
bench "$(url "$PORT")" --op cacerts --keep-alive --concurrency 32 --warmup 2000 \
  --duration "$SECS" --server-pid "$PID" --name cacerts --json-out "$RES/cacerts.json"
stop_server "$PID"

echo
echo "== (b) local-sign enrollment, RSA-2048 issuer, fresh mTLS connection per enrollment"
start_server sign-rsa sign-rsa.toml
bench "$(url "$PORT")" --cert "$PKI/device-rsa.pem" --cert-key "$PKI/device-rsa.key" \
  --concurrency 16 --warmup 200 --duration "$SECS" --server-pid "$PID" \
  --name sign-rsa --json-out "$RES/sign-rsa.json"
stop_server "$PID"

echo
echo "== (d) idle RSS of a fresh server, then 100,000 enrollments (keep-alive mTLS, 1-day profile)"
start_server rss rss.toml
sleep 1
awk '/VmRSS/ {rss=$2} /VmHWM/ {hwm=$2} END {printf "{\"rss_kib\": %d, \"hwm_kib\": %d}\n", rss, hwm}' \
  "/proc/$PID/status" >"$RES/idle-rss.json"
echo "  idle: $(cat "$RES/idle-rss.json")"
bench "$(url "$PORT")" --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
  --keep-alive --concurrency 16 --requests 100000 --rss-every 20000 --server-pid "$PID" \
  --name rss --json-out "$RES/rss.json"
stop_server "$PID"

echo
echo "== (e) forwarding through one and two layers"
sed "s/@UPSTREAM_PORT@/1/" "$PKI/forward-1.toml.in" >"$PKI/forward-probe.toml"
if ! "$BIN/edge-est" check-config "$PKI/forward-probe.toml" >"$OUT/forward-probe.log" 2>&1; then
  echo "forward: not supported by this build ($(tail -1 "$OUT/forward-probe.log"))"
else
  start_server top top.toml
  TOP_PID=$PID TOP_PORT=$PORT
  sed "s/@UPSTREAM_PORT@/$TOP_PORT/" "$PKI/forward-1.toml.in" >"$PKI/forward-1.toml"
  start_server forward-1 forward-1.toml
  F1_PID=$PID F1_PORT=$PORT
  sed "s/@UPSTREAM_PORT@/$F1_PORT/" "$PKI/forward-2.toml.in" >"$PKI/forward-2.toml"
  start_server forward-2 forward-2.toml
  F2_PID=$PID F2_PORT=$PORT
  ports=("$TOP_PORT" "$F1_PORT" "$F2_PORT")
  pids=("$TOP_PID" "$TOP_PID,$F1_PID" "$TOP_PID,$F1_PID,$F2_PID")
  # Latency: one enrollment at a time, warm upstream pools; three interleaved rounds so that
  # a disturbance of the machine does not land on one layer count only (the summary takes
  # the median p50 of the rounds).
  for round in 1 2 3; do
    for n in 0 1 2; do
      echo "-- $n layer(s) of forwarding: latency, round $round"
      suffix=$([ "$round" = 1 ] && echo "" || echo ".r$round")
      bench "$(url "${ports[$n]}")" --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
        --concurrency 1 --warmup 200 --duration $(( (SECS + 2) / 3 )) --server-pid "${pids[$n]}" \
        --name "forward-$n" --json-out "$RES/forward-$n$suffix.json"
    done
  done
  for n in 0 1 2; do
    echo "-- $n layer(s) of forwarding: throughput"
    bench "$(url "${ports[$n]}")" --cert "$PKI/device-p256.pem" --cert-key "$PKI/device-p256.key" \
      --concurrency 16 --warmup 300 --duration "$SECS" --server-pid "${pids[$n]}" \
      --name "forward-tput-$n" --json-out "$RES/forward-tput-$n.json"
  done
  stop_server "$F2_PID"
  stop_server "$F1_PID"
  stop_server "$TOP_PID"
fi

echo
echo "== (f) storm: $STORM distinct devices re-enrolling at the bottom of three fresh layers"
echo "   (simpleenroll + cacerts on two fresh mTLS connections each, c=64)"
if [ ! -f "$PKI/forward-1.toml.in" ] || ! "$BIN/edge-est" check-config "$PKI/forward-probe.toml" >/dev/null 2>&1; then
  echo "storm: forwarding not supported by this build"
else
  # Fresh journals: a layer reads its whole journal at start (its memory grows with it), and
  # the storm's figures should not depend on how much (e) issued before.
  sed 's/journal-top/journal-storm-top/' "$PKI/top.toml" >"$PKI/storm-top.toml"
  start_server storm-top storm-top.toml
  TOP_PID=$PID TOP_PORT=$PORT
  sed "s/@UPSTREAM_PORT@/$TOP_PORT/" "$PKI/forward-1.toml.in" >"$PKI/storm-middle.toml"
  sed -i 's/journal-forward-1/journal-storm-middle/' "$PKI/storm-middle.toml"
  start_server storm-middle storm-middle.toml
  MID_PID=$PID MID_PORT=$PORT
  sed "s/@UPSTREAM_PORT@/$MID_PORT/" "$PKI/forward-2.toml.in" >"$PKI/storm-bottom.toml"
  sed -i 's/journal-forward-2/journal-storm-bottom/' "$PKI/storm-bottom.toml"
  start_server storm-bottom storm-bottom.toml
  BOTTOM_PID=$PID BOTTOM_PORT=$PORT
  # The order of the pids is the summary's: top, middle, bottom.
  bench "$(url "$BOTTOM_PORT")" --shape iot-edge --clients "$STORM" \
    --client-ca "$PKI/device-ca-p256.pem" --client-ca-key "$PKI/issuing-p256.key" \
    --requests "$STORM" --concurrency 64 --timeout 30 \
    --server-pid "$TOP_PID,$MID_PID,$BOTTOM_PID" --name storm --json-out "$RES/storm.json"
  stop_server "$BOTTOM_PID"
  stop_server "$MID_PID"
  stop_server "$TOP_PID"
fi

"$BIN/est-bench" summary --dir "$RES"
echo
echo "total time: $(( $(date +%s) - started_at )) s; everything is in $OUT"
