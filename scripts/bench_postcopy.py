#!/usr/bin/env python3
"""Post-copy side by side, one run: the same test guest image and workload migrated by
post-copy QEMU -> QEMU (Debian's qemu-system-x86: capability postcopy-ram, then
migrate-start-postcopy) and Ferry -> Ferry (`ferry migrate --postcopy-after N`), on loopback,
one stream, no bandwidth cap.

Modes:
  at-once     post-copy from the start (QEMU: migrate-start-postcopy right after migrate;
              Ferry: --postcopy-after 0)
  after-1     one pre-copy pass first (QEMU: migrate-start-postcopy once the first dirty sync
              has happened; Ferry: --postcopy, i.e. --postcopy-after 1)

Per run it reports:
  observed ms  guest-observed downtime: the largest heartbeat gap across the move
  VMM ms       the VMM's own downtime figure
  released ms  migration start to the source holding nothing of the VM any more (QEMU:
               query-migrate says completed; Ferry: `ferry migrate` returns)
  post-copy ms switch-over to release
  hb/s         the guest's heartbeat rate while post-copy runs (destination), beside the
               rate the same guest had before the migration: how much the guest slows
               while its pages are still arriving

Right before each migration starts the script writes and frees 2 GiB (`--no-warm` to skip):
on this nested host memory that has sat free for more than a few seconds costs ~10 us per
4 KiB page to touch again, and post-copy's destination allocates a page per page received, so
without it the figure depends on which VMM happened to run after something freed memory
(measured: the same Ferry post-copy of 1 GiB took 2.5-2.9 s cold and 0.7 s warm).

usage: scripts/bench_postcopy.py [--ferry PATH] [--only WORKLOAD] [--modes at-once,after-1]
       [--no-warm]
"""
import argparse, os, re, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_snapshot import Qmp  # noqa: E402
from bench_live import (Console, beats, common_args, ferry_pair, free_port,  # noqa: E402
                        guest_image, observed_gap, qemu_pair, warm)

WORKLOADS = [
    ("1G-50M", "2G", "dirty size=1G rate=50M hb=2000", "D0 1"),
    ("1G-150M", "2G", "dirty size=1G rate=150M hb=2000", "D0 1"),
    ("1G-max", "2G", "dirty size=1G rate=0 hb=2000", "D0 1"),
]


def rate(console, t0, t1):
    """Heartbeats per second printed in [t0, t1]."""
    n = sum(1 for _, at in beats(console) if t0 <= at <= t1)
    return n / max(t1 - t0, 1e-3)


