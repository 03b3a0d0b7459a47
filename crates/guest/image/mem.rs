//! Guest physical memory: the multiboot memory map, per-vCPU regions, high page tables.
use crate::args;

const MAX_RANGES: usize = 16;
const TWO_MB: u64 = 2 << 20;

extern "C" {
    static mut pd_tables: [u64; 0];
    static __bss_end: u8;
}

pub struct MemoryMap {
    ranges: [(u64, u64); MAX_RANGES],
    n: usize,
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: identity-mapped multiboot structures provided by the loader.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}
fn rd64(addr: u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

impl MemoryMap {
    pub fn from_multiboot(mbi: u64) -> Self {
        let mut m = MemoryMap { ranges: [(0, 0); MAX_RANGES], n: 0 };
        let flags = rd32(mbi);
        if flags & (1 << 6) != 0 {
            let len = rd32(mbi + 44) as u64;
            let mut p = rd32(mbi + 48) as u64;
            let end = p + len;
            while p < end && m.n < MAX_RANGES {
                let size = rd32(p) as u64;
                let (base, length, kind) = (rd64(p + 4), rd64(p + 12), rd32(p + 20));
                if kind == 1 && length > 0 {
                    m.ranges[m.n] = (base, base + length);
                    m.n += 1;
                }
                p += size + 4;
            }
        } else if flags & 1 != 0 {
            m.ranges[0] = (0, rd32(mbi + 4) as u64 * 1024);
            m.ranges[1] = (1 << 20, (1 << 20) + rd32(mbi + 8) as u64 * 1024);
            m.n = 2;
        }
        m
    }

    /// Usable RAM in bytes, rounded up to a MiB (firmware may reserve a few KiB).
    pub fn total(&self) -> u64 {
        let sum: u64 = self.ranges[..self.n].iter().map(|r| r.1 - r.0).sum();
        sum.div_ceil(1 << 20) << 20
    }

    /// Base address of vCPU `cpu`'s workload region: regions of vCPUs 0..=cpu are laid out in
    /// order, each 2 MiB aligned, first fit in usable RAM above the guest image.
    pub fn region_for(&self, cmdline: &str, cpu: u64) -> Result<u64, &'static str> {
        // SAFETY: only the address of a linker symbol is taken.
        let image_end = unsafe { core::ptr::addr_of!(__bss_end) } as u64;
        let mut ri = 0;
        let mut cursor = 0u64;
        let mut base = 0;
        for c in 0..=cpu {
            let size = args::region_size(&args::spec_for_cpu(cmdline, c)?);
            loop {
                if ri >= self.n {
                    return Err("not enough guest memory for the workload");
                }
                let (start, end) = self.ranges[ri];
                let b = cursor.max(start).max(image_end).next_multiple_of(TWO_MB);
                if b + size <= end {
                    base = b;
                    cursor = b + size;
                    break;
                }
                ri += 1;
            }
        }
        map_identity(base, args::region_size(&args::spec_for_cpu(cmdline, cpu)?));
        Ok(base)
    }
}

/// Ensures [base, base+len) is identity mapped. The boot code maps the first 4 GiB; above that,
/// 2 MiB entries are written here (tables are user-writable; never-present entries are not
/// cached by the TLB, so no invalidation is needed).
fn map_identity(base: u64, len: u64) {
    let first = base / TWO_MB;
    let last = (base + len).div_ceil(TWO_MB).min(512 * 512);
    // SAFETY: pd_tables is the boot code's 512-page PD array, identity mapped and user-writable.
    let pd = unsafe { core::ptr::addr_of_mut!(pd_tables) } as *mut u64;
    for k in first.max(2048)..last {
        // SAFETY: k < 512 * 512 entries.
        unsafe { core::ptr::write_volatile(pd.add(k as usize), (k * TWO_MB) | 0x87) };
    }
}

/// The multiboot command line (flag bit 2), or "" when absent or not UTF-8.
pub fn cmdline(mbi: u64) -> &'static str {
    if rd32(mbi) & (1 << 2) == 0 {
        return "";
    }
    let p = rd32(mbi + 16) as u64 as *const u8;
    let mut n = 0;
    // SAFETY: a NUL-terminated string placed by the loader; bounded at 4 KiB.
    unsafe {
        while n < 4096 && *p.add(n) != 0 {
            n += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(p, n)).unwrap_or("")
    }
}
