#!/usr/bin/env python3
"""Quick migration side by side: save to a file and restore from it, Ferry vs QEMU, same test
guest image, same workload, one run. The guest first touches TOUCH of memory (the `dirty`
workload, one full pass), then is paused and saved; the restore is timed to "running" and to
the guest's first heartbeat after it.

usage: scripts/bench_snapshot.py [--touch 1G] [--memory 2G] [--ferry PATH] [--dir DIR]
"""
import argparse, json, os, shutil, socket, subprocess, tempfile, time


def wait_line(proc, prefix, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process ended while waiting for {prefix!r}")
        if line.startswith(prefix):
            return time.monotonic(), line
    raise RuntimeError(f"timeout waiting for {prefix!r}")


class Qmp:
    def __init__(self, path):
        for _ in range(500):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.01)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                if "error" in r:
                    raise RuntimeError(f"QMP {name}: {r['error']}")
                return r["return"]


def du(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--ferry", default=os.path.join(root, "target", "release", "ferry"))
    ap.add_argument("--touch", default="1G")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--dir", default=None, help="where to write the snapshots (default: a temp dir)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ferry-bench-", dir=a.dir)
    try:
        run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed_restore_ferry(a, snap, sock, lazy):
    t0 = time.monotonic()
    cmd = [a.ferry, "restore", "--from", snap, "--api-socket", sock] + (["--lazy-check"] if lazy else [])
    dst = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_beat, _ = wait_line(dst, "H0 ")
    ready = float(dst.stderr.readline().split("ready in ")[1].split(" ms")[0])
    subprocess.run([a.ferry, "vm", "shutdown", "--api-socket", sock], check=True, capture_output=True)
    dst.wait()
    return ready, (t_beat - t0) * 1e3


def run(a, work):
    image = os.path.join(work, "guest.elf")
    subprocess.run([a.ferry, "guest-image", "-o", image], check=True)
    wl = f"dirty size={a.touch} passes=0 hb=1000"
    res = {}

    # Ferry
    sock, snap = os.path.join(work, "f.sock"), os.path.join(work, "ferry-snap")
    src = subprocess.Popen([a.ferry, "run", "--memory", a.memory, "--api-socket", sock, "--guest", wl],
                           stdout=subprocess.PIPE, text=True)
    wait_line(src, "D0 1")
    t0 = time.monotonic()
    subprocess.run([a.ferry, "snapshot", "--api-socket", sock, "--to", snap, "--then", "stop"],
                   capture_output=True, text=True, check=True)
    save = (time.monotonic() - t0) * 1e3
    src.wait()
    ready, beat = timed_restore_ferry(a, snap, sock, lazy=False)
    lready, lbeat = timed_restore_ferry(a, snap, sock, lazy=True)
    res["Ferry"] = dict(save=save, size=du(snap), ready=ready, beat=beat)
    res["Ferry (--lazy-check)"] = dict(save=None, size=None, ready=lready, beat=lbeat)

    # QEMU: migrate to a file through exec:, restore with -incoming.
    qsock, qfile = os.path.join(work, "q.sock"), os.path.join(work, "qemu.state")
    base = ["qemu-system-x86_64", "-enable-kvm", "-m", a.memory.replace("G", "G"), "-nodefaults",
            "-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-serial", "stdio", "-kernel", image, "-append", wl, "-qmp", f"unix:{qsock},server=on,wait=off"]
    src = subprocess.Popen(base, stdout=subprocess.PIPE, text=True)
    wait_line(src, "D0 1")
    q = Qmp(qsock)
    t0 = time.monotonic()
    q.cmd("stop")
    q.cmd("migrate", uri=f"exec:cat > {qfile}")
    while q.cmd("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.002)
    subprocess.run(["sync", qfile])
    save = (time.monotonic() - t0) * 1e3
    q.cmd("quit")
    src.wait()
    if os.path.exists(qsock):
        os.unlink(qsock)
    t0 = time.monotonic()
    dst = subprocess.Popen(base + ["-incoming", f"exec:cat {qfile}"], stdout=subprocess.PIPE, text=True)
    q = Qmp(qsock)
    while q.cmd("query-status")["status"] not in ("paused", "postmigrate", "running"):
        time.sleep(0.001)
    if q.cmd("query-status")["status"] != "running":
        q.cmd("cont")
    ready = (time.monotonic() - t0) * 1e3
    t_beat, _ = wait_line(dst, "H0 ")
    beat = (t_beat - t0) * 1e3
    q.cmd("quit")
    dst.wait()
    res["QEMU"] = dict(save=save, size=du(qfile), ready=ready, beat=beat)

    # The disk itself: the same number of bytes written and fsynced by dd.
    blob = os.path.join(work, "blob")
    with open(blob, "wb") as fh:
        fh.write(os.urandom(1 << 20) * (res["Ferry"]["size"] >> 20))
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={blob}", f"of={blob}.copy", "bs=4M", "conv=fsync"], capture_output=True, check=True)
    dd_ms = (time.monotonic() - t0) * 1e3

    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"Quick migration through a file: test guest `{wl}` after one full pass ({a.touch} touched), "
          f"{a.memory} VM; {qv}.\n")
    print("| VMM | save ms | file MiB | restore: process start to running, ms | to first heartbeat, ms |")
    print("|---|---:|---:|---:|---:|")
    f = lambda v, fmt: "—" if v is None else fmt.format(v)
    for k, v in res.items():
        print(f"| {k} | {f(v['save'], '{:.0f}')} | {f(v['size'] and v['size'] / 2**20, '{:.0f}')} | "
              f"{v['ready']:.1f} | {v['beat']:.1f} |")
    print(f"| disk: dd of the same {res['Ferry']['size'] / 2**20:.0f} MiB, conv=fsync | {dd_ms:.0f} | | | |")
    fr, qr = res["Ferry"], res["QEMU"]
    print(f"\nFerry/QEMU: save {fr['save'] / qr['save']:.2f}, to first heartbeat {fr['beat'] / qr['beat']:.3f}; "
          f"Ferry save + restore (to first heartbeat): {fr['save'] + fr['beat']:.0f} ms")
    print("Ferry's 'running' is measured inside `ferry restore` (state loaded, memory mapped); QEMU's is "
          "process start to `cont` answered.")


if __name__ == "__main__":
    main()
