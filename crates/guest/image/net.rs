//! The `net` workload: a polling virtio-net driver and a responder on the guest's address —
//! ARP requests for it, ICMP echo, and UDP echo on port 7, where every reply carries the
//! guest's own reply counter (8 bytes, little-endian, appended), so the host sees whether any
//! reply went missing across a migration.
//!
//! Where the device offers `GUEST_ANNOUNCE` (with the control queue) the driver takes it:
//! every millisecond or so it reads the device's status, and when `VIRTIO_NET_S_ANNOUNCE`
//! is set (the VMM asks after a move) it sends a gratuitous ARP for its address, then
//! acknowledges on the control queue (`VIRTIO_NET_CTRL_ANNOUNCE_ACK`), as Linux's
//! virtio_net does, and prints `A<c> <n> ok` (n-th announcement; `err` if the device
//! refused the acknowledgement).
use crate::args::Spec;
use crate::io::{rdtsc, Line};
use crate::pattern::PAGE_SIZE;
use crate::virtio::{self, get16, put16, put32, put64, rd, wr};
use crate::work::Beat;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const ID_NET: u32 = 1;
const F_MAC: u32 = 1 << 5;
const F_STATUS: u32 = 1 << 16;
const F_CTRL_VQ: u32 = 1 << 17;
const F_GUEST_ANNOUNCE: u32 = 1 << 21;
const S_ANNOUNCE: u32 = 2;
const QSIZE: u16 = 4;
/// Bytes per buffer: the header and a frame of up to 2036 bytes.
pub const BUF: u64 = 2048;
pub const HDR: u64 = 12;

fn b(a: u64) -> u8 {
    // SAFETY: inside this workload's own identity-mapped buffers.
    unsafe { read_volatile(a as *const u8) }
}
fn setb(a: u64, v: u8) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u8, v) }
}
fn be16(a: u64) -> u16 {
    (b(a) as u16) << 8 | b(a + 1) as u16
}
fn setbe16(a: u64, v: u16) {
    setb(a, (v >> 8) as u8);
    setb(a + 1, v as u8);
}
fn copy(dst: u64, src: u64, n: u64) {
    for i in 0..n {
        setb(dst + i, b(src + i));
    }
}

