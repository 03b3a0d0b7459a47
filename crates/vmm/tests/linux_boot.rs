//! Linux boot on real KVM with Debian's cloud kernel (fetched by
//! scripts/fetch-linux-kernel.sh into .ferry-cache/, which this test runs when needed).
//!
//! On this machine guest CPL 0 code is emulated: the ELF vmlinux reaches its early console in
//! about a second, the bzImage decompressor takes minutes (docs/linux-boot.md). So the
//! vmlinux is booted to its banner, and the bzImage load is checked byte for byte against the
//! boot protocol.
use ferry_guest::console::{wait_for, LineSink};
use ferry_vmm::{BootSource, GuestExit, Vm, VmConfig};
use linux_loader::bootparam::boot_params;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

fn kernel_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join(".ferry-cache");
    if !dir.join("vmlinux").exists() || !dir.join("vmlinuz").exists() {
        let st = Command::new("bash")
            .arg(root.join("scripts/fetch-linux-kernel.sh"))
            .arg(&dir)
            .status()
            .expect("run scripts/fetch-linux-kernel.sh");
        assert!(st.success(), "fetching the Debian cloud kernel failed");
    }
    dir
}

#[test]
fn vmlinux_reaches_its_early_console_with_our_command_line() {
    let dir = kernel_dir();
    let version = std::fs::read_to_string(dir.join("vmlinuz.version")).unwrap();
    let marker = format!("ferry.marker={}", std::process::id());
    let cmdline = format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 {marker}");
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: 1,
        memory: 512 << 20,
        boot: BootSource::Kernel {
            path: dir.join("vmlinux"),
            initrd: None,
            cmdline: cmdline.clone(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    vm.start().unwrap();
    let mut seen = Vec::new();
    let t = Duration::from_secs(60);
    let banner = wait_for(&rx, &mut seen, t, |l| l.contains("Linux version")).unwrap();
    assert!(
        banner.1.contains(version.trim()),
        "{} vs {version}",
        banner.1
    );
    let cl = wait_for(&rx, &mut seen, t, |l| l.contains("Command line:")).unwrap();
    assert!(
        cl.1.ends_with(&format!("Command line: {cmdline}")),
        "{}",
        cl.1
    );
    // The e820 map the kernel echoes is the one Ferry built.
    wait_for(&rx, &mut seen, t, |l| {
        l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable")
    })
    .unwrap();
    vm.shutdown().unwrap();
    assert_eq!(vm.wait(), GuestExit::Stopped);
}

#[test]
fn bzimage_and_initrd_are_placed_per_the_boot_protocol() {
    let dir = kernel_dir();
    let kernel = std::fs::read(dir.join("vmlinuz")).unwrap();
    let initrd_path = std::env::temp_dir().join(format!("ferry-initrd-{}", std::process::id()));
    let initrd: Vec<u8> = (0..(3 << 20) + 123)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd_path, &initrd).unwrap();
    let cmdline = "console=ttyS0 root=/dev/vda ro quiet";
    let cfg = VmConfig {
        cpus: 1,
        memory: 1 << 30,
        boot: BootSource::Kernel {
            path: dir.join("vmlinuz"),
            initrd: Some(initrd_path.clone()),
            cmdline: cmdline.into(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(std::io::sink())).expect("create VM");
    std::fs::remove_file(&initrd_path).unwrap();
    let mem = vm.memory();
    let zp: boot_params = mem.read_obj(GuestAddress(0x7000)).unwrap();
    let hdr = zp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448, "HdrS");
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!(ferry_vmm::boot::linux::read_cmdline(mem).unwrap(), cmdline);
    assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
    // Protected-mode kernel at 1 MiB, byte for byte.
    let setup = (kernel[0x1f1].max(4) as usize + 1) * 512;
    let mut got = vec![0u8; kernel.len() - setup];
    mem.read_slice(&mut got, GuestAddress(0x100000)).unwrap();
    assert!(
        got == kernel[setup..],
        "kernel image at 1 MiB differs from the file"
    );
    // Initrd: page aligned, below the kernel's limit, inside RAM, after the kernel.
    let (addr, size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
    assert_eq!(size, initrd.len() as u64);
    assert_eq!(addr % 4096, 0);
    assert!(addr >= 0x100000 + got.len() as u64 && addr + size <= (1 << 30));
    assert!(addr + size <= { hdr.initrd_addr_max } as u64 + 1);
    let mut back = vec![0u8; initrd.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert!(back == initrd, "initrd bytes differ");
    // e820: low RAM, the legacy holes, RAM from 1 MiB to the end.
    let n = zp.e820_entries as usize;
    let e: Vec<(u64, u64, u32)> = zp.e820_table[..n]
        .iter()
        .map(|x| (x.addr, x.size, x.r#type))
        .collect();
    assert_eq!(e.first(), Some(&(0, 0x9fc00, 1)));
    assert_eq!(e.last(), Some(&(0x100000, (1 << 30) - 0x100000, 1)));
    // VMM writes of the loader are tracked as dirty (migration must send them).
    vm.start_dirty_log().unwrap();
    assert_eq!(
        vm.fetch_dirty().unwrap().count(),
        0,
        "start clears the VMM bitmap"
    );
}

#[test]
fn loader_writes_are_tracked_as_dirty() {
    let dir = kernel_dir();
    let cfg = VmConfig {
        cpus: 1,
        memory: 256 << 20,
        boot: BootSource::Kernel {
            path: dir.join("vmlinuz"),
            initrd: None,
            cmdline: "x".into(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(std::io::sink())).unwrap();
    // With manual dirty-log protection the loader's writes stay marked (they are pages a
    // migration must send, and the log is how it finds them); the legacy log starts clean.
    let first = vm.fetch_dirty().unwrap();
    if vm.manual_dirty_log() {
        assert!(
            first.contains(0x100000) && first.contains(0x20000),
            "kernel and command line"
        );
    } else {
        assert_eq!(first.count(), 0, "Vm::new clears the VMM bitmap");
    }
    // Fetching clears: a write after it shows up alone.
    vm.memory().write_obj(1u8, GuestAddress(0x20000)).unwrap();
    let d = vm.fetch_dirty().unwrap();
    assert_eq!(d.pages().collect::<Vec<_>>(), vec![0x20000]);
}

/// The bzImage path end to end: 64-bit entry into the decompressor, which then starts the
/// kernel. Slow here (the decompressor runs emulated at CPL 0: ~2 minutes measured), so the
/// bound is generous.
#[test]
fn bzimage_boots_through_its_decompressor_to_the_banner() {
    let dir = kernel_dir();
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 ferry.bz={}",
        std::process::id()
    );
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: 1,
        memory: 512 << 20,
        boot: BootSource::Kernel {
            path: dir.join("vmlinuz"),
            initrd: None,
            cmdline: cmdline.clone(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    vm.start().unwrap();
    let mut seen = Vec::new();
    let t = Duration::from_secs(420);
    wait_for(&rx, &mut seen, t, |l| l.contains("Linux version")).unwrap();
    let cl = wait_for(&rx, &mut seen, t, |l| l.contains("Command line:")).unwrap();
    assert!(cl.1.ends_with(&cmdline), "{}", cl.1);
    vm.shutdown().unwrap();
    assert_eq!(vm.wait(), GuestExit::Stopped);
}
