#!/usr/bin/env python3
"""Shared-nothing live migration (the VM and its disk, no shared storage), Ferry vs QEMU 7.2,
same test guest, same run, both "hosts" on this machine.

The VM: 1 vCPU beating every 2 ms, 1 GiB RAM, a 4 GiB raw disk with 1 GiB of data the host
wrote (at 1 GiB) and the guest writing the first 64 MiB of it at 0 (no disk I/O), 20 MB/s
or flat out (`disk span=64M rate=...`, reading each pass back). Each destination gets a new
empty 4 GiB image of its own.

Ferry: `ferry receive --storage-dir`, `ferry migrate --copy-storage --downtime-limit 30`.
QEMU (the libvirt `--copy-storage-all` recipe): destination `-incoming defer`,
`nbd-server-start` + writable `block-export-add` of its disk; source `blockdev-add` of an NBD
node, `blockdev-mirror` (sync full; copy-mode write-blocking, or background), wait for the job
to be ready, then `migrate` with `pause-before-switchover` (downtime limit 30 ms),
`block-job-cancel` at `pre-switchover` (a ready mirror cancelled is complete), and
`migrate-continue`.

Figures: total time (from the first command to the VM running on the destination), the
guest-observed downtime (the heartbeat gap across the move, by the guest's clock), bytes on
loopback during the migration (both VMMs: memory and disk), and whether it converged (QEMU:
the mirror became ready and the migration completed within --limit seconds). Checked after
each run: the host's 1 GiB is the same in both images, and a disk-writing guest reads its
whole span back correct on the destination (its first `K0 <pass> ok` there).

usage: scripts/bench_storage_migration.py [--runs N] [--ferry PATH] [--limit SECONDS]
"""
import os, re, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_live import Console, observed_gap, free_port  # noqa: E402
from bench_snapshot import Qmp  # noqa: E402
from benchlib import guest_image, microvm, parse, parser, qemu_version  # noqa: E402

DISK, DATA_AT, DATA = 4 << 30, 1 << 30, 1 << 30
WORK = {
    "0 MB/s": "heartbeat period=2000",
    "20 MB/s": "disk span=64M rate=20M hb=2000",
    "flat out": "disk span=64M rate=0 hb=2000",
}


def lo_bytes():
    with open("/sys/class/net/lo/statistics/tx_bytes") as f:
        return int(f.read())


def make_source(path, chunk=os.urandom(1 << 20)):
    with open(path, "wb") as f:
        f.truncate(DISK)
        f.seek(DATA_AT)
        for _ in range(DATA >> 20):
            f.write(chunk)


def host_data_same(a, b):
    with open(a, "rb") as x, open(b, "rb") as y:
        x.seek(DATA_AT)
        y.seek(DATA_AT)
        return all(x.read(1 << 20) == y.read(1 << 20) for _ in range(DATA >> 20))


def guest_checked(dc, work, after):
    """A disk-writing guest's first whole pass on the destination read back correct."""
    if not work.startswith("disk"):
        return True
    n = dc.wait("K0 ", timeout=120, after=after)
    return dc.lines[n][1].endswith(" ok")


def after_move(sc, dc, work, t0, b0):
    """Once the destination runs: total ms since t0, loopback bytes since b0, whether the
    guest checked its disk there, and the guest-observed downtime."""
    total = (time.monotonic() - t0) * 1e3
    wire = lo_bytes() - b0
    first = dc.wait("H0 ", timeout=60)
    ok = guest_checked(dc, work, first)
    time.sleep(0.5)
    return total, wire, ok, observed_gap(sc, dc)


def qemu(image, work, disk, qmp, incoming):
    dev = ["-blockdev", f"driver=file,filename={disk},node-name=f0,cache.direct=off",
           "-blockdev", "driver=raw,file=f0,node-name=d0",
           "-device", "virtio-blk-device,drive=d0", "-qmp", f"unix:{qmp},server=on,wait=off"]
    c = microvm(image, work, extra=dev, mem="1024")
    return c + (["-incoming", "defer"] if incoming else [])


def wait_until(pred, limit, what):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        r = pred()
        if r:
            return r
        time.sleep(0.02)
    raise TimeoutError(f"{what} not within {limit} s")


def run_qemu(a, d, image, work, mode):
    src_disk, dst_disk = f"{d}/src.raw", f"{d}/dst.raw"
    make_source(src_disk)
    with open(dst_disk, "wb") as f:
        f.truncate(DISK)
    src = subprocess.Popen(qemu(image, work, src_disk, f"{d}/s.sock", False),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    dst = subprocess.Popen(qemu(image, work, dst_disk, f"{d}/d.sock", True),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        sc, dc = Console(src), Console(dst)
        sc.wait("H0 ", timeout=60)
        time.sleep(1.5)
        qs, qd = Qmp(f"{d}/s.sock"), Qmp(f"{d}/d.sock")
        nbd, mig = free_port(), free_port()
        t0, b0 = time.monotonic(), lo_bytes()
        qd.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd)}})
        qd.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"}, writable=True)
        qs.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
               server={"type": "inet", "host": "127.0.0.1", "port": str(nbd)}, export="d0")
        qs.cmd("blockdev-mirror", **{"job-id": "m0", "copy-mode": mode}, device="d0", target="tgt",
               sync="full")
        try:
            wait_until(lambda: any(j.get("ready") for j in qs.cmd("query-block-jobs")), a.limit,
                       "the mirror ready")
            for q in (qs, qd):
                q.cmd("migrate-set-parameters", **{"downtime-limit": 30, "max-bandwidth": 1 << 40})
            qs.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": "pause-before-switchover", "state": True}])
            qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{mig}")
            qs.cmd("migrate", uri=f"tcp:127.0.0.1:{mig}")
            left = a.limit - (time.monotonic() - t0)
            wait_until(lambda: qs.cmd("query-migrate").get("status") in ("pre-switchover", "failed"),
                       max(left, 1), "pre-switchover")
            qs.cmd("block-job-cancel", device="m0")
            wait_until(lambda: not qs.cmd("query-block-jobs"), 60, "the mirror's end")
            qs.cmd("migrate-continue", state="pre-switchover")
            st = wait_until(lambda: (s := qs.cmd("query-migrate")).get("status") in
                            ("completed", "failed", "cancelled") and s, 120, "the migration")
            if st["status"] != "completed":
                raise RuntimeError(f"QEMU migration {st['status']}")
        except TimeoutError as e:
            return {"converged": False, "why": str(e)}
        total, wire, ok, gap = after_move(sc, dc, work, t0, b0)
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
    same = ok and host_data_same(src_disk, dst_disk)
    return {"converged": True, "total": total, "gap": gap, "wire": wire, "same": same}


