//! A polling virtio-mmio (version 2) driver for one virtio-blk device: split queue of 4
//! descriptors, one request at a time, no interrupts. Written here rather than taken from the
//! `virtio-drivers` crate: this image is built by build.rs with the bare rustc and no crate
//! graph (see docs/test-guest.md), and an independent implementation of the guest side is
//! what checks Ferry's device side.
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
const ID_BLOCK: u32 = 2;
const QSIZE: u16 = 4;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

/// Where virtio-mmio devices may sit: Ferry's windows, then QEMU microvm's slots (top first).
fn candidates() -> impl Iterator<Item = u64> {
    (0..16u64)
        .map(|i| 0xd000_0000 + i * 0x1000)
        .chain((0..24u64).rev().map(|n| 0xfeb0_0000 + n * 0x200))
}

pub fn rd(base: u64, off: u64) -> u32 {
    // SAFETY: a device window (identity mapped, user-accessible); MMIO exits to the VMM.
    unsafe { read_volatile((base + off) as *const u32) }
}

pub fn wr(base: u64, off: u64, v: u32) {
    // SAFETY: as for rd.
    unsafe { write_volatile((base + off) as *mut u32, v) }
}

/// The `n`-th block device found (0 = first).
pub fn find_block(n: usize) -> Option<u64> {
    find(ID_BLOCK, n)
}

/// The `n`-th device of type `id` found.
pub fn find(id: u32, n: usize) -> Option<u64> {
    candidates()
        .filter(|&b| rd(b, 0) == MAGIC && rd(b, 4) == 2 && rd(b, 8) == id)
        .nth(n)
}

/// Sets queue `q` of the device at `base` up with `size` entries, its rings in the page at
/// `ring` (descriptors at 0, avail at 0x400, used at 0x800), and marks it ready.
pub fn setup_queue(base: u64, q: u32, size: u16, ring: u64) -> Result<(), &'static str> {
    wr(base, 0x30, q);
    if rd(base, 0x44) != 0 {
        return Err("queue already live");
    }
    if rd(base, 0x34) < size as u32 {
        return Err("queue too small");
    }
    for a in (ring..ring + 4096).step_by(8) {
        put64(a, 0);
    }
    wr(base, 0x38, size as u32);
    let set = |lo: u64, hi: u64, a: u64| {
        wr(base, lo, a as u32);
        wr(base, hi, (a >> 32) as u32);
    };
    set(0x80, 0x84, ring);
    set(0x90, 0x94, ring + 0x400);
    set(0xa0, 0xa4, ring + 0x800);
    wr(base, 0x44, 1);
    Ok(())
}

/// Resets the device and negotiates `VERSION_1` plus `extra` (feature bits 0..31).
pub fn negotiate(base: u64, extra: u32) -> Result<(), &'static str> {
    wr(base, 0x70, 0);
    wr(base, 0x70, 1 | 2);
    wr(base, 0x14, 1);
    if rd(base, 0x10) & 1 == 0 {
        return Err("device is not VERSION_1");
    }
    wr(base, 0x14, 0);
    if rd(base, 0x10) & extra != extra {
        return Err("device lacks a feature");
    }
    wr(base, 0x24, 0);
    wr(base, 0x20, extra);
    wr(base, 0x24, 1);
    wr(base, 0x20, 1);
    wr(base, 0x70, 1 | 2 | 8);
    if rd(base, 0x70) & 8 == 0 {
        return Err("device refused FEATURES_OK");
    }
    Ok(())
}

pub struct Blk {
    base: u64,
    /// Page for the rings: descriptors at 0, avail at 0x400, used at 0x800.
    ring: u64,
    /// Request header (16 bytes) at 0, status byte at 0x100.
    hdr: u64,
    avail_idx: u16,
    used_seen: u16,
    pub sectors: u64,
}

pub fn put16(a: u64, v: u16) {
    // SAFETY: inside this workload's own DMA pages.
    unsafe { write_volatile(a as *mut u16, v) }
}
pub fn put32(a: u64, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u32, v) }
}
pub fn put64(a: u64, v: u64) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u64, v) }
}
pub fn get16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u16) }
}

impl Blk {
    /// Resets and sets up the device at `base` with its rings in the page at `ring` and
    /// request headers in the page at `hdr` (identity-mapped guest memory).
    pub fn init(base: u64, ring: u64, hdr: u64) -> Result<Blk, &'static str> {
        negotiate(base, 0)?;
        setup_queue(base, 0, QSIZE, ring)?;
        wr(base, 0x70, 1 | 2 | 8 | 4); // DRIVER_OK
        let sectors = rd(base, 0x100) as u64 | (rd(base, 0x104) as u64) << 32;
        Ok(Blk { base, ring, hdr, avail_idx: 0, used_seen: 0, sectors })
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.ring + i as u64 * 16;
        put64(d, addr);
        put32(d + 8, len);
        put16(d + 12, flags);
        put16(d + 14, next);
    }

    /// One request, waited for: `ty` at `sector` with `len` bytes at `buf` (none for a
    /// flush). Returns the status byte.
    pub fn request(&mut self, ty: u32, sector: u64, buf: u64, len: u32) -> u8 {
        put32(self.hdr, ty);
        put32(self.hdr + 4, 0);
        put64(self.hdr + 8, sector);
        // SAFETY: status byte in the header page.
        unsafe { write_volatile((self.hdr + 0x100) as *mut u8, 0xff) };
        self.desc(0, self.hdr, 16, F_NEXT, 1);
        let mut last = 1;
        if len > 0 {
            let f = if ty == T_IN { F_WRITE } else { 0 };
            self.desc(1, buf, len, f | F_NEXT, 2);
            last = 2;
        }
        self.desc(last, self.hdr + 0x100, 1, F_WRITE, 0);
        let avail = self.ring + 0x400;
        put16(avail + 4 + (self.avail_idx % QSIZE) as u64 * 2, 0);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put16(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        wr(self.base, 0x50, 0); // notify queue 0
        let used = self.ring + 0x800;
        while get16(used + 2) == self.used_seen {
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        self.used_seen = self.used_seen.wrapping_add(1);
        // SAFETY: as above.
        unsafe { read_volatile((self.hdr + 0x100) as *const u8) }
    }
}
