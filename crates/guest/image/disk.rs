//! The disk workloads, on the first (or `dev=`) virtio-blk device:
//!   disk: writes the span block by block with `disk_word(sector, pass, w)`, pass after pass,
//!         recording its position in its status page after each acknowledged write; after
//!         each pass flushes, reads the whole span back and checks it: `K<c> <pass> ok`.
//!   disk-verify: reads the span once and checks it holds `pass` before block `next` and
//!         `pass - 1` from there: `K<c> <pass> ok|BAD <sector>`.
//!   disk-bench: `ops` requests of `bs` bytes (writes, or reads with `read=1`) at sequential
//!         or (`random=1`) random block offsets in the span, `qd` of them in flight, timed by
//!         the guest's TSC: `Q<c> <ops> <bytes> <ticks> <kHz>` (then a flush, untimed;
//!         kHz is the guest's PIT calibration, which QEMU microvm cannot give: no port 0x61).
use crate::args::{Kind, Spec};
use crate::io::{rdtsc, Line};
use crate::pattern::{disk_status as st, disk_word, DISK_MAGIC, PAGE_SIZE, SECTOR, WORDS_PER_SECTOR};
use crate::virtio::{self, Blk, T_FLUSH, T_IN, T_OUT};
use crate::work::{get, put, Beat};

fn say(cpu: u64, what: &str) -> u8 {
    let mut l = Line::new();
    l.s("!").u(cpu).s(" disk: ").s(what);
    l.send();
    2
}

pub fn run(cpu: u64, spec: &Spec, base: u64, khz: u64, beat: &mut Beat) -> u8 {
    let Some(dev) = virtio::find_block(spec.dev as usize) else {
        return say(cpu, "no virtio-blk device");
    };
    let (ring, hdr, data) = (base + PAGE_SIZE, base + 2 * PAGE_SIZE, base + 3 * PAGE_SIZE);
    let mut blk = match Blk::init_shallow(dev, ring, hdr) {
        Ok(b) => b,
        Err(e) => return say(cpu, e),
    };
    if blk.sectors * SECTOR < spec.span {
        return say(cpu, "span is larger than the disk");
    }
    let s = |w: usize| base + w as u64 * 8;
    let per = spec.bs / SECTOR;
    let blocks = spec.span / spec.bs;
    put(s(st::MAGIC), DISK_MAGIC);
    put(s(st::CPU), cpu);
    put(s(st::SECTORS), spec.span / SECTOR);
    put(s(st::BLOCK), per);
    put(s(st::COMPLETED), 0);
    if spec.kind == Kind::DiskVerify {
        let next = spec.next.min(blocks);
        return check(cpu, &mut blk, data, per, blocks, spec.pass, next, beat);
    }
    let tpb = if spec.rate == 0 { 0 } else { khz * 1000 * spec.bs / spec.rate.max(1) };
    let mut pass = 1u64;
    let (mut t0, mut written) = (rdtsc(), 0u64);
    loop {
        put(s(st::POSITION), pass << 32);
        for b in 0..blocks {
            if tpb != 0 {
                let due = t0 + written * tpb;
                loop {
                    let now = rdtsc();
                    if now >= due {
                        if now - due > 16 * tpb {
                            t0 = now - written * tpb; // paused: no catch-up burst
                        }
                        break;
                    }
                    beat.poll();
                    core::hint::spin_loop();
                }
            }
            fill(data, b * per, per, pass);
            if blk.request(T_OUT, b * per, data, spec.bs as u32) != 0 {
                return say(cpu, "write failed");
            }
            put(s(st::POSITION), pass << 32 | (b + 1));
            written += 1;
            beat.poll();
        }
        if blk.request(T_FLUSH, 0, 0, 0) != 0 {
            return say(cpu, "flush failed");
        }
        let r = check(cpu, &mut blk, data, per, blocks, pass, blocks, beat);
        if r != 0 {
            return r;
        }
        put(s(st::COMPLETED), pass);
        if spec.count != 0 && pass >= spec.count {
            return 0;
        }
        pass += 1;
    }
}

