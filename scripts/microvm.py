"""QEMU microvm command lines for the device benchmarks: the test guest with modern
virtio-mmio devices (a raw disk with QEMU's default write-back cache, a NIC on a tap)."""


def microvm(image, work, disk=None, tap=None, extra=()):
    c = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", "256", "-nodefaults",
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