/// Internet checksum of `n` bytes at `a`.
fn csum(a: u64, n: u64) -> u16 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < n {
        s += be16(a + i) as u32;
        i += 2;
    }
    if i < n {
        s += (b(a + i) as u32) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub fn say(cpu: u64, what: &str) -> u8 {
    let mut l = Line::new();
    l.s("!").u(cpu).s(" net: ").s(what);
    l.send();
    2
}

pub struct Nic {
    base: u64,
    rx_ring: u64,
    tx_ring: u64,
    rx_bufs: u64,
    tx_buf: u64,
    rx_avail: u16,
    rx_used_seen: u16,
    tx_avail: u16,
    tx_used_seen: u16,
    mac: [u8; 6],
    /// The control queue, when `GUEST_ANNOUNCE` was negotiated.
    ctrl: Option<Ctrl>,
}

/// The control queue's ring page, its command page (class and command at 0, the device's
/// ack byte at 16), and when the status is read next.
struct Ctrl {
    ring: u64,
    cmd: u64,
    avail: u16,
    used_seen: u16,
    next_check: u64,
    every: u64,
    announced: u64,
}

impl Nic {
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Announces the guest if the device asks (see the module's header): reads the status at
    /// most once a millisecond; true when it announced.
    pub fn announce_if_asked(&mut self, cpu: u64, ip: u32) -> bool {
        let Some(c) = self.ctrl.as_mut() else { return false };
        let now = rdtsc();
        if now < c.next_check {
            return false;
        }
        c.next_check = now + c.every;
        // The status is the u16 at byte 6 of the configuration space.
        if (rd(self.base, 0x104) >> 16) & S_ANNOUNCE == 0 {
            return false;
        }
        let out = self.tx_frame();
        for i in 0..6 {
            setb(out + i, 0xff);
            setb(out + 6 + i, self.mac[i as usize]);
            setb(out + 22 + i, self.mac[i as usize]); // sender hardware address
            setb(out + 32 + i, 0); // target hardware address: unknown
        }
        for (at, v) in [(12, 0x0806), (14, 1), (16, 0x0800), (18, 0x0604), (20, 1)] {
            setbe16(out + at, v); // ARP for IPv4 over Ethernet, a request
        }
        for (i, o) in ip.to_be_bytes().iter().enumerate() {
            setb(out + 28 + i as u64, *o); // sender and target protocol address: ours
            setb(out + 38 + i as u64, *o);
        }
        self.send(42);
        let ok = self.ack_announce();
        let Some(c) = self.ctrl.as_mut() else { return false };
        c.announced += 1;
        let mut l = Line::new();
        l.s("A").u(cpu).s(" ").u(c.announced).s(if ok { " ok" } else { " err" });
        l.send();
        true
    }

    /// Sends `VIRTIO_NET_CTRL_ANNOUNCE_ACK` and waits for the device's answer: true for OK.
    fn ack_announce(&mut self) -> bool {
        let Some(c) = self.ctrl.as_mut() else { return false };
        setb(c.cmd, 3); // VIRTIO_NET_CTRL_ANNOUNCE
        setb(c.cmd + 1, 0); // VIRTIO_NET_CTRL_ANNOUNCE_ACK
        setb(c.cmd + 16, 0xff);
        for (i, (addr, len, flags, next)) in [(c.cmd, 2, 1, 1), (c.cmd + 16, 1, 2, 0)].into_iter().enumerate() {
            let d = c.ring + i as u64 * 16;
            put64(d, addr);
            put32(d + 8, len);
            put16(d + 12, flags); // NEXT, then device-writable
            put16(d + 14, next);
        }
        let avail = c.ring + 0x400;
        put16(avail + 4 + (c.avail % QSIZE) as u64 * 2, 0);
        fence(Ordering::SeqCst);
        c.avail = c.avail.wrapping_add(1);
        put16(avail + 2, c.avail);
        fence(Ordering::SeqCst);
        wr(self.base, 0x50, 2);
        while get16(c.ring + 0x802) == c.used_seen {
            core::hint::spin_loop();
        }
        c.used_seen = c.used_seen.wrapping_add(1);
        fence(Ordering::SeqCst);
        b(c.cmd + 16) == 0
    }

    /// The next frame the device has written: its buffer's id and length (with the header).
    pub fn next_rx(&mut self) -> Option<(u16, u64)> {
        let used = self.rx_ring + 0x800;
        if get16(used + 2) == self.rx_used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = used + 4 + (self.rx_used_seen % QSIZE) as u64 * 8;
        // SAFETY: the used element's id and length words, in this workload's ring page.
        let id = (unsafe { read_volatile(e as *const u32) }) as u16 % QSIZE;
        // SAFETY: as above.
        let len = unsafe { read_volatile((e + 4) as *const u32) } as u64;
        self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
        Some((id, len.min(BUF)))
    }

    /// Where RX buffer `id`'s frame starts (after the virtio-net header).
    pub fn rx_frame(&self, id: u16) -> u64 {
        self.rx_bufs + id as u64 * BUF + HDR
    }

    /// Where a frame to send goes (after the header [`Nic::send`] fills in).
    pub fn tx_frame(&self) -> u64 {
        self.tx_buf + HDR
    }

    /// Gives RX buffer `id` back to the device and tells it.
    pub fn recycle(&mut self, id: u16) {
        self.post_rx(id);
        wr(self.base, 0x50, 0);
    }

    fn post_rx(&mut self, id: u16) {
        let d = self.rx_ring + id as u64 * 16;
        put64(d, self.rx_bufs + id as u64 * BUF);
        put32(d + 8, BUF as u32);
        put16(d + 12, 2); // device-writable
        put16(d + 14, 0);
        let avail = self.rx_ring + 0x400;
        put16(avail + 4 + (self.rx_avail % QSIZE) as u64 * 2, id);
        fence(Ordering::SeqCst);
        self.rx_avail = self.rx_avail.wrapping_add(1);
        put16(avail + 2, self.rx_avail);
    }

    /// Sends the `len`-byte frame at [`Nic::tx_frame`] and waits until the device took it.
    pub fn send(&mut self, len: u64) {
        for i in 0..HDR {
            setb(self.tx_buf + i, 0);
        }
        let d = self.tx_ring;
        put64(d, self.tx_buf);
        put32(d + 8, (HDR + len) as u32);
        put16(d + 12, 0);
        put16(d + 14, 0);
        let avail = self.tx_ring + 0x400;
        put16(avail + 4 + (self.tx_avail % QSIZE) as u64 * 2, 0);
        fence(Ordering::SeqCst);
        self.tx_avail = self.tx_avail.wrapping_add(1);
        put16(avail + 2, self.tx_avail);
        fence(Ordering::SeqCst);
        wr(self.base, 0x50, 1);
        while get16(self.tx_ring + 0x802) == self.tx_used_seen {
            core::hint::spin_loop();
        }
        self.tx_used_seen = self.tx_used_seen.wrapping_add(1);
    }
}

/// Finds and starts virtio-net device `dev`: its rings and buffers in the 8 pages from
/// `base` (status, RX ring, TX ring, 4 RX buffers of 2 KiB, TX buffer, control ring,
/// control command), every RX buffer posted. Prints `M<c> <mac>` (and ` announce` when
/// `GUEST_ANNOUNCE` was negotiated). `khz`: the TSC's rate.
pub fn open(cpu: u64, dev: u64, base: u64, khz: u64) -> Result<Nic, &'static str> {
    let dev = virtio::find(ID_NET, dev as usize).ok_or("no virtio-net device")?;
    let announce = F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE;
    let offered = virtio::offered(dev);
    let take = if offered & announce == announce { announce } else { 0 };
    virtio::negotiate(dev, F_MAC | take)?;
    let mut nic = Nic {
        base: dev,
        rx_ring: base + PAGE_SIZE,
        tx_ring: base + 2 * PAGE_SIZE,
        rx_bufs: base + 3 * PAGE_SIZE,
        tx_buf: base + 5 * PAGE_SIZE,
        rx_avail: 0,
        rx_used_seen: 0,
        tx_avail: 0,
        tx_used_seen: 0,
        mac: [0; 6],
        ctrl: (take != 0).then(|| Ctrl {
            ring: base + 6 * PAGE_SIZE,
            cmd: base + 7 * PAGE_SIZE,
            avail: 0,
            used_seen: 0,
            next_check: 0,
            every: khz.max(1),
            announced: 0,
        }),
    };
    for (i, m) in nic.mac.iter_mut().enumerate() {
        *m = (rd(dev, 0x100 + (i as u64 & !3)) >> ((i as u64 & 3) * 8)) as u8;
    }
    for (q, ring) in [(0, nic.rx_ring), (1, nic.tx_ring)] {
        virtio::setup_queue(dev, q, QSIZE, ring)?;
    }
    if let Some(c) = &nic.ctrl {
        virtio::setup_queue(dev, 2, QSIZE, c.ring)?;
    }
    wr(dev, 0x70, 1 | 2 | 8 | 4); // DRIVER_OK
    for id in 0..QSIZE {
        nic.post_rx(id);
    }
    wr(dev, 0x50, 0);
    let mut l = Line::new();
    l.s("M").u(cpu).s(" ");
    for (i, m) in nic.mac.iter().enumerate() {
        if i > 0 {
            l.s(":");
        }
        l.x2(*m);
    }
    if nic.ctrl.is_some() {
        l.s(" announce");
    }
    l.send();
    Ok(nic)
}

pub fn run(cpu: u64, spec: &Spec, base: u64, khz: u64, beat: &mut Beat) -> u8 {
    let mut nic = match open(cpu, spec.dev, base, khz) {
        Ok(nic) => nic,
        Err(e) => return say(cpu, e),
    };
    let ip = spec.ip;
    let mut replies = 0u64;
    loop {
        beat.poll();
        nic.announce_if_asked(cpu, ip);
        let Some((id, len)) = nic.next_rx() else {
            core::hint::spin_loop();
            continue;
        };
        if len > HDR {
            if let Some(n) = answer(&nic, nic.rx_frame(id), len - HDR, ip, &mut replies) {
                nic.send(n);
            }
        }
        nic.recycle(id);
    }
}

/// Builds the answer to the frame at `f` (if any) in the transmit buffer; returns its length.
fn answer(nic: &Nic, f: u64, n: u64, ip: u32, replies: &mut u64) -> Option<u64> {
    let out = nic.tx_frame();
    if n < 14 {
        return None;
    }
    let mac = nic.mac;
    let ip_at = |a: u64| (be16(a) as u32) << 16 | be16(a + 2) as u32;
    let eth = |to: u64| {
        copy(out, to, 6); // destination: the sender
        for (i, m) in mac.iter().enumerate() {
            setb(out + 6 + i as u64, *m);
        }
    };
    match be16(f + 12) {
        0x0806 if n >= 42 && be16(f + 20) == 1 && ip_at(f + 38) == ip => {
            eth(f + 6);
            copy(out + 12, f + 12, 8);
            setbe16(out + 20, 2); // reply
            for (i, m) in mac.iter().enumerate() {
                setb(out + 22 + i as u64, *m);
            }
            copy(out + 28, f + 38, 4); // our address
            copy(out + 32, f + 22, 10); // their MAC and address
            Some(42)
        }
        0x0800 if n >= 34 && ip_at(f + 30) == ip => {
            let ihl = (b(f + 14) & 0xf) as u64 * 4;
            let total = be16(f + 16) as u64;
            if ihl < 20 || total + 14 > n {
                return None;
            }
            let l4 = f + 14 + ihl;
            let proto = b(f + 23);
            let mut extra = 0;
            match proto {
                1 if b(l4) == 8 => {
                    copy(out, f, 14 + total);
                    eth(f + 6);
                    let o4 = out + 14 + ihl;
                    setb(o4, 0); // echo reply
                    setbe16(o4 + 2, 0);
                    setbe16(o4 + 2, csum(o4, total - ihl));
                }
                17 if be16(l4 + 2) == 7 && total - ihl + 8 <= 1400 => {
                    copy(out, f, 14 + total);
                    eth(f + 6);
                    let o4 = out + 14 + ihl;
                    copy(o4, l4 + 2, 2); // source port <- their destination
                    copy(o4 + 2, l4, 2);
                    *replies += 1;
                    let mut c = *replies;
                    for i in 0..8 {
                        setb(out + 14 + total + i, c as u8);
                        c >>= 8;
                    }
                    extra = 8;
                    setbe16(o4 + 4, be16(l4 + 4) + 8);
                    setbe16(o4 + 6, 0); // no UDP checksum (IPv4 allows it)
                }
                _ => return None,
            }
            let o3 = out + 14;
            copy(o3 + 12, f + 30, 4); // source: us
            copy(o3 + 16, f + 26, 4); // destination: them
            setbe16(o3 + 2, (total + extra) as u16);
            setbe16(o3 + 10, 0);
            setbe16(o3 + 10, csum(o3, ihl));
            Some(14 + total + extra)
        }
        _ => None,
    }
}
