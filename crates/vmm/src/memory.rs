//! Guest RAM: layout, allocation (sparse anonymous mappings) and VMM-side dirty tracking.
//!
//! Every write the VMM makes through the [`GuestMem`] API (loaders, devices) sets a bit in the
//! region's [`LazyBitmap`]; [`crate::Vm::fetch_dirty`] merges those bits with KVM's log.
pub use crate::dirty::LazyBitmap;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Guest memory with a dirty bitmap per region for writes made by the VMM.
pub type GuestMem = vm_memory::GuestMemoryMmap<LazyBitmap>;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// RAM below 4 GiB ends here; 3 GiB..4 GiB is left for MMIO (LAPIC, IOAPIC, ...).
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// RAM beyond what fits below [`LOW_RAM_END`] starts here.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Smallest memory size accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest memory size accepted.
pub const MAX_MEMORY: u64 = 512 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {0} is not a whole number of 4 KiB pages")]
    Unaligned(u64),
    #[error("memory size {got} is out of range (16M ..= 512G)")]
    OutOfRange { got: u64 },
    #[error("cannot reserve {size} bytes of guest memory: {source}")]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M, 4G)")]
    BadSize(String),
}

/// Parses `512M`, `4G`, `1048576`, `2T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, MemoryError> {
    let t = s.trim();
    let bad = || MemoryError::BadSize(s.to_string());
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub start: u64,
    pub len: u64,
}

/// The RAM ranges for a VM of `size` bytes: below the 3 GiB hole, then from 4 GiB on.
pub fn ram_layout(size: u64) -> Result<Vec<RamRange>, MemoryError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
        return Err(MemoryError::OutOfRange { got: size });
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::Unaligned(size));
    }
    let low = size.min(LOW_RAM_END);
    let mut v = vec![RamRange { start: 0, len: low }];
    if size > low {
        v.push(RamRange {
            start: HIGH_RAM_START,
            len: size - low,
        });
    }
    Ok(v)
}

/// Reserves sparse anonymous memory (MAP_NORESERVE: host RSS grows only with touched pages).
pub fn allocate(layout: &[RamRange]) -> Result<GuestMem, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .iter()
        .map(|r| (GuestAddress(r.start), r.len as usize))
        .collect();
    GuestMem::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size: layout.iter().map(|r| r.len).sum(),
        source,
    })
}

/// A dirty-page bitmap for one RAM range: bit `i` covers page `start + i * PAGE_SIZE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeBitmap {
    pub start: u64,
    pub pages: u64,
    pub bits: Vec<u64>,
}

/// Dirty pages of the whole guest, one bitmap per RAM range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub ranges: Vec<RangeBitmap>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.ranges
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Guest physical addresses of the dirty pages, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| {
            r.bits.iter().enumerate().flat_map(move |(wi, &w)| {
                let mut w = w;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let b = w.trailing_zeros() as u64;
                    w &= w - 1;
                    Some(r.start + (wi as u64 * 64 + b) * PAGE_SIZE)
                })
            })
        })
    }

    /// True when the page holding `gpa` is dirty.
    pub fn contains(&self, gpa: u64) -> bool {
        self.ranges.iter().any(|r| {
            let end = r.start + r.pages * PAGE_SIZE;
            if gpa < r.start || gpa >= end {
                return false;
            }
            let i = (gpa - r.start) / PAGE_SIZE;
            r.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
        })
    }
}

/// Clears the VMM-side write bitmaps.
pub(crate) fn reset_vmm_dirty(mem: &GuestMem) {
    for r in mem.iter() {
        std::ops::Deref::deref(r).bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(
            ram_layout(1 << 30).unwrap(),
            vec![RamRange {
                start: 0,
                len: 1 << 30
            }]
        );
        let l = ram_layout(8 << 30).unwrap();
        assert_eq!(
            l[0],
            RamRange {
                start: 0,
                len: LOW_RAM_END
            }
        );
        assert_eq!(
            l[1],
            RamRange {
                start: 1 << 32,
                len: (8 << 30) - LOW_RAM_END
            }
        );
        assert!(ram_layout(1 << 20).is_err());
        assert!(ram_layout(513 << 30).is_err());
        assert!(ram_layout((64 << 20) + 1).is_err());
    }

    #[test]
    fn bitmap_iterates_pages() {
        let b = DirtyBitmap {
            ranges: vec![
                RangeBitmap {
                    start: 0,
                    pages: 128,
                    bits: vec![0b101, 1 << 63],
                },
                RangeBitmap {
                    start: 1 << 32,
                    pages: 64,
                    bits: vec![2],
                },
            ],
        };
        let p: Vec<u64> = b.pages().collect();
        assert_eq!(p, vec![0, 2 * 4096, 127 * 4096, (1 << 32) + 4096]);
        assert_eq!(b.count(), 4);
        assert!(b.contains(127 * 4096 + 5));
        assert!(!b.contains(4096));
    }
}
