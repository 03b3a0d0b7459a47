#!/usr/bin/env python3
"""Live migration side by side, one run: the same test guest image and workload migrated
QEMU -> QEMU (Debian's qemu-system-x86, `-incoming` on loopback) and Ferry -> Ferry, with the
same downtime limit and stream count and no bandwidth cap; plus iperf3 on loopback with the
same stream count.

For each workload and both VMMs it reports the guest-observed downtime (largest gap between
heartbeat lines, timestamped as they arrive from the source and then the destination
console — measured the same way for both), the largest gap between heartbeats on the source
while pre-copy runs (from the migrate command to the source's last beat, by the guest's own
TSC: the stall a user feels before any switch-over), the VMM's own downtime figure, total time and bytes sent.

Workloads (the test guest runs them on vCPU 0, the only one QEMU starts):
  idle-4G     4 GiB VM, heartbeat only
  1G-0        1 GiB written once, then only read (`verify`): 0 MB/s dirtying
  1G-50M      1 GiB rewritten at 50 MB/s
  1G-150M     1 GiB rewritten at 150 MB/s
  1G-max      1 GiB rewritten as fast as the vCPU can (faster than the link); auto-converge on
              for both
  512G-max    the same guest and workload in a 512 GiB VM (QEMU: a memory backend with
              reserve=off, as MAP_NORESERVE is what lets both run it on this host)

Right before each migration starts the script writes and frees 2 GiB (`--no-warm` to skip):
on this nested host memory that has sat free for more than a few seconds costs ~10 us per
4 KiB page to touch again (the kernel reports free memory to the host it runs on), and a
destination allocates as it receives, so without it a run's figures depend on whether
something freed memory just before.

usage: scripts/bench_live.py [--ferry PATH] [--streams N] [--downtime-limit MS] [--only NAME]
       [--no-warm] [--copy-priority normal|low]
"""
import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_snapshot import Qmp  # noqa: E402

WORKLOADS = [
    ("idle-4G", "4G", "heartbeat period=2000", "B ferry-guest", False),
    ("1G-0", "2G", "verify size=1G hb=2000", "V0 1 ", False),
    ("1G-50M", "2G", "dirty size=1G rate=50M hb=2000", "D0 1", False),
    ("1G-150M", "2G", "dirty size=1G rate=150M hb=2000", "D0 1", False),
    ("1G-max", "2G", "dirty size=1G rate=0 hb=2000", "D0 1", True),
    ("512G-max", "512G", "dirty size=1G rate=0 hb=2000", "D0 1", True),
]


def source_stall(src, since):
    """Largest gap between consecutive heartbeats on the source from `since` (the migration's
    start) to its last beat: what the guest felt during pre-copy, before the switch-over.
    Measured by the guest's own clock (the TSC in each line, scaled by host time over the
    whole window), so a line that reached the host late does not count as a stall."""
    b = []
    for at, l in src.lines:
        m = re.match(r"H0 \d+ ([0-9a-f]+)", l)
        if m and at >= since:
            b.append((at, int(m.group(1), 16)))
    if len(b) < 3:
        return 0
    s_per_tick = (b[-1][0] - b[0][0]) / max(b[-1][1] - b[0][1], 1)
    return max(y[1] - x[1] for x, y in zip(b, b[1:])) * s_per_tick * 1e3


