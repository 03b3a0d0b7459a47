//! Multiboot (v1) loading, enough for ELF kernels such as Ferry's test guest.
use super::{e820, BootError, Entry};
use crate::memory::{GuestMem, RamRange};
use linux_loader::loader::{Elf, KernelLoader};
use std::io::{Read, Seek};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value in EAX when a multiboot loader enters the kernel.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// Value in EAX when Ferry starts an application processor at the multiboot entry.
pub const AP_MAGIC: u32 = 0x4645_5259;
/// Where Ferry writes the multiboot information structure.
pub const INFO_ADDR: u64 = 0x7000;
const MMAP_ADDR: u64 = 0x7400;
const CMDLINE_ADDR: u64 = 0x20000;
const CMDLINE_MAX: usize = 4095;

/// Offset of a multiboot header (magic + valid checksum, 4-byte aligned) in `head`.
pub fn find_header(head: &[u8]) -> Option<usize> {
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    (0..head.len().saturating_sub(11)).step_by(4).find(|&i| {
        word(i) == HEADER_MAGIC && word(i).wrapping_add(word(i + 4)).wrapping_add(word(i + 8)) == 0
    })
}

/// Loads a multiboot ELF and writes the information structure (memory map and command line).
pub fn load<F: Read + ReadVolatile + Seek>(
    mem: &GuestMem,
    layout: &[RamRange],
    image: &mut F,
    name: &str,
    cmdline: &str,
) -> Result<Entry, BootError> {
    let loaded = Elf::load(mem, None, image, Some(GuestAddress(0x100000))).map_err(|source| {
        BootError::Loader {
            what: name.to_string(),
            source,
        }
    })?;
    let entry = u32::try_from(loaded.kernel_load.0)
        .map_err(|_| BootError::Cmdline(format!("{name}: multiboot entry above 4 GiB")))?;
    if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline(format!(
            "must be at most {CMDLINE_MAX} bytes with no NUL (got {})",
            cmdline.len()
        )));
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_ADDR))?;
    mem.write_slice(&[0], GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))?;
    let map = e820(layout);
    let mut mmap = Vec::new();
    for (base, len, kind) in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    mem.write_slice(&mmap, GuestAddress(MMAP_ADDR))?;
    let low = layout.first().map(|r| r.len).unwrap_or(0);
    let mut info = [0u32; 22];
    info[0] = 1 | (1 << 2) | (1 << 6); // mem_*, cmdline, mmap
    info[1] = 639; // mem_lower (KiB)
    info[2] = (low.saturating_sub(0x100000) / 1024).min(u32::MAX as u64) as u32; // mem_upper
    info[4] = CMDLINE_ADDR as u32;
    info[11] = mmap.len() as u32;
    info[12] = MMAP_ADDR as u32;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(INFO_ADDR))?;
    Ok(Entry::Multiboot32 {
        entry,
        info: INFO_ADDR as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_valid_headers() {
        let mut head = vec![0u8; 64];
        head[8..12].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        head[12..16].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(find_header(&head), None, "bad checksum");
        let ck = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(3);
        head[16..20].copy_from_slice(&ck.to_le_bytes());
        assert_eq!(find_header(&head), Some(8));
    }
}
