//! A minimal virtio-mmio driver for tests: programs the transport's registers as a guest
//! driver does and posts descriptor chains it writes itself (well-formed or not).
#![allow(dead_code)]
use ferry_devices::{Interrupt, MmioTransport, VirtioDevice};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const QSIZE: u16 = 16;
/// Where request buffers go.
pub const BUF: u64 = 0x10000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

#[derive(Default)]
pub struct Irq(pub AtomicU32);
impl Interrupt for Irq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

/// One queue as the driver sees it: its rings (descriptors at `ring`, avail at +0x1000, used
/// at +0x2000) and positions.
#[derive(Clone, Copy)]
struct Ring {
    ring: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn at(ring: u64) -> Ring {
        Ring {
            ring,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }
    fn desc(&self) -> u64 {
        self.ring
    }
    fn avail(&self) -> u64 {
        self.ring + 0x1000
    }
    fn used(&self) -> u64 {
        self.ring + 0x2000
    }
}

pub struct Driver {
    pub t: MmioTransport<Mem>,
    pub irq: Arc<Irq>,
    /// Queue `i`'s rings; `cur` is the one `post`, `notify` and `next_used` work on.
    rings: Vec<Ring>,
    cur: usize,
}

impl Driver {
    pub fn wrap(t: MmioTransport<Mem>, irq: Arc<Irq>) -> Self {
        Driver {
            t,
            irq,
            rings: vec![Ring::at(DESC)],
            cur: 0,
        }
    }

    fn r(&self) -> &Ring {
        &self.rings[self.cur]
    }

    fn r_mut(&mut self) -> &mut Ring {
        &mut self.rings[self.cur]
    }

    /// Works on queue `q` from now on (set up with [`Driver::add_queue`], or queue 0).
    pub fn select(&mut self, q: usize) {
        self.cur = q;
    }

    /// Sets queue `q` up with its rings at `ring` (after [`Driver::setup`] set up queue 0).
    pub fn add_queue(&mut self, q: u32, ring: u64, mem: &Mem) {
        // Rings outside memory are a test case of their own: nothing to clear there.
        let _ = mem.write_slice(&[0u8; 0x3000], GuestAddress(ring));
        self.set(0x30, q, mem);
        self.set(0x38, QSIZE as u32, mem);
        self.set(0x80, ring as u32, mem);
        self.set(0x84, 0, mem);
        self.set(0x90, (ring + 0x1000) as u32, mem);
        self.set(0x94, 0, mem);
        self.set(0xa0, (ring + 0x2000) as u32, mem);
        self.set(0xa4, 0, mem);
        self.set(0x44, 1, mem);
        if self.rings.len() <= q as usize {
            self.rings.resize(q as usize + 1, Ring::at(ring));
        }
        self.rings[q as usize] = Ring::at(ring);
    }

    pub fn new(dev: Box<dyn VirtioDevice<Mem>>) -> Self {
        let irq = Arc::new(Irq::default());
        Self::wrap(MmioTransport::new(dev, irq.clone()), irq)
    }

    /// The same guest (rings, positions) in front of a transport rebuilt by `f`.
    pub fn rebuild(self, f: impl FnOnce(MmioTransport<Mem>) -> MmioTransport<Mem>) -> Self {
        let Driver { t, irq, rings, cur } = self;
        Driver {
            t: f(t),
            irq,
            rings,
            cur,
        }
    }