pub fn bench(cpu: u64, spec: &Spec, base: u64, khz: u64, beat: &mut Beat) -> u8 {
    let Some(dev) = virtio::find_block(spec.dev as usize) else {
        return say(cpu, "no virtio-blk device");
    };
    let (ring, hdr, data) = (base + PAGE_SIZE, base + 2 * PAGE_SIZE, base + 3 * PAGE_SIZE);
    let mut blk = match Blk::init(dev, ring, hdr, virtio::QSIZE_DEEP) {
        Ok(b) => b,
        Err(e) => return say(cpu, e),
    };
    if blk.sectors * SECTOR < spec.span {
        return say(cpu, "span is larger than the disk");
    }
    let per = spec.bs / SECTOR;
    let blocks = spec.span / spec.bs;
    let ops = if spec.count == 0 { blocks } else { spec.count };
    let slot_bytes = spec.bs.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let buf = |slot: u16| data + slot as u64 * slot_bytes;
    let qd = spec.qd.min(ops) as u16;
    if !spec.read {
        for slot in 0..qd {
            fill(buf(slot), slot as u64 * per, per, 1);
        }
    }
    let ty = if spec.read { T_IN } else { T_OUT };
    // xorshift64: the same offsets under every VMM.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_block = |n: u64| {
        if spec.random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        } else {
            n % blocks
        }
    };
    let t0 = rdtsc();
    let mut posted = 0u64;
    while posted < qd as u64 {
        let b = next_block(posted);
        blk.post(posted as u16, ty, b * per, buf(posted as u16), spec.bs as u32);
        posted += 1;
    }
    blk.kick();
    let mut done = 0u64;
    while done < ops {
        let mut more = false;
        while let Some((slot, status)) = blk.reap() {
            if status != 0 {
                return say(cpu, "request failed");
            }
            done += 1;
            if posted < ops {
                let b = next_block(posted);
                blk.post(slot, ty, b * per, buf(slot), spec.bs as u32);
                posted += 1;
                more = true;
            }
        }
        if more {
            blk.kick();
        }
        beat.poll();
    }
    let ticks = rdtsc() - t0;
    if blk.request(T_FLUSH, 0, 0, 0) != 0 {
        return say(cpu, "flush failed");
    }
    let mut l = Line::new();
    l.s("Q").u(cpu).s(" ").u(ops).s(" ").u(ops * spec.bs).s(" ").u(ticks).s(" ").u(khz);
    l.send();
    0
}

fn fill(buf: u64, first: u64, sectors: u64, pass: u64) {
    for k in 0..sectors {
        for w in 0..WORDS_PER_SECTOR {
            put(buf + (k * SECTOR) + w * 8, disk_word(first + k, pass, w));
        }
    }
}

/// Reads the span back: blocks before `next` must hold `pass`, the rest `pass - 1`.
#[allow(clippy::too_many_arguments)]
fn check(cpu: u64, blk: &mut Blk, buf: u64, per: u64, blocks: u64, pass: u64, next: u64, beat: &mut Beat) -> u8 {
    for b in 0..blocks {
        if blk.request(T_IN, b * per, buf, (per * SECTOR) as u32) != 0 {
            return say(cpu, "read failed");
        }
        let want = if b < next { pass } else { pass - 1 };
        for k in 0..per {
            let sector = b * per + k;
            for w in 0..WORDS_PER_SECTOR {
                if get(buf + k * SECTOR + w * 8) != disk_word(sector, want, w) {
                    let mut l = Line::new();
                    l.s("K").u(cpu).s(" ").u(pass).s(" BAD ").u(sector);
                    l.send();
                    return 1;
                }
            }
        }
        beat.poll();
    }
    let mut l = Line::new();
    l.s("K").u(cpu).s(" ").u(pass).s(" ok");
    l.send();
    0
}