def run_qemu(a, image, mem, work, ready, mode):
    d = tempfile.mkdtemp(prefix="ferry-bench-pq-")
    port = free_port()
    src, dst = qemu_pair(d, image, mem, work)
    try:
        sc, dc = Console(src), Console(dst)
        sc.wait(ready)
        time.sleep(1)
        qs, qd = Qmp(f"{d}/s.sock"), Qmp(f"{d}/d.sock")
        for q in (qs, qd):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "postcopy-ram", "state": True}])
            q.cmd("migrate-set-parameters", **{"downtime-limit": 30, "max-bandwidth": 1 << 40})
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        before = rate(sc, time.monotonic() - 1, time.monotonic())
        warm(a)
        t0 = time.monotonic()
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        started = False
        t_pc = None
        while True:
            st = qs.cmd("query-migrate")
            s = st.get("status")
            if not started and (mode == "at-once" or
                                st.get("ram", {}).get("dirty-sync-count", 0) >= 2):
                qs.cmd("migrate-start-postcopy")
                started = True
            if s == "postcopy-active" and t_pc is None:
                t_pc = time.monotonic()
            if s in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.005)
        t_done = time.monotonic()
        if s != "completed":
            raise RuntimeError(f"QEMU migration {s}: {st}")
        dc.wait("H0 ")
        time.sleep(0.5)
        first_dst = beats(dc)[0][1]
        return {
            "observed_ms": observed_gap(sc, dc),
            "downtime_ms": st.get("downtime", 0),
            "released_ms": (t_done - t0) * 1e3,
            # None: pre-copy finished before the switch to post-copy was taken.
            "postcopy_ms": (t_done - t_pc) * 1e3 if t_pc else None,
            "hb_before": before,
            "hb_during": rate(dc, first_dst, t_done) if t_pc else None,
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def run_ferry(a, mem, work, ready, mode):
    d = tempfile.mkdtemp(prefix="ferry-bench-pf-")
    port = free_port()
    src, dst = ferry_pair(a.ferry, d, port, mem, work)
    try:
        sc, dc = Console(src), Console(dst)
        sc.wait(ready)
        time.sleep(1)
        cmd = [a.ferry, "migrate", "--insecure", "--to", f"127.0.0.1:{port}", "--api-socket", f"{d}/a.sock",
               "--downtime-limit", "30", "--quiet",
               "--postcopy-after", "0" if mode == "at-once" else "1"]
        before = rate(sc, time.monotonic() - 1, time.monotonic())
        warm(a)
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True)
        t_done = time.monotonic()
        if out.returncode != 0:
            raise RuntimeError(f"ferry migrate: {out.stderr}")
        m = re.search(r"downtime ([\d.]+) ms", out.stdout)
        p = re.search(r"source released ([\d.]+) ms after the pause", out.stdout)
        src.wait(timeout=30)
        dc.wait("H0 ")
        time.sleep(0.5)
        first_dst = beats(dc)[0][1]
        return {
            "observed_ms": observed_gap(sc, dc),
            "downtime_ms": float(m.group(1)),
            "released_ms": (t_done - t0) * 1e3,
            "postcopy_ms": float(p.group(1)) if p else None,
            "hb_before": before,
            "hb_during": rate(dc, first_dst, t_done) if p else None,
            "detail": next((l for l in out.stdout.splitlines() if l.startswith("post-copy:")),
                           ""),
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--modes", default="at-once,after-1")
    a = ap.parse_args()
    d, image, qv = guest_image(a)
    print(f"# {qv}; post-copy, one stream, loopback")
    print("| workload | mode | VMM | guest-observed downtime ms | VMM downtime ms | "
          "total ms (start → source released) | switch → source released ms | heartbeats/s before → during post-copy |")
    print("|---|---|---|---|---|---|---|---|")
    details = []
    for name, mem, work, ready in WORKLOADS:
        if a.only and a.only != name:
            continue
        for mode in a.modes.split(","):
            res = {}
            for vmm in ("QEMU", "Ferry"):
                try:
                    r = (run_qemu(a, image, mem, work, ready, mode) if vmm == "QEMU"
                         else run_ferry(a, mem, work, ready, mode))
                except Exception as e:  # one failed run should not hide the others
                    print(f"| {name} | {mode} | {vmm} | failed: {e} | | | | |", flush=True)
                    continue
                res[vmm] = r
                if r.get("detail"):
                    details.append(f"{name} {mode}: {r['detail']}")
                pc = ("— (pre-copy finished first)" if r["postcopy_ms"] is None
                      else f"{r['postcopy_ms']:.0f}")
                during = "—" if r["hb_during"] is None else f"{r['hb_during']:.0f}"
                print(f"| {name} | {mode} | {vmm} | {r['observed_ms']:.1f} | "
                      f"{r['downtime_ms']:.1f} | {r['released_ms']:.0f} | "
                      f"{pc} | {r['hb_before']:.0f} → {during} |", flush=True)
            if len(res) == 2:
                q, f = res["QEMU"], res["Ferry"]

                def x(k):
                    if q[k] is None or f[k] is None:
                        return "—"
                    return f"{f[k] / max(q[k], 1e-3):.2f}×"
                print(f"| {name} | {mode} | Ferry/QEMU | {x('observed_ms')} | "
                      f"{x('downtime_ms')} | {x('released_ms')} | "
                      f"{x('postcopy_ms')} | {x('hb_during')} |", flush=True)
    for l in details:
        print(f"# {l}")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
