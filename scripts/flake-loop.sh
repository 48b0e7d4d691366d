#!/usr/bin/env bash
# Runs the whole test suite RUNS times in a row (default 10) and reports every failure by test
# name, with how often it failed: the check that the suite has no flaky test. Each run's output is
# kept under target/flake-loop/ for a failure's details.
#   RUNS=10 scripts/flake-loop.sh            # any extra arguments go to `cargo test`
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-10}"
out=target/flake-loop
mkdir -p "$out"
# As CI runs them.
export CREDBROKER_REQUIRE_PG="${CREDBROKER_REQUIRE_PG:-1}"
export CREDBROKER_REQUIRE_TMPFS="${CREDBROKER_REQUIRE_TMPFS:-1}"
if ! cargo test --no-run "$@" > "$out/build.log" 2>&1; then
    tail -30 "$out/build.log"; echo "the tests do not build"; exit 2
fi
failed_runs=0
: > "$out/failures"
for i in $(seq 1 "$runs"); do
    start=$(date +%s)
    # --no-fail-fast: a failure in one test binary must not hide the others' results.
    if timeout 1800 cargo test --no-fail-fast "$@" > "$out/run-$i.log" 2>&1; then
        echo "run $i/$runs: ok ($(( $(date +%s) - start )) s)"
    else
        failed_runs=$((failed_runs + 1))
        names=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$out/run-$i.log")
        echo "run $i/$runs: FAILED ($(( $(date +%s) - start )) s): ${names:-see $out/run-$i.log}"
        if [ -n "$names" ]; then
            printf '%s\n' $names >> "$out/failures"
        else
            echo "(no test name: see $out/run-$i.log)" >> "$out/failures"
        fi
    fi
done
echo "--- $runs runs, $failed_runs with failures"
if [ "$failed_runs" -gt 0 ]; then
    echo "failures by test (count name):"
    sort "$out/failures" | uniq -c | sort -rn
    exit 1
fi
