#!/usr/bin/env python3
"""Live migration of a VM with a disk and a NIC, idle and busy, Ferry vs QEMU 7.2 microvm,
same test guest, same run, both "hosts" on this machine (shared storage: one image file).

One vCPU (the test guest starts its other vCPUs only under Ferry), beating every 2 ms, with a
disk and a NIC attached, in three states: idle (`heartbeat period=2000`: no I/O), disk busy
(`disk span=16M rate=8M hb=2000`: writing 8 MB/s, reading each pass back) and net busy (`net`
answering the UDP echo requests the host sends every millisecond throughout). Figures:
guest-observed downtime (the heartbeat gap across the move, by the guest's clock), the
largest gap between echo replies the host received (net only), and the VMM's own downtime.
Target (issue #11): Ferry's downtime with I/O running within 1.5x of its idle-device downtime.

Network: a bridge with the host's address and two taps. Ferry hands its one tap over
(`--net tap=` on the source; the destination opens the same tap once the source let go);
QEMU's destination needs its own tap while the source still holds the first, and announces
the guest's MAC after the move (its default self-announce). Root needed.

usage: scripts/bench_io_migration.py [--runs N] [--ferry PATH]
"""
import os, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_live import Console, observed_gap, free_port  # noqa: E402
from bench_snapshot import Qmp  # noqa: E402
from benchlib import guest_image, microvm, parse, parser, qemu_version  # noqa: E402

BR, TAPS, PREFIX = "fbbr0", ("fbta", "fbtb"), "10.212.7"
WORK = {
    "idle": "heartbeat period=2000",
    "disk": "disk span=16M rate=8M hb=2000",
    "net": f"net ip={PREFIX}.2 hb=2000",
}


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def network_up():
    network_down()
    sh("ip", "link", "add", BR, "type", "bridge")
    sh("ip", "addr", "add", f"{PREFIX}.1/24", "dev", BR)
    sh("ip", "link", "set", BR, "up")
    for t in TAPS:
        sh("ip", "tuntap", "add", "dev", t, "mode", "tap")
        sh("ip", "link", "set", t, "master", BR)
        sh("ip", "link", "set", t, "up")


def network_down():
    for n in TAPS + (BR,):
        subprocess.run(["ip", "link", "del", n], capture_output=True)


class Probe:
    """UDP echo requests every millisecond; the host time of each reply."""

    def __init__(self):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind((f"{PREFIX}.1", 0))
        self.s.connect((f"{PREFIX}.2", 7))
        self.s.settimeout(0.05)
        self.replies, self.stop = [], False
        threading.Thread(target=self._send, daemon=True).start()
        threading.Thread(target=self._recv, daemon=True).start()

    def _send(self):
        n, t = 0, time.monotonic()
        while not self.stop:
            try:
                self.s.send(n.to_bytes(8, "little"))
            except OSError:
                pass  # no route yet, or the tap is being handed over
            n += 1
            t += 0.001
            time.sleep(max(0, t - time.monotonic()))

    def _recv(self):
        while not self.stop:
            try:
                self.s.recv(2048)
                self.replies.append(time.monotonic())
            except OSError:
                pass

    def gap_ms(self, since):
        r = [t for t in self.replies if t >= since]
        self.stop = True
        return max((b - a for a, b in zip(r, r[1:])), default=float("nan")) * 1e3


def jitter(src, t0):
    """The largest heartbeat gap on the source in the second before the migration began (by
    the guest's clock): how uneven the beat is without any migration, in this state."""
    b = [(at, int(m.group(1), 16)) for at, l in src.lines
         if t0 - 1 <= at < t0 and (m := re.match(r"H0 \d+ ([0-9a-f]+)", l))]
    if len(b) < 3:
        return float("nan")
    s_per_tick = (b[-1][0] - b[0][0]) / max(b[-1][1] - b[0][1], 1)
    return max(y[1] - x[1] for x, y in zip(b, b[1:])) * s_per_tick * 1e3


def qemu_cmd(image, disk, tap, work, qmp, incoming):
    c = microvm(image, work, disk=disk, tap=tap, extra=["-qmp", f"unix:{qmp},server=on,wait=off"])
    return c + (["-incoming", "defer"] if incoming else [])


