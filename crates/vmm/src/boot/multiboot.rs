//! Multiboot (v1) loading, following the contract QEMU's `-kernel` and GRUB follow:
//! * a header with flag bit 16 (address fields) is loaded by those fields, whatever the file
//!   is (flat binary or ELF): `[load_addr, load_end_addr)` from the file, zero up to
//!   `bss_end_addr`, entered at `entry_addr` — how Ferry's test guest is loaded too;
//! * otherwise the file must be an ELF: a 32-bit one (the usual kind of multiboot kernel) is
//!   loaded by its program headers at their physical addresses, entered at `e_entry` (moved
//!   from virtual to physical when it lies in a segment loaded elsewhere); Ferry also takes
//!   a 64-bit ELF (linux-loader), which QEMU refuses;
//! * the kernel starts in 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the
//!   information structure, and ESP on a usable stack below it (a kernel that calls before
//!   setting up its own stack works, as it does under GRUB and QEMU).
use super::{e820, BootError, Entry};
use crate::memory::{GuestMem, RamRange};
use linux_loader::loader::{Elf, KernelLoader};
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{Bytes, GuestAddress};

const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Header flag: the address fields are valid (the "a.out kludge").
const FLAG_ADDRESSES: u32 = 1 << 16;
/// Value in EAX when a multiboot loader enters the kernel.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// Value in EAX when Ferry starts an application processor at the multiboot entry.
pub const AP_MAGIC: u32 = 0x4645_5259;
/// Where Ferry writes the multiboot information structure.
pub const INFO_ADDR: u64 = 0x7000;
/// ESP at entry: the stack grows down from the information structure (conventional memory).
pub const BOOT_STACK: u32 = INFO_ADDR as u32;
const MMAP_ADDR: u64 = 0x7400;
const CMDLINE_ADDR: u64 = 0x20000;
const CMDLINE_MAX: usize = 4095;
/// Largest image read whole (a 32-bit ELF or a flat image).
const MAX_IMAGE: u64 = 1 << 30;

/// Offset of a multiboot header (magic + valid checksum, 4-byte aligned) in `head`.
pub fn find_header(head: &[u8]) -> Option<usize> {
    (0..head.len().saturating_sub(11)).step_by(4).find(|&i| {
        word(head, i) == HEADER_MAGIC
            && word(head, i)
                .wrapping_add(word(head, i + 4))
                .wrapping_add(word(head, i + 8))
                == 0
    })
}

fn word(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// True when the header at `at` has valid address fields (loadable whatever the file is).
pub fn has_addresses(head: &[u8], at: usize) -> bool {
    head.len() >= at + 32 && word(head, at + 4) & FLAG_ADDRESSES != 0
}

fn bad(name: &str, what: impl std::fmt::Display) -> BootError {
    BootError::Multiboot(format!("{name}: {what}"))
}

/// Reads the whole image (bounded).
fn read_all<F: Read + Seek>(image: &mut F, name: &str) -> Result<Vec<u8>, BootError> {
    let io = |source| BootError::Io {
        what: name.to_string(),
        source,
    };
    let len = image.seek(SeekFrom::End(0)).map_err(io)?;
    if len > MAX_IMAGE {
        return Err(bad(name, format!("image of {len} bytes is too large")));
    }
    image.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut v = Vec::with_capacity(len as usize);
    image.read_to_end(&mut v).map_err(io)?;
    Ok(v)
}

/// Loads by the header's address fields; returns the entry.
fn load_by_header(mem: &GuestMem, file: &[u8], at: usize, name: &str) -> Result<u32, BootError> {
    let (header_addr, load_addr) = (word(file, at + 12), word(file, at + 16));
    let (load_end, bss_end, entry) = (
        word(file, at + 20),
        word(file, at + 24),
        word(file, at + 28),
    );
    if load_addr > header_addr {
        return Err(bad(name, "multiboot load_addr is above header_addr"));
    }
    let start = (at as u64)
        .checked_sub((header_addr - load_addr) as u64)
        .ok_or_else(|| {
            bad(
                name,
                "multiboot header_addr and load_addr do not fit the file",
            )
        })?;
    let end = if load_end == 0 {
        file.len() as u64
    } else {
        if load_end < load_addr {
            return Err(bad(name, "multiboot load_end_addr is below load_addr"));
        }
        start + (load_end - load_addr) as u64
    };
    let bytes = file
        .get(start as usize..end as usize)
        .ok_or_else(|| bad(name, "multiboot load range runs past the end of the file"))?;
    mem.write_slice(bytes, GuestAddress(load_addr as u64))?;
    let loaded_end = load_addr as u64 + bytes.len() as u64;
    if bss_end != 0 && (bss_end as u64) > loaded_end {
        zero(mem, loaded_end, bss_end as u64 - loaded_end)?;
    }
    Ok(entry)
}

fn zero(mem: &GuestMem, gpa: u64, len: u64) -> Result<(), BootError> {
    let z = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(z.len() as u64);
        mem.write_slice(&z[..n as usize], GuestAddress(gpa + done))?;
        done += n;
    }
    Ok(())
}

