#!/usr/bin/env bash
# Fuzzes the migration protocol decoder and the snapshot reader with AFL++ through cargo-afl
# (`cargo install cargo-afl`, stable Rust; it builds and runs its own AFL++ — Debian's afl++
# 4.04c cannot talk to cargo-afl 0.18's fork server). Usage: scripts/fuzz.sh [SECONDS per
# target]
# Prints each target's executions, paths and crashes; crashing inputs stay in
# target/fuzz-out/TARGET/default/crashes for reproduction (`target/release/TARGET < FILE`
# under fuzz/).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
command -v cargo-afl >/dev/null || cargo install cargo-afl
(cd fuzz && cargo run --release --bin seeds -- ../target/fuzz-seeds)
(cd fuzz && cargo afl build --release --bin protocol --bin snapshot)
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
for t in protocol snapshot; do
    out=target/fuzz-out/$t
    rm -rf "$out"; mkdir -p target/fuzz-out
    timeout --signal=INT "$((secs + 30))" \
        cargo afl fuzz -V "$secs" -i "target/fuzz-seeds/$t" -o "$out" -- "fuzz/target/release/$t" \
        > "target/fuzz-$t.log" 2>&1 || true
    s=$out/default/fuzzer_stats
    if [ -f "$s" ]; then
        echo "$t: $(grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs) ' "$s" | awk '{printf "%s=%s ", $1, $3}')"
    else
        echo "$t: no stats (see target/fuzz-$t.log)"; tail -20 "target/fuzz-$t.log"
    fi
done
