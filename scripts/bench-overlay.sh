#!/usr/bin/env bash
# Issue #14's benchmarks (docs/benchmarks.md, "Open connections across moves"): the stall of
# an open TCP connection across live moves within a site and across sites at several WAN
# round-trip times, and live migration's total time over the WAN link. Root needed (network
# namespaces). Environment: FERRY_BENCH_RUNS (3), FERRY_BENCH_DELAYS (one-way ms, "0,10,25").
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --quiet
cargo nextest run -p ferry --test overlay_bench --run-ignored only --no-capture \
  --test-threads 1 "$@" 2>&1 | grep -E '^\||panicked|FAIL'
