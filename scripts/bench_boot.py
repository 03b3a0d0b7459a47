#!/usr/bin/env python3
"""Time from process start to the test guest's first heartbeat: Ferry vs QEMU, same image,
same run. Prints a Markdown table (median / min / max over N runs).

usage: scripts/bench_boot.py [--runs N] [--ferry PATH]
"""
import os, re, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import guest_image, interleaved, parse, parser, qemu_version  # noqa: E402

WORKLOAD = "heartbeat period=1000 count=3"


def first_heartbeat(cmd):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        for raw in p.stdout:
            if raw.startswith(b"H0 1 "):
                return time.monotonic() - t0
        raise RuntimeError(f"no heartbeat from {cmd[0]}")
    finally:
        p.kill()
        p.wait()


def main():
    a = parse(parser(__doc__, runs=10))
    with tempfile.TemporaryDirectory() as d:
        image = guest_image(a.ferry, d)
        cmds = {
            "Ferry": [a.ferry, "run", "--memory", "256M", "--guest", WORKLOAD],
            "QEMU": ["qemu-system-x86_64", "-enable-kvm", "-m", "256", "-nodefaults", "-display", "none",
                     "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
                     "-kernel", image, "-append", WORKLOAD],
        }
        res = interleaved(cmds, a.runs, lambda c: first_heartbeat(c) * 1e3)
    qv = qemu_version()
    print(f"Time from process start to first heartbeat, test guest, 256 MiB, {a.runs} runs each ({qv}).\n")
    print("| VMM | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    f, q = statistics.median(res["Ferry"]), statistics.median(res["QEMU"])
    print(f"\nFerry/QEMU median ratio: {f / q:.3f}")

    # Pause latency: time for Vm::pause to stop every vCPU (ferry demo reports it).
    lat = []
    for _ in range(a.runs):
        out = subprocess.run([a.ferry, "demo", "--beats", "6", "--period-us", "5000"],
                             capture_output=True, text=True, check=True).stdout
        m = re.search(r"all vCPUs stopped in ([0-9.]+) ms", out)
        lat.append(float(m.group(1)))
    print(f"\nFerry pause latency (1 vCPU running the heartbeat, `ferry demo`), {a.runs} runs: "
          f"median {statistics.median(lat):.3f} ms, max {max(lat):.3f} ms")


if __name__ == "__main__":
    main()
