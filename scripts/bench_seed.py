#!/usr/bin/env python3
"""Seeded against unseeded live migration over the WAN link (issue #15), beside QEMU, one run.

The topology is scripts/netlab.sh's: the source in site A, the destination in site B, the WAN
link between them shaped to --rate with --delay-ms each way (default 200 Mbit/s, 25 ms: a
50 ms round trip). The guest (memory --memory, default 1G; the issue's benchmark asks 4G)
holds 90 % of its memory in data: vCPU 1 fills 85 % once and then only reads it (`verify`),
vCPU 0 rewrites 5 % (`dirty`, three passes, then stops).

- Ferry seeded (dirty log): `ferry seed create` while vCPU 0 is in its first pass; it then
  rewrites its 5 % twice more, so every page of it changed since the seed; `ferry receive
  --seed` in site B, `ferry migrate --seeded` across the WAN. The source made the seed, so
  its dirty log says what changed.
- Ferry seeded (hashes): the same, but a plain snapshot taken after the seed breaks the
  source's baseline (as a VMM restarted from elsewhere would): the destination's page hashes
  decide.
- Ferry unseeded: the same guest, fresh, migrated across the WAN without a seed.
- QEMU: Debian's QEMU has no seeding of a live migration; its column is a full migration of
  the same amount of data (QEMU runs the test guest on vCPU 0 only, so there the guest writes
  its 90 % once (`verify`) and then only reads it).

Memory only: seeds do not carry disks yet. Reports each case's total time and bytes sent,
and the bytes that changed since the seed.

usage: scripts/bench_seed.py [--ferry PATH] [--memory 1G] [--rate 200mbit] [--delay-ms 25]
(root: network namespaces; builds nothing: run `cargo build` first)
"""
import argparse, os, re, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_live import Console  # noqa: E402
from bench_snapshot import Qmp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = "sdb"
PA_B = "10.61.2.2"


def ns(n, cmd):
    return ["ip", "netns", "exec", f"{P}-{n}"] + cmd


def sizes(mem):
    mib = int(mem[:-1]) * (1024 if mem.endswith("G") else 1)
    return mib * 5 // 100, mib * 85 // 100


