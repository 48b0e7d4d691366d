#!/usr/bin/env bash
# The Dockerfile's build, without a Docker engine: copies exactly what its build stage COPYs
# into an empty folder, runs its RUN command there, then starts the built binary the way the
# image's ENTRYPOINT would, with the image's ENV (the data directory moved to a temp dir, and the
# listeners on loopback port 0 instead of 0.0.0.0:50051/8080 so that nothing on the machine
# collides), and probes it: /readyz answers "ready", credbrokerctl lists the callers with the
# admin token, SIGTERM stops it with status 0. CI runs this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
# The build's target folder stays in one place, so that a second run reuses it. The context
# is a fresh folder outside the repository, as in the image (WORKDIR /src): cargo reads
# `.cargo/config.toml` in every parent folder of where it runs, so a context inside the
# repository would build with the repository's flags even if the Dockerfile forgot to COPY them.
work="$repo/target/docker-context"
mkdir -p "$work"
root=$(mktemp -d)
run_dir=$(mktemp -d)
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$run_dir" "$root"
}
trap cleanup EXIT

# The build stage: from the first FROM up to the second.
awk '/^FROM /{n++} n==1' Dockerfile > "$run_dir/build-stage"
grep -E '^COPY ' "$run_dir/build-stage" | while read -r _ args; do
    read -r -a parts <<< "$args"
    # Flags (--from, --chown, --chmod, --link): a copy from another stage is not context.
    srcs=()
    from_stage=0
    for p in "${parts[@]}"; do
        case "$p" in
            --from=*) from_stage=1 ;;
            --*) ;;
            *) srcs+=("$p") ;;
        esac
    done
    [ "$from_stage" = 1 ] && continue
    dest="${srcs[${#srcs[@]}-1]}"
    unset 'srcs[${#srcs[@]}-1]'
    for src in "${srcs[@]}"; do
        if [[ "$dest" == */ ]]; then
            mkdir -p "$root/$dest"
            cp -R "$repo/$src" "$root/$dest"
        else
            mkdir -p "$(dirname "$root/$dest")"
            cp -R "$repo/$src" "$root/$dest"
        fi
    done
done
if [ "$(grep -cE '^RUN ' "$run_dir/build-stage")" != 1 ]; then
    echo "the build stage must have exactly one RUN line for this check"; exit 1
fi
run=$(grep -E '^RUN ' "$run_dir/build-stage" | sed 's/^RUN //')
echo "--- in a context holding only: $(cd "$root" && ls | tr '\n' ' ')"
echo "--- $run"
(cd "$root" && CARGO_TARGET_DIR="$work/target" bash -c "$run")

# The final stage's ENV (continuation lines joined), as the entrypoint sees it.
env_line=$(awk '/^FROM /{n++} n==2' Dockerfile | sed -e ':a' -e '/\\$/N; s/\\\n//; ta' | grep -E '^ENV ' | sed 's/^ENV //')
data="$run_dir/data"
mkdir -p "$data"
declare -a image_env=()
read -r -a pairs <<< "$env_line"
for kv in "${pairs[@]}"; do
    case "$kv" in
        CREDBROKER_DATA_DIR=*) image_env+=("CREDBROKER_DATA_DIR=$data") ;;
        CREDBROKER_LISTEN=*) image_env+=("CREDBROKER_LISTEN=127.0.0.1:0") ;;
        CREDBROKER_HTTP_LISTEN=*) image_env+=("CREDBROKER_HTTP_LISTEN=127.0.0.1:0") ;;
        *=*) image_env+=("$kv") ;;
        *) echo "ENV entry '$kv' is not KEY=VALUE"; exit 1 ;;
    esac
done
entry=$(awk '/^FROM /{n++} n==2' Dockerfile | sed -n 's/^ENTRYPOINT \["\([^"]*\)"\]/\1/p')
bin="$work/target/release/$(basename "$entry")"
log="$run_dir/broker.log"
echo "--- starting $(basename "$entry") as the image would (${image_env[*]})"
env -i PATH=/usr/bin:/bin HOME="$data" "${image_env[@]}" "$bin" > "$log" 2>&1 &
pid=$!
addr_of() { sed -n "s/.*\"message\":\"$1\".*\"addr\":\"\([^\"]*\)\".*/\1/p" "$log" | head -1; }
fail() { cat "$log"; echo "$1"; exit 1; }
ready=""
for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || fail "the binary exited"
    http=$(addr_of "HTTP listening.")
    if [ -n "$http" ] && curl -fsS "http://$http/readyz" 2>/dev/null | grep -q ready; then
        ready=1
        break
    fi
    sleep 0.2
done
[ -n "$ready" ] || fail "/readyz never said ready"
grpc=$(addr_of "gRPC listening.")
env -u CREDBROKER_TOKEN -u CREDBROKER_TOKEN_FILE -u CREDBROKER_ADDR \
    "$work/target/release/credbrokerctl" --addr "http://$grpc" --token-file "$data/admin.token" \
    caller list | grep -q admin || fail "credbrokerctl could not list the callers"
kill -TERM "$pid"
for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done
kill -0 "$pid" 2>/dev/null && fail "still running 30 s after SIGTERM"
status=0
wait "$pid" || status=$?
pid=""
[ "$status" = 0 ] || fail "exit status $status after SIGTERM"
# Built with the repository's flags (.cargo/config.toml): the start logs them.
if ! grep -q '"message":"Runtime built.".*"tokio_unstable":true' "$log"; then
    fail "the image is built without .cargo/config.toml's flags"
fi
echo "--- the image's context builds; its entrypoint serves (/readyz ready, ctl works) and stops cleanly"
