#!/usr/bin/env bash
# The Dockerfile's build, without a Docker engine: copies exactly what its build stage COPYs
# into an empty folder, runs its RUN command there, then starts the built binary the way the
# image's ENTRYPOINT would, with the image's ENV (only the data directory moved to a temp dir),
# and probes it: /readyz answers "ready", credbrokerctl lists the callers with the admin token,
# SIGTERM stops it with status 0. CI runs this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
ctx=$(mktemp -d)
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$ctx"
}
trap cleanup EXIT

# The build stage: from the first FROM up to the second.
awk '/^FROM /{n++} n==1' Dockerfile > "$ctx/build-stage"
root="$ctx/root"
mkdir -p "$root"
grep -E '^COPY ' "$ctx/build-stage" | grep -v -- '--from' | while read -r _ args; do
    read -r -a parts <<< "$args"
    dest="${parts[${#parts[@]}-1]}"
    unset 'parts[${#parts[@]}-1]'
    for src in "${parts[@]}"; do
        if [[ "$dest" == */ ]]; then
            mkdir -p "$root/$dest"
            cp -R "$repo/$src" "$root/$dest"
        else
            mkdir -p "$(dirname "$root/$dest")"
            cp -R "$repo/$src" "$root/$dest"
        fi
    done
done
run=$(grep -E '^RUN ' "$ctx/build-stage" | sed 's/^RUN //')
echo "--- in a context holding only: $(cd "$root" && ls | tr '\n' ' ')"
echo "--- $run"
(cd "$root" && CARGO_TARGET_DIR="$root/target" bash -c "$run")

# The final stage's ENV (continuation lines joined), as the entrypoint sees it.
env_line=$(awk '/^FROM /{n++} n==2' Dockerfile | sed -e ':a' -e '/\\$/N; s/\\\n//; ta' | grep -E '^ENV ' | sed 's/^ENV //')
declare -a image_env=()
data="$ctx/data"
mkdir -p "$data"
for kv in $env_line; do
    case "$kv" in
        CREDBROKER_DATA_DIR=*) image_env+=("CREDBROKER_DATA_DIR=$data") ;;
        *) image_env+=("$kv") ;;
    esac
done
http=$(printf '%s\n' "${image_env[@]}" | sed -n 's/^CREDBROKER_HTTP_LISTEN=//p' | sed 's/^0\.0\.0\.0/127.0.0.1/')
grpc=$(printf '%s\n' "${image_env[@]}" | sed -n 's/^CREDBROKER_LISTEN=//p' | sed 's/^0\.0\.0\.0/127.0.0.1/')
entry=$(awk '/^FROM /{n++} n==2' Dockerfile | sed -n 's/^ENTRYPOINT \["\([^"]*\)"\]/\1/p')
bin="$root/target/release/$(basename "$entry")"
echo "--- starting $(basename "$entry") as the image would (${image_env[*]})"
env -i PATH=/usr/bin:/bin HOME="$data" "${image_env[@]}" "$bin" > "$ctx/broker.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
    if curl -fsS "http://$http/readyz" 2>/dev/null | grep -q ready; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$ctx/broker.log"; echo "the binary exited"; exit 1; fi
    sleep 0.2
done
curl -fsS "http://$http/readyz" | grep -q ready || { cat "$ctx/broker.log"; echo "/readyz never said ready"; exit 1; }
"$root/target/release/credbrokerctl" --addr "http://$grpc" --token-file "$data/admin.token" caller list | grep -q admin \
    || { cat "$ctx/broker.log"; echo "credbrokerctl could not list the callers"; exit 1; }
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
if [ "$status" != 0 ]; then cat "$ctx/broker.log"; echo "exit status $status after SIGTERM"; exit 1; fi
echo "--- the image's context builds; its entrypoint serves (/readyz ready, ctl works) and stops cleanly"
