//! Ferry test guest: everything here runs at CPL 3 with IOPL 3 (see boot.s).
#![no_std]
#![no_main]

mod args;
mod disk;
mod io;
mod mem;
mod net;
mod rt;
mod tcp;
mod virtio;
#[path = "../src/pattern.rs"]
#[allow(dead_code)]
mod pattern;
mod work;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

/// TSC frequency in kHz, calibrated by vCPU 0 against the PIT; 0 until known.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static FINISHED: AtomicU32 = AtomicU32::new(0);

#[no_mangle]
/// `cpus` is the number of vCPUs the VMM started (boot.s; 1 under QEMU, where only the BSP
/// runs).
pub extern "C" fn guest_entry(cpu: u64, mbi: u64, cpus: u64) -> ! {
    let map = mem::MemoryMap::from_multiboot(mbi);
    if cpu == 0 {
        io::serial_init();
        let khz = io::calibrate_tsc_khz();
        let mut l = io::Line::new();
        l.s("B ferry-guest 1 mem=").u(map.total() >> 20).s("M");
        l.send();
        // Only now: the other vCPUs wait for this, so the boot line is always the first.
        TSC_KHZ.store(khz, Ordering::SeqCst);
    }
    while TSC_KHZ.load(Ordering::SeqCst) == 0 {
        core::hint::spin_loop();
    }
    let cmdline = mem::cmdline(mbi);
    let code = match args::spec_for_cpu(cmdline, cpu) {
        Ok(spec) => match map.region_for(cmdline, cpu) {
            Ok(base) => work::run(cpu, &spec, base, &map, TSC_KHZ.load(Ordering::SeqCst)),
            Err(msg) => fail(cpu, msg),
        },
        Err(msg) => fail(cpu, msg),
    };
    finish(cpu, cpus, code)
}

fn fail(cpu: u64, msg: &str) -> u8 {
    let mut l = io::Line::new();
    l.s("!").u(cpu).s(" ").s(msg);
    l.send();
    2
}

/// Marks this vCPU's workload done; the last vCPU to finish powers the VM off: the last of
/// all the VMM started, not of those that happen to have started yet (32 vCPUs on 2 host
/// cores do not all enter at once).
fn finish(cpu: u64, cpus: u64, code: u8) -> ! {
    let mut l = io::Line::new();
    l.s("E").u(cpu);
    l.send();
    let done = FINISHED.fetch_add(1, Ordering::SeqCst) + 1;
    // boot.s parks vCPUs beyond its 32 TSSs, so they never finish.
    if u64::from(done) >= cpus.clamp(1, 32) || code != 0 {
        io::power_off(code);
    }
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    let mut l = io::Line::new();
    l.s("! panic");
    l.send();
    io::power_off(3)
}
