#!/usr/bin/env bash
# Fetches Debian's cloud kernel (package linux-image-cloud-amd64) and extracts its vmlinuz
# without installing it. Prints the path of the kernel. Idempotent: reuses what is cached.
#   usage: scripts/fetch-linux-kernel.sh [CACHE_DIR]   (default: .ferry-cache)
set -euo pipefail
cache=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.ferry-cache"}
mkdir -p "$cache"
if [ -s "$cache/vmlinuz" ] && [ -s "$cache/vmlinux" ]; then
  echo "$cache/vmlinuz"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
meta=linux-image-cloud-amd64
# The metapackage depends on the versioned image package; resolve it.
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq >&2
  pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "cannot resolve $meta to a kernel package" >&2; exit 1; }
(cd "$work" && apt-get download -qq "$pkg" >&2)
dpkg-deb -x "$work"/*.deb "$work/x"
src=$(ls "$work"/x/boot/vmlinuz-* | head -n 1)
cp "$src" "$cache/vmlinuz.tmp"
# Also extract the ELF vmlinux from the bzImage payload (boot protocol fields
# setup_sects at 0x1f1 and payload_offset at 0x248): on this machine's KVM, guest CPL 0 code
# is emulated, and the bzImage decompressor alone takes minutes there (docs/linux-boot.md).
read -r setup_sects payload_off < <(python3 -c '
import struct,sys
d=open(sys.argv[1],"rb").read(0x250)
print(d[0x1f1] or 4, struct.unpack_from("<I",d,0x248)[0])' "$cache/vmlinuz.tmp")
start=$(( (setup_sects + 1) * 512 + payload_off ))
magic=$(od -An -tx1 -j "$start" -N 4 "$cache/vmlinuz.tmp" | tr -d ' \n')
case "$magic" in
  02214c18) dec="lz4 -dc" ;;
  28b52ffd) dec="zstd -dc" ;;
  fd377a58) dec="xz -dc" ;;
  1f8b08*) dec="gzip -dc" ;;
  *) echo "unknown kernel payload compression (magic $magic)" >&2; exit 1 ;;
esac
tail -c +$((start + 1)) "$cache/vmlinuz.tmp" | $dec > "$cache/vmlinux.tmp" 2>/dev/null || true
[ "$(od -An -c -j 1 -N 3 "$cache/vmlinux.tmp" | tr -d ' ')" = ELF ] || { echo "vmlinux extraction failed" >&2; exit 1; }
mv "$cache/vmlinux.tmp" "$cache/vmlinux"
mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
basename "$src" | sed 's/^vmlinuz-//' > "$cache/vmlinuz.version"
echo "$cache/vmlinuz"
