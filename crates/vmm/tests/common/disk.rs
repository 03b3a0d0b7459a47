//! Disk helpers of the KVM test binaries: a VM with the test guest writing its disk pattern,
//! and checks of an image against the guest's recorded position.
use super::*;
use ferry_guest::console::{wait_for, LineSink, TimedLine};
use ferry_guest::verify::{disk_position, verify_disk_image, DiskPosition};
use ferry_storage::Format;
use ferry_vmm::devices::DiskConfig;
use ferry_vmm::{BootSource, Vm, VmConfig};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

/// A scratch directory with an 8 MiB sparse raw image in it.
pub fn scratch_disk(tag: &str) -> (Dir, PathBuf) {
    let d = scratch(tag);
    let p = d.0.join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    (d, p)
}

/// Waits for the guest's first disk pass; returns the lines so far and vCPU 0's region base.
pub fn first_pass(rx: &Receiver<TimedLine>) -> (Vec<TimedLine>, u64) {
    let mut seen = Vec::new();
    wait_for(rx, &mut seen, T, k_ok(1)).unwrap();
    let base = bases(&seen)[0];
    (seen, base)
}

pub fn boot_disk(work: &str, disk: &Path) -> (Vm, Receiver<TimedLine>) {
    boot_disk_as(work, disk, Format::Raw)
}

pub fn boot_disk_as(work: &str, disk: &Path, format: Format) -> (Vm, Receiver<TimedLine>) {
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: 1,
        memory: 256 << 20,
        boot: BootSource::TestGuest { args: work.into() },
        disks: vec![DiskConfig {
            path: disk.to_owned(),
            format,
            readonly: false,
            id: "disk0".into(),
        }],
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    vm.start().expect("start");
    (vm, rx)
}

/// The image checked against the guest's position (read from its paused memory).
pub fn check_image(vm: &Vm, base: u64, disk: &Path) -> DiskPosition {
    let p = disk_position(&reader(vm), base).expect("disk status page");
    let f = std::fs::File::open(disk).unwrap();
    verify_disk_image(
        |off, buf| f.read_exact_at(buf, off).map_err(|e| e.to_string()),
        &p,
    )
    .expect("disk image matches the guest's position");
    p
}

pub fn k_ok(pass: u64) -> impl Fn(&str) -> bool {
    move |l: &str| {
        assert!(!l.contains("BAD") && !l.starts_with('!'), "guest: {l}");
        l == format!("K0 {pass} ok")
    }
}

pub const WORK: &str = "disk span=4M rate=16M hb=2000";

#[allow(unused_imports)] // not every test binary uses it
pub use ferry_guest::tools::host_fill;