def run_ferry(a, d, image, work):
    src_disk, dst_dir = f"{d}/src.raw", f"{d}/dst"
    make_source(src_disk)
    os.makedirs(dst_dir, exist_ok=True)
    port = free_port()
    src = subprocess.Popen([a.ferry, "run", "--memory", "1G", "--guest", work, "--disk",
                            f"path={src_disk}", "--api-socket", f"{d}/a.sock"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    dst = subprocess.Popen([a.ferry, "receive", "--insecure", "--listen", f"127.0.0.1:{port}",
                            "--storage-dir", dst_dir, "--api-socket", f"{d}/b.sock"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        sc, dc = Console(src), Console(dst)
        sc.wait("H0 ", timeout=60)
        time.sleep(1.5)
        t0, b0 = time.monotonic(), lo_bytes()
        out = subprocess.run([a.ferry, "migrate", "--insecure", "--to", f"127.0.0.1:{port}",
                              "--api-socket", f"{d}/a.sock", "--copy-storage", "--downtime-limit", "30",
                              "--quiet", "--timeout", str(a.limit)], capture_output=True, text=True)
        if out.returncode != 0:
            return {"converged": False, "why": out.stderr.strip()}
        total, wire, ok, gap = after_move(sc, dc, work, t0, b0)
        storage = re.search(r"storage: .*", out.stdout)
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
    same = ok and host_data_same(src_disk, f"{dst_dir}/src.raw")
    return {"converged": True, "total": total, "gap": gap, "wire": wire, "same": same,
            "storage": storage.group(0) if storage else ""}


def main():
    ap = parser(__doc__, runs=3)
    ap.add_argument("--limit", type=float, default=120, help="seconds before a run counts as not converging")
    a = parse(ap)
    qv = qemu_version()
    d = tempfile.mkdtemp(prefix="ferry-bench-sn-", dir="/var/tmp")
    try:
        image = guest_image(a.ferry, d)
        vmms = {"Ferry": lambda w: run_ferry(a, d, image, w),
                "QEMU write-blocking": lambda w: run_qemu(a, d, image, w, "write-blocking"),
                "QEMU background": lambda w: run_qemu(a, d, image, w, "background")}
        res = {}
        for _ in range(a.runs):
            for row, work in WORK.items():
                for vmm, f in vmms.items():
                    for n in os.listdir(d):
                        p = os.path.join(d, n)
                        if n.endswith(".raw") or n == "dst":
                            subprocess.run(["rm", "-rf", p])
                    r = f(work)
                    if r.get("converged") and not r["same"]:
                        raise RuntimeError(f"{vmm} {row}: the destination's disk differs")
                    res.setdefault((row, vmm), []).append(r)
                    print(f"# {row} {vmm}: {r}", flush=True)
        print(f"\n{qv}; 1 vCPU, 1 GiB RAM, 4 GiB raw disk with 1 GiB written; {a.runs} runs, "
              "median (min–max); wire = bytes on loopback\n")
        print("| guest disk writes | VMM | total s | guest-observed downtime ms | wire GiB | converged |")
        print("|---|---|---:|---:|---:|---|")
        fmt = lambda v, k, s=1: (f"{statistics.median(x[k] for x in v) / s:.2f} "
                                 f"({min(x[k] for x in v) / s:.2f}–{max(x[k] for x in v) / s:.2f})")
        for (row, vmm), v in res.items():
            ok = [x for x in v if x["converged"]]
            conv = f"{len(ok)}/{len(v)}"
            if ok:
                print(f"| {row} | {vmm} | {fmt(ok, 'total', 1e3)} | {fmt(ok, 'gap')} | "
                      f"{fmt(ok, 'wire', 1 << 30)} | {conv} |")
            else:
                print(f"| {row} | {vmm} | — | — | — | {conv} |")
        for row in WORK:
            f = [x for x in res.get((row, "Ferry"), []) if x["converged"]]
            q = [x for x in res.get((row, "QEMU write-blocking"), []) if x["converged"]]
            if f and q:
                ft, qt = statistics.median(x["total"] for x in f), statistics.median(x["total"] for x in q)
                fg, qg = statistics.median(x["gap"] for x in f), statistics.median(x["gap"] for x in q)
                print(f"| {row} | Ferry / QEMU write-blocking | {ft / qt:.2f}× | {fg / qg:.2f}× | | |")
    finally:
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
