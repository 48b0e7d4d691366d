#!/usr/bin/env bash
# The long crash test: ROUNDS rounds (default 100) of concurrent RegisterSystem/RotateCredential
# load against the real binary, kill -9 at a seeded random moment, restart and verify every
# acknowledged write (tests/integration/crash.rs). CI runs 3 rounds as part of the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
CREDBROKER_CRASH_ROUNDS="${ROUNDS:-100}" \
  cargo test --release --test integration kill_9_under_write_load -- --nocapture
