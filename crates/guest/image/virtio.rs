//! A polling virtio-mmio (version 2) driver for one virtio-blk device: a split queue, one
//! request at a time or (disk-bench) up to 32 in flight, no interrupts. Written here rather
//! than taken from the `virtio-drivers` crate: an independent implementation of the guest
//! side is what checks Ferry's device side.
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
const ID_BLOCK: u32 = 2;
const QSIZE: u16 = 4;
/// Queue size for many requests in flight (three descriptors each).
pub const QSIZE_DEEP: u16 = 128;
/// Requests in flight at most (slots of the header page).
pub const MAX_QD: u16 = 32;
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

/// Where the avail and used rings of a queue of `size` entries sit in its ring page:
/// descriptors at 0; queues of up to 64 entries keep avail at 0x400 and used at 0x800, larger
/// ones (up to 128) pack avail right after the descriptors and used after it.
pub const fn ring_offsets(size: u16) -> (u64, u64) {
    if size <= 64 {
        (0x400, 0x800)
    } else {
        let avail = 16 * size as u64;
        (avail, (avail + 6 + 2 * size as u64 + 3) & !3)
    }
}

/// Sets queue `q` of the device at `base` up with `size` entries (at most 128), its rings in
/// the page at `ring` (see [`ring_offsets`]), and marks it ready.
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
    let (avail, used) = ring_offsets(size);
    // VIRTQ_AVAIL_F_NO_INTERRUPT: this driver polls; an interrupt per completion would only
    // cost the vCPU an exit.
    put16(ring + avail, 1);
    set(0x80, 0x84, ring);
    set(0x90, 0x94, ring + avail);
    set(0xa0, 0xa4, ring + used);
    wr(base, 0x44, 1);
    Ok(())
}

/// Feature bits 0..31 the device at `base` offers.
pub fn offered(base: u64) -> u32 {
    wr(base, 0x14, 0);
    rd(base, 0x10)
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
    /// Page for the rings (see [`ring_offsets`]).
    ring: u64,
    /// Request headers (16 bytes per slot) from 0, status bytes from 0x800 (one per slot).
    hdr: u64,
    qsize: u16,
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
    /// Resets and sets up the device at `base` with a queue of `qsize` entries, its rings in
    /// the page at `ring` and request headers in the page at `hdr` (identity-mapped guest
    /// memory).
    pub fn init(base: u64, ring: u64, hdr: u64, qsize: u16) -> Result<Blk, &'static str> {
        // VIRTIO_BLK_F_FLUSH: this driver flushes when it needs durability, so the device may
        // keep a write cache (without it a device must write through).
        negotiate(base, 1 << 9)?;
        setup_queue(base, 0, qsize, ring)?;
        wr(base, 0x70, 1 | 2 | 8 | 4); // DRIVER_OK
        let sectors = rd(base, 0x100) as u64 | (rd(base, 0x104) as u64) << 32;
        Ok(Blk { base, ring, hdr, qsize, avail_idx: 0, used_seen: 0, sectors })
    }

    /// A queue of the size one request at a time needs.
    pub fn init_shallow(base: u64, ring: u64, hdr: u64) -> Result<Blk, &'static str> {
        Self::init(base, ring, hdr, QSIZE)
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.ring + i as u64 * 16;
        put64(d, addr);
        put32(d + 8, len);
        put16(d + 12, flags);
        put16(d + 14, next);
    }

    /// Makes request `ty` at `sector` with `len` bytes at `buf` (none for a flush) available
    /// in slot `slot` (descriptors 3·slot.., header and status of that slot); the device
    /// sees it at the next [`Blk::kick`].
    pub fn post(&mut self, slot: u16, ty: u32, sector: u64, buf: u64, len: u32) {
        let h = self.hdr + slot as u64 * 16;
        let status = self.hdr + 0x800 + slot as u64;
        put32(h, ty);
        put32(h + 4, 0);
        put64(h + 8, sector);
        // SAFETY: the slot's status byte in the header page.
        unsafe { write_volatile(status as *mut u8, 0xff) };
        let d = slot * 3;
        self.desc(d, h, 16, F_NEXT, d + 1);
        let mut last = d + 1;
        if len > 0 {
            let f = if ty == T_IN { F_WRITE } else { 0 };
            self.desc(d + 1, buf, len, f | F_NEXT, d + 2);
            last = d + 2;
        }
        self.desc(last, status, 1, F_WRITE, 0);
        let avail = self.ring + ring_offsets(self.qsize).0;
        put16(avail + 4 + (self.avail_idx % self.qsize) as u64 * 2, d);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put16(avail + 2, self.avail_idx);
    }

    /// Notifies the device of the requests posted.
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        wr(self.base, 0x50, 0);
    }

    /// The next completed request: its slot and status byte.
    pub fn reap(&mut self) -> Option<(u16, u8)> {
        let used = self.ring + ring_offsets(self.qsize).1;
        if get16(used + 2) == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = used + 4 + (self.used_seen % self.qsize) as u64 * 8;
        // SAFETY: the used element's id word, in this workload's ring page.
        let slot = (unsafe { read_volatile(e as *const u32) } / 3) as u16;
        self.used_seen = self.used_seen.wrapping_add(1);
        // SAFETY: the slot's status byte in the header page.
        Some((slot, unsafe { read_volatile((self.hdr + 0x800 + slot as u64 % MAX_QD as u64) as *const u8) }))
    }

    /// One request, waited for (see [`Blk::post`]). Returns the status byte.
    pub fn request(&mut self, ty: u32, sector: u64, buf: u64, len: u32) -> u8 {
        self.post(0, ty, sector, buf, len);
        self.kick();
        loop {
            if let Some((_, status)) = self.reap() {
                return status;
            }
            core::hint::spin_loop();
        }
    }
}
