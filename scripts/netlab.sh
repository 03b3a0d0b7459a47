#!/usr/bin/env bash
# The test topology (docs/network.md): two sites on different IP subnets joined by a router,
# a client outside both, and a WAN link with latency and bandwidth between the router and
# site B. Every "host" is a network namespace; run as root.
#
#   netlab.sh up P [--delay-ms D] [--rate R]   build it (namespaces P-a, P-d, P-b, P-r, P-w, P-c)
#   netlab.sh down P                           tear it down (also what is left of a failed up)
#
#   P-a  a0 10.61.1.2/24 ---- ra \
#                                 sa 10.61.1.1/24 (a bridge: site A's LAN)
#   P-d  d0 10.61.1.3/24 ---- rd /              \
#                                               P-r (router, forwards)
#   P-c  c0 10.61.3.2/24 ---- rc 10.61.3.1/24 /  rb 10.61.2.1/24
#                                                 |
#   P-w  (the WAN: wr <-> wb through ferry-wire, D ms each way; tbf at R on both egresses)
#                                                 |
#   P-b  b0 10.61.2.2/24 -------------------------'
#
# netem is not in this kernel, so the delay comes from ferry-wire (crates/net), which needs
# the offloads off on its legs (ethtool); bandwidth is tc tbf. P is at most 5 characters
# (interface names are P plus a suffix, at most 15). ferry-wire's pid is in
# ${TMPDIR:-/tmp}/netlab-P.pid.
set -euo pipefail
cmd=${1:-}; p=${2:-}
[ -n "$cmd" ] && [ -n "$p" ] || { echo "usage: netlab.sh up|down PREFIX [--delay-ms D] [--rate R]" >&2; exit 2; }
[ ${#p} -le 5 ] || { echo "netlab.sh: prefix $p is longer than 5 characters" >&2; exit 2; }
shift 2
delay=0; rate=""
while [ $# -gt 0 ]; do
  case $1 in
    --delay-ms) delay=$2; shift 2;;
    --rate) rate=$2; shift 2;;
    *) echo "netlab.sh: unknown option $1" >&2; exit 2;;
  esac
done
pidfile=${TMPDIR:-/tmp}/netlab-$p.pid
root=$(cd "$(dirname "$0")/.." && pwd)
wire=${FERRY_WIRE:-$root/target/debug/ferry-wire}

down() {
  if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  rm -f "${pidfile%.pid}.log"
  for n in a d b r w c; do ip netns del "$p-$n" 2>/dev/null || true; done
}

inns() { local n=$1; shift; ip netns exec "$p-$n" "$@"; }

# veth NS1 IF1 NS2 IF2: a veth pair between two namespaces, both ends up.
veth() {
  ip link add "$p$2" type veth peer name "$p$4"
  ip link set "$p$2" netns "$p-$1"; ip link set "$p$4" netns "$p-$3"
  inns "$1" ip link set "$p$2" up; inns "$3" ip link set "$p$4" up
}

up() {
  down
  trap 'down' ERR
  [ -x "$wire" ] || { echo "netlab.sh: $wire missing (cargo build -p ferry-net)" >&2; exit 1; }
  for n in a d b r w c; do ip netns add "$p-$n"; inns "$n" ip link set lo up; done
  veth a a0 r ra; veth d d0 r rd; veth c c0 r rc; veth r rb w wr; veth w wb b b0
  # Site A is a LAN of two hosts: the router's bridge joins them.
  inns r ip link add "${p}sa" type bridge; inns r ip link set "${p}sa" up
  inns r ip link set "${p}ra" master "${p}sa"; inns r ip link set "${p}rd" master "${p}sa"
  inns a ip addr add 10.61.1.2/24 dev "${p}a0"; inns a ip route add default via 10.61.1.1
  inns d ip addr add 10.61.1.3/24 dev "${p}d0"; inns d ip route add default via 10.61.1.1
  inns c ip addr add 10.61.3.2/24 dev "${p}c0"; inns c ip route add default via 10.61.3.1
  inns b ip addr add 10.61.2.2/24 dev "${p}b0"; inns b ip route add default via 10.61.2.1
  inns r ip addr add 10.61.1.1/24 dev "${p}sa"
  inns r ip addr add 10.61.3.1/24 dev "${p}rc"
  inns r ip addr add 10.61.2.1/24 dev "${p}rb"
  inns r sysctl -qw net.ipv4.ip_forward=1
  # The wire sees every frame one by one, at most an MTU long, with its checksums filled in
  # (a veth leaves TCP/UDP checksums to "the hardware" unless tx offload is off).
  for x in "r ${p}rb" "w ${p}wr" "w ${p}wb" "b ${p}b0"; do
    set -- $x
    inns "$1" ethtool -K "$2" gro off gso off tso off tx off >/dev/null
  done
  if [ -n "$rate" ]; then
    for i in wr wb; do
      inns w tc qdisc add dev "$p$i" root tbf rate "$rate" burst 32kbit latency 50ms
    done
  fi
  ip netns exec "$p-w" "$wire" --a "${p}wr" --b "${p}wb" --delay-ms "$delay" </dev/null >/dev/null 2>"${pidfile%.pid}.log" &
  echo $! > "$pidfile"
  # Ready once a frame crosses the wire.
  for _ in $(seq 1 50); do
    if inns c ping -c 1 -W 1 10.61.2.2 >/dev/null 2>&1; then trap - ERR; return 0; fi
    sleep 0.1
  done
  echo "netlab.sh: no traffic across the WAN link" >&2
  down; exit 1
}

case $cmd in
  up) up;;
  down) down;;
  *) echo "netlab.sh: unknown command $cmd" >&2; exit 2;;
esac
