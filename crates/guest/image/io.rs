//! Port I/O from CPL 3: serial console (COM1), PIT calibration, power-off port.
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
/// isa-debug-exit compatible power-off port (QEMU: `-device isa-debug-exit,iobase=0xf4`).
const EXIT_PORT: u16 = 0xf4;

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O is allowed at CPL 3 by IOPL 3 and the TSS I/O bitmap.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL 3 (CR4.TSD clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn serial_init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
}

/// Measures the TSC against 20 ms of PIT channel 0, read back through latch commands (ports
/// 0x40 and 0x43 only: QEMU microvm has a PIT but no port 0x61, the speaker port through
/// which channel 2 is usually gated and read, so a calibration on channel 2 there reads
/// nonsense). Channel 0 counts down from 65536 (mode 2) while measuring, and is stopped after.
pub fn calibrate_tsc_khz() -> u64 {
    const TICKS: u64 = 23864; // 1.193182 MHz * 20 ms
    let read = || {
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40) as u64;
        let hi = inb(0x40) as u64;
        hi << 8 | lo
    };
    outb(0x43, 0x34); // channel 0, lo/hi, mode 2
    outb(0x40, 0);
    outb(0x40, 0);
    let mut last = read();
    let t0 = rdtsc();
    let mut elapsed = 0u64;
    let mut t1 = t0;
    // A PIT that does not count (none there) must not hang the guest: give up after a few
    // seconds of TSC at any plausible rate.
    while elapsed < TICKS && t1 - t0 < 8_000_000_000 {
        let now = read();
        elapsed += (last + 0x10000 - now) & 0xffff; // counts down, wraps at 65536
        last = now;
        t1 = rdtsc();
    }
    // Channel 0 back to mode 0 with no count loaded: it stops, and raises no more timer
    // interrupts (a periodic channel 0 would keep the in-kernel PIT injecting IRQ 0).
    outb(0x43, 0x30);
    let khz = (t1 - t0) * 1_193_182 / elapsed.max(1) / 1000;
    if khz == 0 {
        1
    } else {
        khz
    }
}

pub fn power_off(code: u8) -> ! {
    let mut l = Line::new();
    l.s("X ").u(code as u64);
    l.send();
    outb(EXIT_PORT, code);
    loop {
        core::hint::spin_loop();
    }
}

static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

/// One output line, built in a buffer and sent whole under a lock so vCPUs never interleave.
pub struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line { buf: [0; 160], len: 0 }
    }
    pub fn s(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }
    fn byte(&mut self, b: u8) {
        if self.len < self.buf.len() - 1 {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }
    pub fn u(&mut self, mut v: u64) -> &mut Self {
        let mut d = [0u8; 20];
        let mut n = 0;
        loop {
            d[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.byte(d[n]);
        }
        self
    }
    pub fn x(&mut self, v: u64) -> &mut Self {
        let mut started = false;
        for i in (0..16).rev() {
            let nib = ((v >> (i * 4)) & 0xf) as u8;
            if nib != 0 || started || i == 0 {
                started = true;
                self.byte(if nib < 10 { b'0' + nib } else { b'a' + nib - 10 });
            }
        }
        self
    }
    /// Two hex digits.
    pub fn x2(&mut self, v: u8) -> &mut Self {
        for nib in [v >> 4, v & 0xf] {
            self.byte(if nib < 10 { b'0' + nib } else { b'a' + nib - 10 });
        }
        self
    }
    pub fn send(&mut self) {
        self.byte(b'\n');
        while SERIAL_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        for &b in &self.buf[..self.len] {
            outb(COM1, b);
        }
        SERIAL_LOCK.store(false, Ordering::Release);
        self.len = 0;
    }
}
