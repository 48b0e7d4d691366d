#!/usr/bin/env bash
# Soak: MINUTES (default 30) of mixed load against the real binary, sampling RSS and data-dir
# size every SAMPLE seconds (default 60); prints a markdown table and writes
# bench-results/soak.json (benches/soak.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench soak -- --minutes "${MINUTES:-30}" --sample-secs "${SAMPLE:-60}"
