# Shared pieces of the bench/ scripts; sourced, after OUT and PKI are set:
#   start NAME COMMAND...  starts a server (working directory $PKI, log $OUT/NAME.log) that
#                          prints listen=127.0.0.1:PORT; sets PID and PORT
#   stop PID               stops one of them
#   machine_line           the CPU model and the load average, for the output's first line
# Every server started here is stopped when the script exits.

SERVER_PIDS=()
stop_servers() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${SERVER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT

start() {
  local name=$1 log=$OUT/$1.log i
  shift
  (cd "$PKI" && exec "$@") >"$log" 2>&1 &
  PID=$!
  SERVER_PIDS+=("$PID")
  PORT=
  for i in $(seq 100); do
    PORT=$(sed 's/\x1b\[[0-9;]*m//g' "$log" 2>/dev/null | grep -o 'listen=127\.0\.0\.1:[0-9]*' | head -1 | cut -d: -f2 || true)
    [ -n "$PORT" ] && return
    if ! kill -0 "$PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "$name did not start (or did not report its port):" >&2
  cat "$log" >&2
  exit 1
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

machine_line() {
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); load average $(cut -d' ' -f1-3 /proc/loadavg)"
}
