#!/usr/bin/env bash
# The reliability suite, the conformance suite (every backend) and the many-hosts Postgres
# suite at soak sizes. Prints one "figures:" line per area; paste them into
# docs/RELIABILITY.md with the date and machine. Sizes can be overridden by env vars.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AGENTMOUNT_COHERENCE_TRIALS=${AGENTMOUNT_COHERENCE_TRIALS:-10000}
export AGENTMOUNT_DAEMON_KILL_CYCLES=${AGENTMOUNT_DAEMON_KILL_CYCLES:-200}
export AGENTMOUNT_CRASH_CYCLES=${AGENTMOUNT_CRASH_CYCLES:-200}
export AGENTMOUNT_LOAD_SECS=${AGENTMOUNT_LOAD_SECS:-60}
export AGENTMOUNT_LOST_SECS=${AGENTMOUNT_LOST_SECS:-30}
export AGENTMOUNT_TORN_ROUNDS=${AGENTMOUNT_TORN_ROUNDS:-50}
export AGENTMOUNT_FUZZ_CASES=${AGENTMOUNT_FUZZ_CASES:-20000}
export AGENTMOUNT_CONFORMANCE_KILLS=${AGENTMOUNT_CONFORMANCE_KILLS:-60}
export AGENTMOUNT_CONFORMANCE_ROUNDS=${AGENTMOUNT_CONFORMANCE_ROUNDS:-200}
log=$(mktemp)
status=0
cargo test --release --no-fail-fast --test reliability --test store --test conformance --test journal --test sqlite_reload --test postgres -- --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
grep -o "figures: .*" "$log" | sed 's/^figures: //'
grep -E "^test result|FAILED|panicked" "$log" || true
rm -f "$log"
exit "$status"
