#!/usr/bin/env bash
# Cluster soak: two `ferry host` agents over a throwaway etcd and the disk-writing test guest,
# faults in turn for MINUTES (default 10): kill -9 of the owner host, SIGSTOP of its agent
# past the TTL, a live migration, a drain. Prints the counts (runs, failovers, migrations,
# drains, fenced writes refused, samples with two copies running: must be 0).
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY_SOAK_MINUTES=${1:-10} cargo test --release -p ferry --test cluster_soak -- \
  --ignored --nocapture --test-threads=1