def run(vmm, a, image, d, mode):
    for n in ("src", "dst"):
        if os.path.exists(f"{d}/{n}.err"):
            os.remove(f"{d}/{n}.err")
    disk = f"{d}/disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    work = WORK[mode]
    if vmm == "QEMU":
        src = subprocess.Popen(qemu_cmd(image, disk, TAPS[0], work, f"{d}/s.sock", False),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        dst = subprocess.Popen(qemu_cmd(image, disk, TAPS[1], work, f"{d}/d.sock", True),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    else:
        port = free_port()
        src = subprocess.Popen([a.ferry, "run", "--memory", "256M", "--guest", work,
                                "--disk", f"path={disk}", "--net", f"tap={TAPS[0]}",
                                "--api-socket", f"{d}/a.sock"], stdout=subprocess.PIPE,
                               stderr=open(f"{d}/src.err", "w"), text=True)
        dst = subprocess.Popen([a.ferry, "receive", "--insecure", "--listen", f"127.0.0.1:{port}",
                                "--api-socket", f"{d}/b.sock"], stdout=subprocess.PIPE,
                               stderr=open(f"{d}/dst.err", "w"), text=True)
    try:
        sc, dc = Console(src), Console(dst)
        if mode == "net":
            sc.wait("M0 ", timeout=60)
        sc.wait("H0 ", timeout=60)
        probe = Probe() if mode == "net" else None
        time.sleep(1.5)
        if mode == "disk":
            sc.wait("K0 1 ok", timeout=60)  # the disk has been written and read back once before the move
        t0 = time.monotonic()
        if vmm == "QEMU":
            qs, qd = Qmp(f"{d}/s.sock"), Qmp(f"{d}/d.sock")
            port = free_port()
            for q in (qs, qd):
                q.cmd("migrate-set-parameters", **{"downtime-limit": 30, "max-bandwidth": 1 << 40})
            qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            while (st := qs.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
                time.sleep(0.02)
            if st["status"] != "completed":
                raise RuntimeError(f"QEMU migration {st['status']}")
            vmm_ms = st.get("downtime", 0)
        else:
            out = subprocess.run([a.ferry, "migrate", "--insecure", "--to", f"127.0.0.1:{port}",
                                  "--api-socket", f"{d}/a.sock", "--downtime-limit", "30", "--quiet"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"ferry migrate: {out.stderr}")
            vmm_ms = float(re.search(r"downtime ([\d.]+) ms", out.stdout).group(1))
        dc.wait("H0 ", timeout=60)
        time.sleep(1.0)
        if mode == "disk":
            n = dc.wait("K0 ", timeout=60)
            if not dc.lines[n][1].endswith("ok"):
                raise RuntimeError(f"{vmm}: the disk read back wrong after the move: {dc.lines[n][1]}")
        net = probe.gap_ms(t0) if probe else float("nan")
        return observed_gap(sc, dc), net, vmm_ms, jitter(sc, t0)
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def main():
    a = parse(parser(__doc__, runs=3))
    qv = qemu_version()
    d = tempfile.mkdtemp(prefix="ferry-bench-io-")
    network_up()
    try:
        image = guest_image(a.ferry, d)
        res = {}
        for _ in range(a.runs):
            for mode in WORK:
                for vmm in ("QEMU", "Ferry"):
                    try:
                        res.setdefault((vmm, mode), []).append(run(vmm, a, image, d, mode))
                    except Exception as e:  # one failed run should not hide the others
                        errs = " / ".join(open(f"{d}/{n}.err").read().strip()[-300:]
                                          for n in ("src", "dst") if os.path.exists(f"{d}/{n}.err"))
                        print(f"# {vmm} {mode}: failed: {e} {errs}", flush=True)
        print(f"# {qv}; 1 vCPU, 256 MiB, disk + NIC, downtime limit 30 ms, {a.runs} runs, "
              "median (min–max)")
        print("| devices | VMM | guest-observed downtime ms | network gap ms | VMM downtime ms | "
              "largest beat gap in the second before ms |")
        print("|---|---|---|---|---|---|")
        fmt = lambda v: "—" if v != v else f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"
        for mode in WORK:
            for vmm in ("QEMU", "Ferry"):
                r = res.get((vmm, mode), [])
                if not r:
                    continue
                cols = [[x[i] for x in r] for i in range(4)]
                net = fmt(cols[1]) if mode == "net" else "—"
                print(f"| {mode} | {vmm} | {fmt(cols[0])} | {net} | {fmt(cols[2])} | {fmt(cols[3])} |")
        med = {k: statistics.median(x[0] for x in v) for k, v in res.items() if v}
        print()
        for mode in ("disk", "net"):
            for vmm in ("Ferry", "QEMU"):
                if (vmm, "idle") in med and (vmm, mode) in med:
                    print(f"{vmm} {mode} busy / {vmm} idle (guest-observed): "
                          f"{med[(vmm, mode)] / med[(vmm, 'idle')]:.2f}×")
            if ("QEMU", mode) in med and ("Ferry", mode) in med:
                print(f"Ferry / QEMU, {mode} busy (guest-observed): "
                      f"{med[('Ferry', mode)] / med[('QEMU', mode)]:.2f}×")
    finally:
        network_down()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
