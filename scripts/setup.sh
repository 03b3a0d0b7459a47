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
need=()
for p in qemu-system-x86 qemu-utils lz4 zstd xz-utils python3 iperf3 libclang-dev etcd-server protobuf-compiler ethtool iputils-ping iproute2; do
  # Installed, not merely known to dpkg (a removed package keeps its record, and `dpkg -s`
  # succeeds on it).
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

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