/// Loads a 32-bit ELF by its program headers (physical addresses); returns the entry.
fn load_elf32(mem: &GuestMem, f: &[u8], name: &str) -> Result<u32, BootError> {
    let half = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
    if f.len() < 52 || f[5] != 1 {
        return Err(bad(name, "not a little-endian 32-bit ELF"));
    }
    if half(0x12) != 3 {
        return Err(bad(name, format!("ELF machine {} is not i386", half(0x12))));
    }
    let (entry, phoff) = (word(f, 0x18), word(f, 0x1c) as usize);
    let (phentsize, phnum) = (half(0x2a) as usize, half(0x2c) as usize);
    if phentsize < 32 || phoff.saturating_add(phentsize.saturating_mul(phnum)) > f.len() {
        return Err(bad(
            name,
            "ELF program headers run past the end of the file",
        ));
    }
    let mut physical_entry = None;
    let mut loaded = 0;
    for i in 0..phnum {
        let h = phoff + i * phentsize;
        if word(f, h) != 1 {
            continue; // not PT_LOAD
        }
        let (off, vaddr, paddr) = (word(f, h + 4), word(f, h + 8), word(f, h + 12));
        let (filesz, memsz) = (word(f, h + 16), word(f, h + 20));
        if filesz > memsz {
            return Err(bad(
                name,
                format!("segment {i}: file size above memory size"),
            ));
        }
        let data = f
            .get(off as usize..off as usize + filesz as usize)
            .ok_or_else(|| bad(name, format!("segment {i} runs past the end of the file")))?;
        mem.write_slice(data, GuestAddress(paddr as u64))
            .map_err(|e| bad(name, format!("segment {i} at {paddr:#x}: {e}")))?;
        zero(mem, paddr as u64 + filesz as u64, (memsz - filesz) as u64)?;
        if entry >= vaddr && entry - vaddr < memsz.max(1) {
            physical_entry.get_or_insert(entry - vaddr + paddr);
        }
        loaded += 1;
    }
    if loaded == 0 {
        return Err(bad(name, "ELF has no loadable segment"));
    }
    Ok(physical_entry.unwrap_or(entry))
}

/// Loads a multiboot kernel and writes the information structure (memory map and command
/// line).
pub fn load<F: Read + Seek>(
    mem: &GuestMem,
    layout: &[RamRange],
    image: &mut F,
    name: &str,
    cmdline: &str,
) -> Result<Entry, BootError> {
    let file = read_all(image, name)?;
    let head = &file[..file.len().min(8192)];
    let at = find_header(head).ok_or_else(|| bad(name, "no multiboot header"))?;
    let entry = if has_addresses(head, at) {
        load_by_header(mem, &file, at, name)?
    } else if file.starts_with(b"\x7fELF") && file.get(4) == Some(&1) {
        load_elf32(mem, &file, name)?
    } else if file.starts_with(b"\x7fELF") {
        // The image is in memory already: linux-loader reads it from there, not the file.
        let mut bytes = std::io::Cursor::new(file.as_slice());
        let loaded =
            Elf::load(mem, None, &mut bytes, Some(GuestAddress(0x100000))).map_err(|source| {
                BootError::Loader {
                    what: name.to_string(),
                    source,
                }
            })?;
        u32::try_from(loaded.kernel_load.0).map_err(|_| bad(name, "multiboot entry above 4 GiB"))?
    } else {
        return Err(bad(
            name,
            "multiboot header without address fields (flag 16) in a file that is not ELF",
        ));
    };
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
