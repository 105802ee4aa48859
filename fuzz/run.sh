#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, then keeps whatever they found as regression cases.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 60); all targets unless some are named; JOBS targets at a time
# (default 2). Builds once (cargo-fuzz, release + debug assertions, target dir fuzz/target),
# regenerates the seed corpora (fuzz/corpus_gen.py, plus the fixtures of
# tests/fixtures/malformed), fuzzes, and copies every crash, timeout or OOM input to
# tests/fixtures/malformed/<kind>-<target>-<id>, where `cargo test --test fuzz_regressions`
# replays it. Exits 1 if anything was found. Needs cargo-fuzz (`cargo install cargo-fuzz
# --locked`), python3 and openssl; on a stable toolchain RUSTC_BOOTSTRAP=1 enables the
# nightly flags cargo-fuzz uses.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
shift || true
jobs=${JOBS:-2}
export RUSTC_BOOTSTRAP=1

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build -O --debug-assertions 2>&1 | tail -n 3
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=target/$triple/release

# Seeds: generated inputs, and the hand-made malformed fixtures for their targets.
python3 corpus_gen.py seeds corpus
fixtures=../tests/fixtures/malformed
target_of() {
  case "$1" in
    body-*) echo body_csr ;;
    csr-*) echo csr_der ;;
    cri-*) echo csr_signed ;;
    pkcs7-*) echo pkcs7_certs_only ;;
    path-*) echo route ;;
    auth-*) echo basic_auth ;;
    config-*) echo config ;;
    pattern-*) echo pattern ;;
    csrattrs-*) echo csrattrs ;;
    crash-* | timeout-* | oom-* | leak-* | slow-unit-*)
      local rest=${1#*-}
      [ "${1#slow-unit-}" != "$1" ] && rest=${1#slow-unit-}
      echo "${rest%-*}" ;;
  esac
}
for f in "$fixtures"/*; do
  [ -f "$f" ] || continue
  t=$(target_of "$(basename "$f")")
  if [ -n "$t" ] && [ -d "corpus/$t" ]; then
    cp "$f" "corpus/$t/fixture-$(basename "$f")"
  fi
done

mkdir -p logs
run_one() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  rm -f "artifacts/$t"/*
  "$bin_dir/$t" "corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"logs/$t.log" 2>&1 || true
}
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

found=0
printf '%-18s %12s %9s %6s %6s  %s\n' target runs exec/s cov ft found
for t in "${targets[@]}"; do
  log=logs/$t.log
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
  kept=""
  for a in "artifacts/$t"/*; do
    [ -f "$a" ] || continue
    name=$(basename "$a")
    kind=${name%-*}
    id=${name##*-}
    cp "$a" "$fixtures/$kind-$t-$id"
    kept="$kept $kind-$t-$id"
    found=1
  done
  printf '%-18s %12s %9s %6s %6s %s\n' "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${kept:- none}"
done
if [ "$found" -ne 0 ]; then
  echo "findings copied to tests/fixtures/malformed/ (see fuzz/logs/<target>.log); replay: cargo test --test fuzz_regressions"
  exit 1
fi
