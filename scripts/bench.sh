#!/usr/bin/env bash
# Every benchmark, against native work in the same run: prints markdown tables for
# docs/BENCHMARKS.md. BENCH_QUICK=1 for reduced sizes; BENCH_ONLY=sqlite (or attachments, cp,
# sessions, gc, comma-separated) runs only those sections of the mount benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo bench --bench store 2>/dev/null
echo
cargo bench --bench mount 2>/dev/null
