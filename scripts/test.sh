#!/usr/bin/env bash
# Ferry's whole test suite: setup (idempotent), format and lint checks, then every test
# (unit tests, VMs on real KVM, QEMU side by side, Linux boot) with cargo-nextest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-tests=fail
else
  cargo test --workspace -- --test-threads=1
fi