    pub fn reg(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn set(&mut self, off: u64, v: u32, mem: &Mem) {
        self.t.write(off, &v.to_le_bytes(), mem);
    }

    pub fn features(&mut self) -> u64 {
        self.set(0x14, 0, &memory());
        let lo = self.reg(0x10) as u64;
        self.set(0x14, 1, &memory());
        lo | ((self.reg(0x10) as u64) << 32)
    }

    /// Negotiates `features`, sets queue 0 up (and then the device's other queues, where
    /// `extra` puts their rings) and sets DRIVER_OK; returns the status read back.
    pub fn setup(&mut self, features: u64, mem: &Mem) -> u32 {
        self.setup_with(features, &[], mem)
    }

    pub fn setup_with(&mut self, features: u64, extra: &[u64], mem: &Mem) -> u32 {
        // Fresh rings, as a driver allocates them.
        mem.write_slice(
            &vec![0u8; (USED + 0x1000 - DESC) as usize],
            GuestAddress(DESC),
        )
        .unwrap();
        self.set(0x70, 1 | 2, mem); // ACKNOWLEDGE | DRIVER
        self.set(0x24, 0, mem);
        self.set(0x20, features as u32, mem);
        self.set(0x24, 1, mem);
        self.set(0x20, (features >> 32) as u32, mem);
        self.set(0x70, 1 | 2 | 8, mem); // FEATURES_OK
        if self.reg(0x70) & 8 == 0 {
            return self.reg(0x70);
        }
        self.set(0x30, 0, mem);
        self.set(0x38, QSIZE as u32, mem);
        self.set(0x80, DESC as u32, mem);
        self.set(0x84, 0, mem);
        self.set(0x90, AVAIL as u32, mem);
        self.set(0x94, 0, mem);
        self.set(0xa0, USED as u32, mem);
        self.set(0xa4, 0, mem);
        self.set(0x44, 1, mem);
        for (i, &ring) in extra.iter().enumerate() {
            self.add_queue(i as u32 + 1, ring, mem);
        }
        self.set(0x70, 1 | 2 | 8 | 4, mem); // DRIVER_OK
        self.reg(0x70)
    }

    /// Writes a chain of (addr, len, flags) descriptors; NEXT links are added between them.
    pub fn post(&mut self, mem: &Mem, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.r().next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            let next = (idx + 1) % QSIZE;
            self.raw_desc(mem, idx, addr, len, flags, next);
        }
        self.r_mut().next_desc = (head + descs.len() as u16) % QSIZE;
        self.make_available(mem, head);
        head
    }

    pub fn raw_desc(&self, mem: &Mem, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.r().desc() + idx as u64 * 16);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    pub fn make_available(&mut self, mem: &Mem, head: u16) {
        let r = *self.r();
        let slot = r.avail_idx % QSIZE;
        mem.write_obj(head, GuestAddress(r.avail() + 4 + slot as u64 * 2))
            .unwrap();
        let idx = r.avail_idx.wrapping_add(1);
        self.r_mut().avail_idx = idx;
        mem.write_obj(idx, GuestAddress(r.avail() + 2)).unwrap();
    }

    pub fn set_avail_idx(&mut self, mem: &Mem, idx: u16) {
        self.r_mut().avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.r().avail() + 2))
            .unwrap();
    }

    pub fn notify(&mut self, mem: &Mem) {
        self.set(0x50, self.cur as u32, mem);
    }

    pub fn used_idx(&self, mem: &Mem) -> u16 {
        mem.read_obj(GuestAddress(self.r().used() + 2)).unwrap()
    }

    /// The next used element: (descriptor head, bytes written).
    pub fn next_used(&mut self, mem: &Mem) -> Option<(u32, u32)> {
        let r = *self.r();
        if self.used_idx(mem) == r.used_seen {
            return None;
        }
        let at = GuestAddress(r.used() + 4 + (r.used_seen % QSIZE) as u64 * 8);
        self.r_mut().used_seen = r.used_seen.wrapping_add(1);
        Some((
            mem.read_obj(at).unwrap(),
            mem.read_obj(at.unchecked_add(4)).unwrap(),
        ))
    }
}

/// Whether the page holding `addr` is marked dirty in the memory's bitmap.
pub fn dirty(mem: &Mem, addr: u64) -> bool {
    let r = mem.find_region(GuestAddress(addr)).unwrap();
    r.bitmap().dirty_at((addr - r.start_addr().0) as usize)
}

pub fn clear_dirty(mem: &Mem) {
    for r in mem.iter() {
        std::ops::Deref::deref(r).bitmap().reset();
    }
}
