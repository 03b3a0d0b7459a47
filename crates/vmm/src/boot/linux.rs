//! Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst): bzImage or ELF vmlinux,
//! zero page with e820 map, command line, initrd; the kernel is entered in long mode.
use super::{e820, BootError, Entry};
use crate::memory::{GuestMem, RamRange};
use linux_loader::bootparam::boot_params;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use std::fs::File;
use vm_memory::{Bytes, GuestAddress};

/// Zero page (struct boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Command line capacity, including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// bzImage protected-mode code is loaded here (as by GRUB); 64-bit entry is 0x200 beyond.
const KERNEL_START: u64 = 0x100000;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// Kernel, initrd and command line to boot.
pub struct LinuxBoot<'a> {
    pub kernel: &'a mut File,
    pub kernel_name: &'a str,
    pub bzimage: bool,
    pub initrd: Option<(&'a mut File, &'a str)>,
    pub cmdline: &'a str,
}

pub fn load(mem: &GuestMem, layout: &[RamRange], b: LinuxBoot<'_>) -> Result<Entry, BootError> {
    let loader_err = |what: &str| {
        let what = what.to_string();
        move |source| BootError::Loader { what, source }
    };
    let (entry, kernel_end, mut hdr) = if b.bzimage {
        let r = BzImage::load(mem, Some(GuestAddress(KERNEL_START)), b.kernel, None)
            .map_err(loader_err(b.kernel_name))?;
        let hdr = r.setup_header.unwrap_or_default();
        (r.kernel_load.0 + 0x200, r.kernel_end, hdr)
    } else {
        let r = Elf::load(mem, None, b.kernel, Some(GuestAddress(KERNEL_START)))
            .map_err(loader_err(b.kernel_name))?;
        (r.kernel_load.0, r.kernel_end, Default::default())
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(b.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = b.cmdline.len() as u32 + 1;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    let low_end = layout.first().map(|r| r.start + r.len).unwrap_or(0);
    if let Some((file, name)) = b.initrd {
        let io = |source| BootError::Io {
            what: name.to_string(),
            source,
        };
        let size = file.metadata().map_err(io)?.len();
        // Highest page-aligned place below the limit the kernel accepts, above the kernel.
        let max = if hdr.initrd_addr_max != 0 {
            hdr.initrd_addr_max as u64 + 1
        } else {
            0x8000_0000
        };
        let limit = low_end.min(max);
        let addr = limit.checked_sub(size).map(|a| a & !0xfff);
        let addr = match addr {
            Some(a) if a >= kernel_end && size <= u32::MAX as u64 => a,
            _ => return Err(BootError::InitrdTooLarge { size, limit }),
        };
        mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
            .map_err(BootError::Memory)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820(layout);
    for (i, (addr, size, kind)) in map.iter().take(E820_MAX).enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len().min(E820_MAX) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Cmdline(format!("writing the zero page: {e}")))?;
    super::cpu::write_boot_tables(mem)?;
    Ok(Entry::Linux64 {
        entry,
        boot_params: ZERO_PAGE,
    })
}

/// Reads back what the kernel will see (for tests).
pub fn read_cmdline(mem: &GuestMem) -> Result<String, BootError> {
    let mut buf = vec![0u8; CMDLINE_MAX];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))?;
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
