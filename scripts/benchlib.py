"""What the Ferry-beside-QEMU benchmark scripts share: their common options, the test guest
image, QEMU's version line, the interleaved run loop, and QEMU microvm command lines for the
device benchmarks (the test guest with modern virtio-mmio devices: a raw disk with QEMU's
default write-back cache, a NIC on a tap)."""
import argparse, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(doc, runs):
    """An argument parser with the usage text `doc` and the options every benchmark has:
    `--runs` (default `runs`) and `--ferry` (the release binary)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--ferry", default=os.path.join(ROOT, "target", "release", "ferry"))
    return ap


def parse(ap):
    """Parses the command line; exits with a clear message if the Ferry binary is missing."""
    a = ap.parse_args()
    if not os.path.exists(a.ferry):
        sys.exit(f"{a.ferry} not found: run 'cargo build --release' first")
    return a


def guest_image(ferry, d):
    """Writes the test guest's ELF image into directory `d`; returns its path."""
    image = os.path.join(d, "ferry-guest.elf")
    subprocess.run([ferry, "guest-image", "--output", image], check=True, capture_output=True)
    return image


def qemu_version():
    return subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.split("\n")[0]


def interleaved(cmds, runs, measure, prepare=None):
    """Runs `measure(cmd)` `runs` times for each named command, interleaved (drift in the
    machine's load hits every VMM alike), `prepare()` before each; returns name -> results."""
    res = {k: [] for k in cmds}
    for _ in range(runs):
        for k, c in cmds.items():
            if prepare:
                prepare()
            res[k].append(measure(c))
    return res


def microvm(image, work, disk=None, tap=None, extra=(), mem="256"):
    c = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", mem, "-nodefaults",
         "-display", "none", "-no-reboot", "-serial", "stdio",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-global", "virtio-mmio.force-legacy=false"]
    if disk:
        c += ["-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback",
              "-device", "virtio-blk-device,drive=d0"]
    if tap:
        c += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
              "-device", "virtio-net-device,netdev=n0"]
    return c + ["-kernel", image, "-append", work] + list(extra)
