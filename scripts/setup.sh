#!/usr/bin/env bash
# Installs what Ferry's build, tests and benchmarks need, skipping what is already there.
# Idempotent; run as root (or with sudo available) on Debian 12.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

# Debian packages: QEMU (side-by-side runs), tools to unpack the Linux test kernel, iperf3,
# libclang-dev (the userfaultfd crate generates its kernel bindings with bindgen at build time),
# qemu-utils (qemu-img: the oracle the disk-image tests check against), etcd-server (the
# cluster store's tests run real etcd members), protobuf-compiler (the etcd-client crate
# compiles etcd's gRPC definitions at build time), ethtool, iputils-ping and iproute2 (the
# network test topology, scripts/netlab.sh).
missing() {
  need=()
  for p in qemu-system-x86 qemu-utils lz4 zstd xz-utils python3 iperf3 libclang-dev etcd-server protobuf-compiler ethtool iputils-ping iproute2; do
    # Installed, not merely known to dpkg (a removed package keeps its record, and `dpkg -s`
    # succeeds on it).
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
}
# Two rounds: an install can remove a package that was there. Seen on 2026-12-04: the machine
# came with a backported qemu-utils 10, and installing Debian 12's qemu-system-x86 (7.2)
# removed it because the two versions' common files conflict; the second round installs
# qemu-utils 7.2 to match.
updated=""
for round in 1 2; do
  missing
  [ ${#need[@]} -gt 0 ] || break
  echo "setup: installing ${need[*]}" >&2
  [ -n "$updated" ] || { $sudo apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
done

for c in qemu-system-x86_64 qemu-img qemu-io iperf3 etcd protoc ethtool ping ip tc; do
  command -v "$c" >/dev/null || { echo "setup: $c is still missing after the install" >&2; exit 1; }
done

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
done

# The Debian cloud kernel for the Linux boot tests (cached in .ferry-cache/).
"$root/scripts/fetch-linux-kernel.sh" "$root/.ferry-cache" >/dev/null

if [ ! -c /dev/kvm ]; then
  echo "setup: warning: /dev/kvm is missing: Ferry needs KVM to run VMs" >&2
fi
