#!/usr/bin/env python3
"""Disk throughput seen by the test guest, Ferry vs QEMU 7.2 microvm, same image, same run.

The guest's `disk-bench` workload issues a fixed number of requests (writes, or reads) of one
size at sequential or random offsets in the span, with 1 or 32 in flight, and times them by its
own TSC (`Q0 <ops> <bytes> <ticks> <kHz>`, kHz from its own PIT calibration): what the
guest sees, from its first request to its last completion, boot excluded. Each run starts from a fresh sparse image; runs interleave the two
VMMs. Reads run on an image the same run wrote first.

usage: scripts/bench_disk.py [--runs N] [--span 64M] [--ferry PATH]
"""
import os, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import guest_image, interleaved, microvm, parse, parser, qemu_version  # noqa: E402


def timed(cmd):
    """Runs a VM to its `Q0` line; returns MB/s and IOPS as the guest timed them."""
    out = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=300).stdout
    for raw in out.splitlines():
        if raw.startswith(b"Q0 "):
            ops, nbytes, ticks, khz = (int(x) for x in raw.split()[1:5])
            us = ticks / (khz / 1000)
            return nbytes / us, ops / us * 1e6
    raise RuntimeError(f"no Q0 line from {cmd[0]}: {out[-300:]!r}")


def size(s):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * m[s[-1].upper()] if s[-1].isalpha() else int(s)


def main():
    ap = parser(__doc__, runs=5)
    ap.add_argument("--span", default="64M")
    a = parse(ap)
    span = size(a.span)
    qv = qemu_version()
    print(f"Guest disk throughput by the guest's clock, {a.span} span, raw image on "
          f"{os.path.realpath(tempfile.gettempdir())}, {a.runs} runs each ({qv}).\n")
    print("| requests | queue depth | VMM | median MB/s | min | max | median IOPS |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        image = guest_image(a.ferry, d)
        disk = os.path.join(d, "disk.raw")
        rows = [("sequential 1M writes", "bs=1M", False), ("random 4K writes", "bs=4K random=1", False),
                ("random 4K reads", "bs=4K random=1 read=1", True)]
        for name, args, reads in rows:
            for qd in (1, 32):
                work = f"disk-bench span={a.span} {args} qd={qd}"
                if "4K" in args:
                    work += f" ops={min(span // 4096, 16384)}"
                cmds = {
                    "Ferry": [a.ferry, "run", "--memory", "256M", "--guest", work, "--disk", f"path={disk}"],
                    "QEMU": microvm(image, work, disk=disk),
                }

                def fresh_disk():
                    with open(disk, "wb") as f:
                        f.truncate(span * 2)
                    if reads:  # something to read: the span written once, in the page cache
                        with open(disk, "r+b") as f:
                            f.write(os.urandom(1 << 20) * (span >> 20))

                res = interleaved(cmds, a.runs, timed, prepare=fresh_disk)
                for k, v in res.items():
                    mb = [x[0] for x in v]
                    print(f"| {name} | {qd} | {k} | {statistics.median(mb):.0f} | {min(mb):.0f} | "
                          f"{max(mb):.0f} | {statistics.median(x[1] for x in v):.0f} |", flush=True)
                f = statistics.median(x[0] for x in res["Ferry"])
                q = statistics.median(x[0] for x in res["QEMU"])
                print(f"| {name} | {qd} | Ferry/QEMU | {f / q:.2f}x | | | |", flush=True)


if __name__ == "__main__":
    main()
