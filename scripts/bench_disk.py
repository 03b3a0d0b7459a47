#!/usr/bin/env python3
"""Disk throughput seen by the test guest, Ferry vs QEMU 7.2 microvm, same image, same run.

The guest's `disk` workload writes its span once (one request at a time: queue depth 1),
flushes, reads it all back and checks it. The host timestamps the guest's start line and its
`K0 1 ok` line; MB/s = 2 x span / that time (written + read). Runs interleave the two VMMs.
Queue depth 32 and random offsets need a deeper guest driver (not there yet).

usage: scripts/bench_disk.py [--runs N] [--span 64M] [--ferry PATH]
"""
import argparse, os, statistics, subprocess, sys, tempfile, time


def timed(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    t0 = None
    try:
        for raw in p.stdout:
            if raw.startswith(b"S0 "):
                t0 = time.monotonic()
            elif raw.startswith(b"K0 1 "):
                if not raw.strip().endswith(b"ok"):
                    raise RuntimeError(f"{cmd[0]}: {raw!r}")
                return time.monotonic() - t0
        raise RuntimeError(f"no K0 line from {cmd[0]}")
    finally:
        p.kill()
        p.wait()


def size(s):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * m[s[-1].upper()] if s[-1].isalpha() else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--span", default="64M")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--ferry", default=os.path.join(root, "target", "release", "ferry"))
    a = ap.parse_args()
    if not os.path.exists(a.ferry):
        sys.exit(f"{a.ferry} not found: run 'cargo build --release' first")
    span = size(a.span)
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"Guest disk throughput, write then read back {a.span} once, queue depth 1, raw image "
          f"on {os.path.realpath(tempfile.gettempdir())}, {a.runs} runs each ({qv}).\n")
    print("| request size | VMM | median MB/s | min | max |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "ferry-guest.elf")
        subprocess.run([a.ferry, "guest-image", "--output", image], check=True)
        disk = os.path.join(d, "disk.raw")
        for bs in ["4K", "64K", "1M"]:
            work = f"disk span={a.span} bs={bs} passes=1"
            cmds = {
                "Ferry": [a.ferry, "run", "--memory", "256M", "--guest", work, "--disk", f"path={disk}"],
                "QEMU": ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", "256", "-nodefaults",
                         "-display", "none", "-no-reboot", "-serial", "stdio",
                         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                         "-global", "virtio-mmio.force-legacy=false",
                         "-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback",
                         "-device", "virtio-blk-device,drive=d0", "-kernel", image, "-append", work],
            }
            res = {k: [] for k in cmds}
            for _ in range(a.runs):
                for k, c in cmds.items():
                    with open(disk, "wb") as f:
                        f.truncate(span * 2)
                    res[k].append(2 * span / timed(c) / 1e6)
            for k, v in res.items():
                print(f"| {bs} | {k} | {statistics.median(v):.0f} | {min(v):.0f} | {max(v):.0f} |")
            f, q = statistics.median(res["Ferry"]), statistics.median(res["QEMU"])
            print(f"| {bs} | Ferry/QEMU | {f / q:.2f}x | | |")


if __name__ == "__main__":
    main()
