//! The workloads. Output lines (docs/test-guest.md):
//!   S<c> <workload> base=0x<hex> pages=<n>   start
//!   H<c> <seq> <tsc-hex>                     heartbeat
//!   D<c> <pass>                              dirty pass completed
//!   V<c> <n> ok|BAD <sum-hex>                verify check
use crate::args::{Kind, Spec};
use crate::io::{rdtsc, Line};
use crate::mem::MemoryMap;
use crate::pattern::{self, status, PAGE_SIZE, WORDS_PER_PAGE};

/// Emits `H<c> <seq> <tsc>` every `period` TSC ticks when polled.
pub struct Beat {
    cpu: u64,
    period: u64,
    next: u64,
    seq: u64,
}

impl Beat {
    fn new(cpu: u64, period_us: u64, khz: u64) -> Self {
        Beat { cpu, period: period_us * khz / 1000, next: rdtsc(), seq: 0 }
    }
    /// Sends a line if one is due; true when it did.
    #[inline(always)]
    pub fn poll(&mut self) -> bool {
        if self.period == 0 {
            return false;
        }
        let now = rdtsc();
        if now < self.next {
            return false;
        }
        self.seq += 1;
        let mut l = Line::new();
        l.s("H").u(self.cpu).s(" ").u(self.seq).s(" ").x(now);
        l.send();
        self.next += self.period;
        if now > self.next.saturating_add(self.period) {
            self.next = now + self.period; // after a pause: no burst of catch-up lines
        }
        true
    }
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Idle => "idle",
        Kind::Heartbeat => "heartbeat",
        Kind::Dirty => "dirty",
        Kind::Verify => "verify",
        Kind::Disk => "disk",
        Kind::DiskVerify => "disk-verify",
        Kind::DiskBench => "disk-bench",
        Kind::Net => "net",
        Kind::Tcp => "tcp",
    }
}

pub fn run(cpu: u64, spec: &Spec, base: u64, _map: &MemoryMap, khz: u64) -> u8 {
    let pages = crate::args::region_size(spec) / PAGE_SIZE;
    let mut l = Line::new();
    l.s("S").u(cpu).s(" ").s(name(spec.kind));
    if pages > 0 {
        l.s(" base=0x").x(base).s(" pages=").u(pages);
    }
    l.send();
    let mut beat = Beat::new(cpu, spec.period_us, khz);
    match spec.kind {
        Kind::Idle => {
            let end = rdtsc().saturating_add(spec.seconds * khz * 1000);
            while spec.seconds == 0 || rdtsc() < end {
                core::hint::spin_loop();
            }
            0
        }
        Kind::Heartbeat => {
            while spec.count == 0 || beat.seq < spec.count {
                if !beat.poll() {
                    core::hint::spin_loop();
                }
            }
            0
        }
        Kind::Dirty => dirty(cpu, spec, base, pages - 1, khz, &mut beat),
        Kind::Verify => verify(cpu, spec, base, pages, khz, &mut beat),
        Kind::Disk | Kind::DiskVerify => crate::disk::run(cpu, spec, base, khz, &mut beat),
        Kind::DiskBench => crate::disk::bench(cpu, spec, base, khz, &mut beat),
        Kind::Net => crate::net::run(cpu, spec, base, khz, &mut beat),
        Kind::Tcp => crate::tcp::run(cpu, spec, base, khz, &mut beat),
    }
}

#[inline(always)]
pub fn put(addr: u64, v: u64) {
    // SAFETY: addr lies in this vCPU's own identity-mapped workload region.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

#[inline(always)]
pub fn get(addr: u64) -> u64 {
    // SAFETY: as for put.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn dirty(cpu: u64, spec: &Spec, base: u64, pages: u64, khz: u64, beat: &mut Beat) -> u8 {
    let st = |w: usize| base + w as u64 * 8;
    put(st(status::MAGIC), pattern::DIRTY_MAGIC);
    put(st(status::CPU), cpu);
    put(st(status::PAGES), pages);
    put(st(status::COMPLETED), 0);
    let data = base + PAGE_SIZE;
    // TSC ticks per page at the target rate.
    let tpp = if spec.rate == 0 { 0 } else { khz * 1000 * PAGE_SIZE / spec.rate.max(1) };
    let mut pass = 1u64;
    let mut t0 = rdtsc();
    let mut written = 0u64;
    loop {
        put(st(status::POSITION), pass << 32);
        for page in 0..pages {
            if tpp != 0 {
                let due = t0 + written * tpp;
                loop {
                    let now = rdtsc();
                    if now >= due {
                        if now - due > 16 * tpp {
                            t0 = now - written * tpp; // paused or throttled: no catch-up burst
                        }
                        break;
                    }
                    beat.poll();
                    core::hint::spin_loop();
                }
            }
            let p = data + page * PAGE_SIZE;
            for w in 0..WORDS_PER_PAGE {
                put(p + w * 8, pattern::dirty_word(page, pass, w));
            }
            put(st(status::POSITION), pass << 32 | (page + 1));
            written += 1;
            beat.poll();
        }
        put(st(status::COMPLETED), pass);
        let mut l = Line::new();
        l.s("D").u(cpu).s(" ").u(pass);
        l.send();
        if spec.count != 0 && pass >= spec.count {
            return 0;
        }
        pass += 1;
    }
}

/// Checksums `pages` pages from `base`, beating between pages (a large region takes long).
fn checksum(base: u64, pages: u64, beat: &mut Beat) -> u64 {
    let mut sum = pattern::CHECKSUM_INIT;
    for page in 0..pages {
        let p = base + page * PAGE_SIZE;
        for a in (p..p + PAGE_SIZE).step_by(8) {
            sum = pattern::checksum_step(sum, get(a));
        }
        beat.poll();
    }
    sum
}

fn verify(cpu: u64, spec: &Spec, base: u64, pages: u64, khz: u64, beat: &mut Beat) -> u8 {
    let seed = cpu + 1;
    let mut expect = pattern::CHECKSUM_INIT;
    for page in 0..pages {
        for w in 0..WORDS_PER_PAGE {
            let v = pattern::verify_word(seed, page, w);
            put(base + page * PAGE_SIZE + w * 8, v);
            expect = pattern::checksum_step(expect, v);
        }
        beat.poll();
    }
    let mut n = 0u64;
    let gap = 100_000 * khz / 1000; // re-check every 100 ms
    loop {
        let sum = checksum(base, pages, beat);
        let mut l = Line::new();
        l.s("V").u(cpu).s(" ").u(n).s(if sum == expect { " ok " } else { " BAD " }).x(sum);
        l.send();
        if sum != expect {
            return 1;
        }
        n += 1;
        if spec.count != 0 && n >= spec.count {
            return 0;
        }
        let until = rdtsc() + gap;
        while rdtsc() < until {
            if !beat.poll() {
                core::hint::spin_loop();
            }
        }
    }
}