def warm(a):
    """Unless --no-warm: touches 2 GiB in a child process and frees it, right before a
    migration starts (see the module docstring)."""
    if not a.no_warm:
        subprocess.run([sys.executable, "-c", "b = bytearray(b'\\x01') * (2 << 30)"],
                       check=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Console:
    """Reads a process's stdout on a thread, timestamping each line."""

    def __init__(self, proc):
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            with self.cv:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cv.notify_all()

    def wait(self, prefix, timeout=600, after=0):
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                for i, (_, l) in enumerate(self.lines[after:], after):
                    if l.startswith(prefix):
                        return i
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timeout waiting for {prefix!r}")
                self.cv.wait(left)


def beats(console):
    out = []
    for at, l in console.lines:
        m = re.match(r"H0 (\d+) ", l)
        if m:
            out.append((int(m.group(1)), at))
    return out


def observed_gap(src, dst):
    """Gap between the last whole heartbeat line on the source and the first on the
    destination. Each side's numbering must be continuous; across the move one number may be
    missing when its line was torn between the two consoles (QEMU moves the serial port's
    bytes, not lines, so a line can start on one host and end on the other)."""
    s, d = beats(src), beats(dst)
    for side in (s, d):
        seqs = [n for n, _ in side]
        if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            raise RuntimeError("heartbeat sequence broken on one side")
    if d[0][0] - s[-1][0] not in (1, 2):
        raise RuntimeError(f"heartbeat {s[-1][0]} then {d[0][0]} across the move")
    return (d[0][1] - s[-1][1]) * 1e3


def qemu_pair(d, image, mem, work, tls=None):
    """A QEMU running the test guest (QMP at d/s.sock) and one waiting for it (d/d.sock);
    with `tls` (a PKI from make_pki), each has x509 credentials (id tls0) for TLS migration."""
    big = ["-object", f"memory-backend-ram,id=ram,size={mem},reserve=off",
           "-machine", "memory-backend=ram"] if mem.endswith("G") and int(mem[:-1]) > 16 else []
    base = ["qemu-system-x86_64", "-enable-kvm", "-m", mem] + big + [
            "-nodefaults", "-display", "none",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
            "-kernel", image, "-append", work]
    creds = lambda side, end: ["-object", f"tls-creds-x509,id=tls0,dir={tls}/qemu-{side},"
                                          f"endpoint={end},verify-peer=on"] if tls else []
    src = subprocess.Popen(base + creds("src", "client") +
                           ["-qmp", f"unix:{d}/s.sock,server=on,wait=off"],
                           stdout=subprocess.PIPE, text=True)
    dst = subprocess.Popen(base + creds("dst", "server") +
                           ["-qmp", f"unix:{d}/d.sock,server=on,wait=off",
                            "-incoming", "defer"], stdout=subprocess.PIPE, text=True)
    return src, dst


def make_pki(ferry, d):
    """A CA and certificates for src.bench and dst.bench made by `ferry certs`, also laid
    out the way QEMU's tls-creds-x509 wants them (d/qemu-src, d/qemu-dst)."""
    subprocess.run([ferry, "certs", "init", "--dir", d], check=True, capture_output=True)
    for n in ("src.bench", "dst.bench"):
        subprocess.run([ferry, "certs", "issue", n, "--dir", d], check=True,
                       capture_output=True)
    for side, me, role in (("src", "src.bench", "client"), ("dst", "dst.bench", "server")):
        q = f"{d}/qemu-{side}"
        os.makedirs(q)
        shutil.copy(f"{d}/ca.pem", f"{q}/ca-cert.pem")
        shutil.copy(f"{d}/{me}.pem", f"{q}/{role}-cert.pem")
        shutil.copy(f"{d}/{me}.key", f"{q}/{role}-key.pem")
    return d


def ferry_tls(tls, me, peer):
    """`ferry receive`/`ferry migrate` security arguments: TLS as host `me` allowing
    `peer`, or --insecure."""
    if not tls:
        return ["--insecure"]
    return ["--tls-cert", f"{tls}/{me}.pem", "--tls-key", f"{tls}/{me}.key",
            "--tls-ca", f"{tls}/ca.pem", "--tls-peer", peer]


def ferry_pair(ferry, d, port, mem, work, tls=None):
    """`ferry run` with the test guest (API at d/a.sock) and a `ferry receive` on `port`."""
    src = subprocess.Popen([ferry, "run", "--memory", mem, "--api-socket", f"{d}/a.sock",
                            "--guest", work], stdout=subprocess.PIPE, text=True)
    dst = subprocess.Popen([ferry, "receive", "--listen", f"127.0.0.1:{port}",
                            "--api-socket", f"{d}/b.sock"] +
                           ferry_tls(tls, "dst.bench", "src.bench"), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    return src, dst


def run_qemu(a, image, name, mem, work, ready, converge, tls=None):
    d = tempfile.mkdtemp(prefix="ferry-bench-q-")
    port = free_port()
    src, dst = qemu_pair(d, image, mem, work, tls)
    try:
        sc, dc = Console(src), Console(dst)
        sc.wait(ready)
        time.sleep(1)
        warm(a)
        qs, qd = Qmp(f"{d}/s.sock"), Qmp(f"{d}/d.sock")
        caps = []
        if a.streams > 1:
            caps.append({"capability": "multifd", "state": True})
        if converge:
            caps.append({"capability": "auto-converge", "state": True})
        params = {"downtime-limit": a.downtime_limit, "max-bandwidth": 1 << 40}
        if a.streams > 1:
            params["multifd-channels"] = a.streams
        if tls:
            params["tls-creds"] = "tls0"
        for q in (qs, qd):
            if caps:
                q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", **params)
        if tls:
            qs.cmd("migrate-set-parameters", **{"tls-hostname": "dst.bench"})
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        t0 = time.monotonic()
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = qs.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if st["status"] != "completed":
            raise RuntimeError(f"QEMU migration {st['status']}: {st}")
        n = len(dc.lines)
        dc.wait("H0 ", after=n) if not any(l.startswith("H0 ") for _, l in dc.lines) else None
        time.sleep(0.5)
        return {
            "observed_ms": observed_gap(sc, dc),
            "stall_ms": source_stall(sc, t0),
            "downtime_ms": st.get("downtime", 0),
            "total_ms": st.get("total-time", 0),
            "bytes": st["ram"]["transferred"],
            "mbps": st["ram"].get("mbps", 0),
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def run_ferry(a, name, mem, work, ready, converge, tls=None):
    d = tempfile.mkdtemp(prefix="ferry-bench-f-")
    port = free_port()
    src, dst = ferry_pair(a.ferry, d, port, mem, work, tls)
    try:
        sc, dc = Console(src), Console(dst)
        sc.wait(ready)
        time.sleep(1)
        warm(a)
        cmd = [a.ferry, "migrate", "--to", f"127.0.0.1:{port}", "--api-socket", f"{d}/a.sock",
               "--downtime-limit", str(a.downtime_limit), "--connections", str(a.streams),
               "--max-passes", "0", "--copy-priority", a.copy_priority, "--quiet"]
        cmd += ferry_tls(tls, "src.bench", "dst.bench")
        if converge:
            cmd.append("--auto-converge")
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ferry migrate: {out.stderr}")
        m = re.search(r"total ([\d.]+) ms, downtime ([\d.]+) ms .*?, ([\d.]+) MiB sent.*?"
                      r"link (\d+) MiB/s", out.stdout)
        src.wait(timeout=30)
        dc.wait("H0 ")
        time.sleep(0.5)
        return {
            "observed_ms": observed_gap(sc, dc),
            "stall_ms": source_stall(sc, t0),
            "downtime_ms": float(m.group(2)),
            "total_ms": float(m.group(1)),
            "bytes": int(float(m.group(3)) * (1 << 20)),
            "mbps": int(m.group(4)) * 8 * 1.048576,
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def iperf3(streams, spin=False):
    """iperf3's loopback bandwidth (bytes/s) over `streams` streams; with `spin`, while a
    process spins on one core, the load a migrating guest's vCPU puts on the host."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if spin else None
    port = free_port()
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams),
                              "-t", "3", "-J"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 8
    finally:
        srv.wait(timeout=10)
        if spinner:
            spinner.kill()
            spinner.wait()


def common_args(ap):
    """The options every side-by-side script takes."""
    ap.add_argument("--ferry", default="target/release/ferry")
    ap.add_argument("--only", help="run only this workload")
    ap.add_argument("--no-warm", action="store_true", help="do not warm memory before runs")


def guest_image(a):
    """Writes the test guest image to a new temporary directory; returns the directory, the
    image's path and QEMU's version line."""
    d = tempfile.mkdtemp(prefix="ferry-bench-img-")
    image = f"{d}/guest.elf"
    subprocess.run([a.ferry, "guest-image", "-o", image], check=True, capture_output=True)
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.split("\n")[0]
    return d, image, qv


def main():
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--downtime-limit", type=int, default=30)
    ap.add_argument("--copy-priority", choices=["normal", "low"], default="normal",
                    help="Ferry's --copy-priority (QEMU has no such setting)")
    a = ap.parse_args()
    d, image, qv = guest_image(a)
    link = iperf3(a.streams)
    loaded = iperf3(a.streams, spin=True)
    print(f"# {qv}; streams {a.streams}; downtime limit {a.downtime_limit} ms; "
          f"Ferry --copy-priority {a.copy_priority}; "
          f"iperf3 loopback {link / 1e6:.0f} MB/s, {loaded / 1e6:.0f} MB/s with one core spinning")
    print("| workload | VMM | guest-observed downtime ms | source stall in pre-copy ms | "
          "VMM downtime ms | total ms | MB sent | link MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mem, work, ready, converge in WORKLOADS:
        if a.only and a.only != name:
            continue
        res = {}
        for vmm in ("QEMU", "Ferry"):
            try:
                if vmm == "QEMU":
                    r = run_qemu(a, image, name, mem, work, ready, converge)
                else:
                    r = run_ferry(a, name, mem, work, ready, converge)
            except Exception as e:  # one failed run should not hide the others
                print(f"| {name} | {vmm} | failed: {e} | | | | | |")
                continue
            res[vmm] = r
            print(f"| {name} | {vmm} | {r['observed_ms']:.1f} | {r['stall_ms']:.1f} | "
                  f"{r['downtime_ms']:.1f} | "
                  f"{r['total_ms']:.0f} | {r['bytes'] / 1e6:.0f} | {r['mbps'] / 8:.0f} |",
                  flush=True)
        if len(res) == 2:
            q, f = res["QEMU"], res["Ferry"]
            print(f"| {name} | Ferry/QEMU | {f['observed_ms'] / max(q['observed_ms'], 1e-3):.2f}× "
                  f"| {f['stall_ms'] / max(q['stall_ms'], 1e-3):.2f}× "
                  f"| {f['downtime_ms'] / max(q['downtime_ms'], 1e-3):.2f}× | "
                  f"{f['total_ms'] / max(q['total_ms'], 1e-3):.2f}× | | "
                  f"{f['mbps'] / 8 * 1e6 / link * 100:.0f} % of iperf3, "
                  f"{f['mbps'] / 8 * 1e6 / loaded * 100:.0f} % of iperf3 beside a spinner |",
                  flush=True)
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
