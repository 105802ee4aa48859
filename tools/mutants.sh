#!/usr/bin/env bash
# Mutation testing with cargo-mutants, scoped to what a change touches (see TESTING.md).
# Not part of CI: each mutant costs an incremental build.
#
#   tools/mutants.sh                 mutants in the lines changed since main (committed or not)
#   tools/mutants.sh FILE...         every mutant in these files (globs quoted: 'src/policy/*.rs')
#
# Only the test targets that matter for the files are built and run (the map below);
# MUTANTS_TESTS="--lib --test refusals" overrides it. MUTANTS_JOBS (default 1) mutants at once
# (not with MUTANTS_WORKDIR). MUTANTS_OUT (default target/mutants) holds the report
# (mutants.out/: outcomes.json, caught.txt, missed.txt, timeout.txt, unviable.txt, a log per
# mutant). MUTANTS_ARGS passes more options to cargo-mutants (MUTANTS_ARGS=--iterate re-tests
# only what the last run in MUTANTS_OUT did not catch). The crate is built without debug info.
# Install: cargo install cargo-mutants --locked
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null; then
  echo "cargo-mutants is not installed: cargo install cargo-mutants --locked" >&2
  exit 2
fi

# The test targets that can kill a mutant in a file. The lib's unit tests always run.
tests_for() {
  case "$1" in
    src/policy/*) echo "--test policy_guards --test refusals --test grace --test rate_limits" ;;
    src/journal.rs) echo "--test journal_durability --test journal_restart" ;;
    src/edge/desired.rs) echo "" ;;
    src/auth/chain.rs) echo "--test hostile_chains --test identity --test grace --test refusals" ;;
    src/auth/client_cert.rs) echo "--test grace --test identity --test hostile_chains --test refusals" ;;
    src/auth/caps.rs) echo "--test hostile_chains" ;;
    src/auth/ra.rs) echo "--test identity --test ra_reenroll --test refusals" ;;
    src/auth/basic.rs) echo "--test refusals --test rate_limits" ;;
    src/auth/*) echo "--test refusals --test grace --test identity --test hostile_chains" ;;
    src/issue/*) echo "--test misbehaving_upstream --test outage --test hierarchy" ;;
    src/server.rs) echo "--test refusals --test misbehaving_upstream --test journal_durability" ;;
    src/est/*) echo "--test openssl_clients --test hostile_clients" ;;
    *) echo "--test refusals" ;;
  esac
}

args=()
files=()
if [ "$#" -gt 0 ]; then
  for f in "$@"; do
    args+=(--file "$f")
    for g in $f; do files+=("$g"); done
  done
else
  base=$(git merge-base main HEAD)
  mkdir -p target
  git diff "$base" -- 'src/*.rs' >target/mutants.diff
  if [ ! -s target/mutants.diff ]; then
    echo "no change to src/ since main: nothing to mutate"
    exit 0
  fi
  args+=(--in-diff target/mutants.diff)
  mapfile -t files < <(git diff --name-only "$base" -- 'src/*.rs')
fi

if [ -n "${MUTANTS_TESTS:-}" ]; then
  read -r -a tests <<<"$MUTANTS_TESTS"
else
  declare -A seen=()
  tests=(--lib)
  for f in "${files[@]}"; do
    for t in $(tests_for "$f"); do
      [ "$t" = --test ] && continue
      if [ -z "${seen[$t]:-}" ]; then
        seen[$t]=1
        tests+=(--test "$t")
      fi
    done
  done
fi

echo "mutating ${files[*]}; tests: ${tests[*]}" >&2
# cargo-mutants copies the tree for each run, and its copy of target/ loses the build times, so
# every dependency is rebuilt (half an hour here). MUTANTS_WORKDIR=DIR instead keeps one copy
# made with its times (the first run copies target/ too), copies the sources over it (stamped
# now, so that cargo sees them as changed) and mutates there in place: only edge-est itself is
# rebuilt.
where=(--copy-target=true --jobs "${MUTANTS_JOBS:-1}")
if [ -n "${MUTANTS_WORKDIR:-}" ]; then
  out=$(realpath -m "${MUTANTS_OUT:-target/mutants}")
  [ -f target/mutants.diff ] && diff_file=$(realpath target/mutants.diff)
  mkdir -p "$MUTANTS_WORKDIR"
  if [ ! -d "$MUTANTS_WORKDIR/target" ]; then
    cp -a target "$MUTANTS_WORKDIR/"
  fi
  tar -c --exclude=./target --exclude=./.git --exclude='./mutants.out*' . | tar -x --touch -C "$MUTANTS_WORKDIR"
  for i in "${!args[@]}"; do
    [ "${args[$i]}" = target/mutants.diff ] && args[$i]=$diff_file
  done
  cd "$MUTANTS_WORKDIR"
  where=(--in-place)
  MUTANTS_OUT=$out
fi
# The targets go to every cargo invocation (--cargo-arg): after `--` they would reach only the
# test run, and the build before it would link every test binary of the crate.
targets=()
for t in "${tests[@]}"; do targets+=("--cargo-arg=$t"); done
exec nice -n 10 cargo mutants \
  "${args[@]}" \
  "${where[@]}" \
  --no-shuffle \
  --cargo-arg=--config=profile.dev.package.edge-est.debug=false \
  "${targets[@]}" \
  --output "${MUTANTS_OUT:-target/mutants}" \
  ${MUTANTS_ARGS:-}
