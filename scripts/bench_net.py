#!/usr/bin/env python3
"""Network request/reply rate and latency seen from the host, Ferry vs QEMU 7.2 microvm, same
test guest, same run.

The guest's `net` workload answers UDP echo (port 7) on a tap; the host (this script) sends
64-byte datagrams to it from the tap's host address:
  - latency: one request at a time, N round trips; p50 / p99 round trip and the rate that gives;
  - rate: `--window` requests kept in flight; replies per second over `--seconds`.
Every reply must carry the request's payload (the guest appends its reply counter). QEMU:
`-netdev tap` with a modern virtio-mmio `virtio-net-device`; Ferry: `--net tap=`. Root needed
(the script creates and deletes the tap).

usage: scripts/bench_net.py [--runs N] [--ferry PATH]
"""
import os, select, socket, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import guest_image, interleaved, microvm, parse, parser, qemu_version  # noqa: E402

TAP, PREFIX = "fbnet0", "10.211.7"


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def start(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    for raw in p.stdout:
        if raw.startswith(b"M0 "):
            return p
    p.kill()
    raise RuntimeError(f"{cmd[0]}: the guest's NIC never came up")


def latency(s, n):
    rtts = []
    for i in range(n):
        msg = i.to_bytes(8, "little") * 8
        t0 = time.perf_counter()
        s.send(msg)
        while True:
            r = s.recv(2048)
            if r[:64] == msg:
                break
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    return rtts[len(rtts) // 2] * 1e6, rtts[len(rtts) * 99 // 100] * 1e6


def rate(s, window, seconds):
    s.setblocking(False)
    sent = got = 0
    inflight = set()
    t_end = time.perf_counter() + seconds
    last = time.perf_counter()
    while time.perf_counter() < t_end:
        while len(inflight) < window:
            msg = sent.to_bytes(8, "little") * 8
            s.send(msg)
            inflight.add(msg)
            sent += 1
        if select.select([s], [], [], 0.05)[0]:
            while True:
                try:
                    r = s.recv(2048)
                except BlockingIOError:
                    break
                if r[:64] in inflight:
                    inflight.discard(r[:64])
                    got += 1
                    last = time.perf_counter()
        elif time.perf_counter() - last > 0.05:
            inflight.clear()  # lost (the guest keeps 4 receive buffers): send on
    s.setblocking(True)
    return got / seconds


def main():
    ap = parser(__doc__, runs=3)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3)
    a = parse(ap)
    qv = qemu_version()
    subprocess.run(["ip", "link", "del", TAP], capture_output=True)
    sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
    try:
        sh("ip", "addr", "add", f"{PREFIX}.1/24", "dev", TAP)
        sh("ip", "link", "set", TAP, "up")
        with tempfile.TemporaryDirectory() as d:
            image = guest_image(a.ferry, d)
            work = f"net ip={PREFIX}.2"
            cmds = {
                "Ferry": [a.ferry, "run", "--memory", "256M", "--guest", work, "--net", f"tap={TAP}"],
                "QEMU": microvm(image, work, tap=TAP),
            }

            def measure(c):
                p = start(c)
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind((f"{PREFIX}.1", 0))
                    s.connect((f"{PREFIX}.2", 7))
                    s.settimeout(2)
                    latency(s, 50)  # ARP and warm-up
                    p50, p99 = latency(s, a.pings)
                    r = (p50, p99, 1e6 / p50, rate(s, a.window, a.seconds))
                    s.close()
                    return r
                finally:
                    p.kill()
                    p.wait()

            res = interleaved(cmds, a.runs, measure)
        print(f"UDP echo to the test guest over a tap, 64-byte requests, {a.runs} runs each, "
              f"medians ({qv}).\n")
        print(f"| VMM | round trip p50 µs | p99 µs | requests/s, 1 in flight | requests/s, {a.window} in flight |")
        print("|---|---:|---:|---:|---:|")
        med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in res.items()}
        for k, m in med.items():
            print(f"| {k} | {m[0]:.0f} | {m[1]:.0f} | {m[2]:.0f} | {m[3]:.0f} |")
        f, q = med["Ferry"], med["QEMU"]
        print(f"| Ferry/QEMU | {f[0] / q[0]:.2f}× | {f[1] / q[1]:.2f}× | {f[2] / q[2]:.2f}× | {f[3] / q[3]:.2f}× |")
    finally:
        subprocess.run(["ip", "link", "del", TAP], capture_output=True)


if __name__ == "__main__":
    main()