def ferry_case(a, seeded, by_hash=False):
    d = tempfile.mkdtemp(prefix="ferry-bench-seed-")
    small, big = sizes(a.memory)
    # 10 MB/s: the three passes outlast vCPU 1's fill, so the seed (taken once the fill is
    # checked) is followed by two whole passes.
    work = f"dirty size={small}M rate=10M passes=3 ; verify size={big}M"
    src = subprocess.Popen(ns("a", [a.ferry, "run", "--cpus", "2", "--memory", a.memory,
                                    "--api-socket", f"{d}/a.sock", "--guest", work]),
                           stdout=subprocess.PIPE, text=True)
    dst = None
    try:
        sc = Console(src)
        sc.wait("V1 0 ok", timeout=600)
        if any(l.startswith("D0 2") for _, l in sc.lines):
            raise RuntimeError("the dirty workload ran ahead of the fill: lower its rate")
        seed = None
        if seeded:
            t = time.monotonic()
            out = subprocess.run([a.ferry, "seed", "create", "--api-socket", f"{d}/a.sock",
                                  "--to", f"{d}/seed"], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            seed = (time.monotonic() - t) * 1e3
            print("  " + out.stdout.strip())
            if by_hash:
                subprocess.run([a.ferry, "snapshot", "--api-socket", f"{d}/a.sock", "--to",
                                f"{d}/other"], check=True, capture_output=True)
        sc.wait("D0 3", timeout=600)
        args = ["receive", "--insecure", "--listen", f"{PA_B}:4444", "--api-socket",
                f"{d}/b.sock"] + (["--seed", f"{d}/seed"] if seeded else [])
        dst = subprocess.Popen(ns("b", [a.ferry] + args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        for _ in range(600):
            if os.path.exists(f"{d}/b.sock"):
                break
            time.sleep(0.05)
        cmd = [a.ferry, "migrate", "--insecure", "--to", f"{PA_B}:4444", "--api-socket",
               f"{d}/a.sock", "--quiet"] + (["--seeded"] if seeded else [])
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = (time.monotonic() - t0) * 1e3
        if out.returncode != 0:
            raise RuntimeError(f"ferry migrate: {out.stderr}")
        m = re.search(r"total ([\d.]+) ms, downtime ([\d.]+) ms .*?, ([\d.]+) MiB sent",
                      out.stdout)
        seeded_line = next((l for l in out.stdout.splitlines() if l.startswith("seeded:")), "")
        return {"total_ms": float(m.group(1)), "wall_ms": wall, "downtime_ms": float(m.group(2)),
                "mib": float(m.group(3)), "seed_ms": seed, "note": seeded_line}
    finally:
        for p in (src, dst):
            if p:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)


def qemu_case(a, image):
    d = tempfile.mkdtemp(prefix="ferry-bench-seedq-")
    small, big = sizes(a.memory)
    # The same data, written once and then only read (the guest powers off when its one
    # vCPU's workload ends, so not `dirty passes=1`).
    work = f"verify size={small + big}M"
    # The source in site A, the destination in site B.
    base = ["qemu-system-x86_64", "-enable-kvm", "-m", a.memory, "-nodefaults", "-display",
            "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial",
            "stdio", "-kernel", image, "-append", work]
    src = subprocess.Popen(ns("a", base + ["-qmp", f"unix:{d}/s.sock,server=on,wait=off"]),
                           stdout=subprocess.PIPE, text=True)
    dst = subprocess.Popen(ns("b", base + ["-qmp", f"unix:{d}/d.sock,server=on,wait=off",
                                           "-incoming", "defer"]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        Console(src).wait("V0 0 ok", timeout=600)
        for _ in range(600):
            if os.path.exists(f"{d}/d.sock") or dst.poll() is not None:
                break
            time.sleep(0.05)
        if dst.poll() is not None:
            raise RuntimeError(f"the destination QEMU ended: {dst.stderr.read()}")
        qs, qd = Qmp(f"{d}/s.sock"), Qmp(f"{d}/d.sock")
        for q in (qs, qd):
            q.cmd("migrate-set-parameters", **{"downtime-limit": 30, "max-bandwidth": 1 << 40})
        qd.cmd("migrate-incoming", uri=f"tcp:{PA_B}:4445")
        qs.cmd("migrate", uri=f"tcp:{PA_B}:4445")
        while True:
            st = qs.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        if st["status"] != "completed":
            raise RuntimeError(f"QEMU migration {st['status']}: {st}")
        return {"total_ms": st.get("total-time", 0), "downtime_ms": st.get("downtime", 0),
                "mib": st["ram"]["transferred"] / (1 << 20)}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferry", default=os.path.join(ROOT, "target", "debug", "ferry"))
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--rate", default="200mbit")
    ap.add_argument("--delay-ms", default="25")
    a = ap.parse_args()
    wire = os.path.join(os.path.dirname(a.ferry), "ferry-wire")
    env = dict(os.environ, FERRY_WIRE=wire)
    lab = os.path.join(ROOT, "scripts", "netlab.sh")
    subprocess.run([lab, "up", P, "--delay-ms", a.delay_ms, "--rate", a.rate], check=True,
                   env=env)
    d = tempfile.mkdtemp(prefix="ferry-bench-img-")
    try:
        image = os.path.join(d, "ferry-guest.elf")
        subprocess.run([a.ferry, "guest-image", "--output", image], check=True)
        small, big = sizes(a.memory)
        print(f"seeded migration over the WAN link: {a.rate}, {2 * int(a.delay_ms)} ms RTT; "
              f"VM {a.memory}, {small + big} MiB of data, {small} MiB changed since the seed")
        rows = []
        for name, f in [("Ferry seeded (dirty log)", lambda: ferry_case(a, True)),
                        ("Ferry seeded (hashes)", lambda: ferry_case(a, True, by_hash=True)),
                        ("Ferry unseeded", lambda: ferry_case(a, False)),
                        ("QEMU 7.2 (full migration)", lambda: qemu_case(a, image))]:
            rows.append((name, f()))
            print(f"  {name}: {rows[-1][1]}", flush=True)
        print("| case | total s | MiB sent | sent / changed | downtime ms |")
        print("|---|---:|---:|---:|---:|")
        for name, r in rows:
            print(f"| {name} | {r['total_ms'] / 1e3:.1f} | {r['mib']:.1f} | "
                  f"{r['mib'] / small:.2f} | {r['downtime_ms']:.1f} |")
        for name, r in rows[:2]:
            print(f"{name}: {r['note']}")
        s, u = rows[0][1], rows[2][1]
        print(f"seeded vs unseeded: {u['total_ms'] / s['total_ms']:.1f}x faster, "
              f"{u['mib'] / s['mib']:.1f}x fewer bytes; seed made in {s['seed_ms']:.0f} ms "
              f"while the guest ran; {s['note']}")
    finally:
        subprocess.run([lab, "down", P], env=env)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
