#!/usr/bin/env bash
# Every bench and script command the README's Development block lists (but
# scripts/docker-context.sh, which .ci/run runs on its own), run once in a short form (seconds
# each once built; the crash test's release build takes minutes), so CI shows each still
# builds, runs against the real binary and writes its results. Figures from these runs mean
# nothing; they go to a throwaway BENCH_RESULTS_DIR, so bench-results/ keeps the documented
# ones. Needs h2load (nghttp2-client), taskset, and PostgreSQL's initdb for the PostgreSQL
# store's run (.ci/run installs them when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
pg_data=""
cleanup() {
    if [ -n "$pg_data" ]; then as_postgres "$pg_bin/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
export BENCH_RESULTS_DIR="$work/results"

# One command, its name, and the result file it must have written (or "-" for none).
run() {
    local name="$1" expect="$2"; shift 2
    echo "--- $name"
    local start; start=$(date +%s)
    if ! "$@" > "$work/out" 2>&1; then
        tail -40 "$work/out"; echo "FAILED: $name"; exit 1
    fi
    if [ "$expect" != "-" ] && [ ! -s "$BENCH_RESULTS_DIR/$expect" ]; then
        tail -40 "$work/out"; echo "FAILED: $name wrote no $expect"; exit 1
    fi
    echo "ok ($(( $(date +%s) - start )) s)"
}

# PostgreSQL as its own user when this runs as root (initdb refuses root).
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

echo "--- building the benches (release)"
cargo bench --no-run

bench() { cargo bench -q --bench "$@"; }
run "token: the default suite" token-suite-auto.json bench token -- --seconds 0.5 --rounds 1
run "token: oauth" token-oauth-n4-c64.json bench token -- --scenario oauth --seconds 1 --rounds 1
run "token: storm" token-storm.json bench token -- --scenario storm --systems 200
run "token: scale" scale-500.json bench token -- --scenario scale --systems 500 --seconds 1
run "token: register" register-c64.json bench token -- --scenario register --concurrency 64 --seconds 1
run "token: checks" token-checks.json bench token -- --scenario checks --systems 200 --seconds 2
run "token: h2load" - bench token -- --scenario h2load --seconds 1 --rounds 1
grep -q "echo, current_thread" "$work/out" || { cat "$work/out"; echo "FAILED: no h2load table"; exit 1; }
run "token: cores" - bench token -- --scenario cores --seconds 1 --rounds 1
run "proxy" proxy-c16.json bench proxy -- --seconds 1 --rounds 1
run "proxy, another build (BENCH_BROKER_BIN)" proxy-c4.json \
    env BENCH_BROKER_BIN=target/release/credbroker cargo bench -q --bench proxy -- --concurrency 4 --seconds 1 --rounds 1
grep -q '"broker": "target/release/credbroker"' "$BENCH_RESULTS_DIR/proxy-c4.json" \
    || { cat "$BENCH_RESULTS_DIR/proxy-c4.json"; echo "FAILED: BENCH_BROKER_BIN was not the broker measured"; exit 1; }
run "proxy, the vendor in its own process, answering late" proxy-c2.json \
    cargo bench -q --bench proxy -- --concurrency 2 --seconds 1 --rounds 1 \
    --load-cores 0 --vendor-cores 1 --broker-cores 1 --vendor-delay-ms 1
grep -q '"layout": ".*the vendor on cores 1.*vendor delay 1 ms"' "$BENCH_RESULTS_DIR/proxy-c2.json" \
    || { cat "$BENCH_RESULTS_DIR/proxy-c2.json"; echo "FAILED: the layout options were not honoured"; exit 1; }

pg_init=$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$pg_init" ]; then
    pg_bin=$(dirname "$pg_init")
    # Only postgres (or this user) inside: the password file and the socket live there.
    mkdir -p "$work/pg" && chmod 0711 "$work" && chmod 0700 "$work/pg"
    if [ "$(id -u)" = 0 ]; then chown postgres "$work/pg"; fi
    pg_data="$work/pg/data"
    # A password, not trust: other local users must not get a superuser on this port.
    password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    ( umask 077; printf '%s\n' "$password" > "$work/pg/pw" )
    if [ "$(id -u)" = 0 ]; then chown postgres "$work/pg/pw"; fi
    as_postgres "$pg_bin/initdb" -D "$pg_data" -U bench --auth=scram-sha-256 \
        --pwfile="$work/pg/pw" >/dev/null
    rm -f "$work/pg/pw"
    # Below the kernel's ephemeral range (32768 on), a few tries.
    started=""
    for _ in 1 2 3 4 5; do
        port=$(( 20000 + RANDOM % 12000 ))
        if as_postgres "$pg_bin/pg_ctl" -D "$pg_data" -w -l "$work/pg/log" \
            -o "-p $port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null; then
            started=1; break
        fi
    done
    [ -n "$started" ] || { cat "$work/pg/log"; echo "FAILED: PostgreSQL did not start"; exit 1; }
    run "token on the PostgreSQL store (BENCH_STORE_URL)" token-auto-n4-c64-pg.json \
        env BENCH_STORE_URL="postgres://bench:$password@127.0.0.1:$port/postgres?sslmode=disable" \
        cargo bench -q --bench token -- --connections 4 --concurrency 64 --seconds 0.5 --rounds 1
else
    echo "FAILED: no initdb for the PostgreSQL store's run"; exit 1
fi

run "scripts/soak.sh" soak.json env MINUTES=0.1 SAMPLE=2 scripts/soak.sh
run "scripts/crash-test.sh" - env ROUNDS=1 scripts/crash-test.sh
grep -q "test result: ok. 1 passed" "$work/out" || { cat "$work/out"; echo "FAILED: the crash test did not run"; exit 1; }
run "scripts/flake-loop.sh" - env RUNS=1 scripts/flake-loop.sh --test integration admin_cli
grep -q "run 1/1: ok" "$work/out" && grep -q "test result: ok. [1-9]" target/flake-loop/run-1.log \
    || { cat "$work/out"; echo "FAILED: the flake loop ran no test"; exit 1; }
echo "every bench and script ran"
