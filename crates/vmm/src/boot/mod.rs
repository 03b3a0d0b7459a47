//! Boot loaders: what goes into guest memory before the first instruction, and the register
//! state every vCPU starts with.
//!
//! * multiboot (v1) ELF images — Ferry's test guest, entered in 32-bit protected mode exactly
//!   as QEMU's `-kernel` does (BSP: EAX=0x2BADB002, EBX=info); application processors are
//!   started directly at the same entry with EAX=0x46455259 ("FERY") and ECX=index. The BSP
//!   also gets ESI = "FERY" and EDX = the number of vCPUs started.
//! * Linux bzImage or ELF vmlinux via the x86 64-bit boot protocol (zero page, e820, command
//!   line, initrd), see `linux.rs`.
pub mod cpu;
pub mod linux;
pub mod multiboot;

use crate::memory::{GuestMem, RamRange};
use crate::vm::BootSource;
use std::io::{Read, Seek, SeekFrom};

/// The state vCPUs start in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 32-bit protected mode, paging off (multiboot).
    Multiboot32 { entry: u32, info: u32 },
    /// 64-bit long mode with identity paging (Linux 64-bit boot protocol).
    Linux64 { entry: u64, boot_params: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}: not a kernel image Ferry can boot (expected a Linux bzImage, an ELF vmlinux or a multiboot ELF)")]
    UnknownFormat(String),
    #[error("{what}: {source}")]
    Loader {
        what: String,
        source: linux_loader::loader::Error,
    },
    #[error("multiboot: {0}")]
    Multiboot(String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("guest memory write failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What kind of image a file is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Multiboot,
    BzImage,
    Elf,
}

/// Identifies an image: a valid multiboot header in the first 8 KiB wins (as in QEMU), then
/// the bzImage "HdrS" signature, then ELF.
pub fn detect<R: Read + Seek>(f: &mut R, name: &str) -> Result<ImageKind, BootError> {
    let io = |source| BootError::Io {
        what: name.to_string(),
        source,
    };
    let mut head = vec![0u8; 8192];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(io)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if let Some(at) = multiboot::find_header(&head) {
        // As QEMU: a header with address fields boots whatever the file is; without them
        // the file must be an ELF.
        if head.starts_with(b"\x7fELF") || multiboot::has_addresses(&head, at) {
            return Ok(ImageKind::Multiboot);
        }
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(ImageKind::BzImage);
    }
    if head.starts_with(b"\x7fELF") {
        return Ok(ImageKind::Elf);
    }
    Err(BootError::UnknownFormat(name.to_string()))
}

/// e820-style map of the VM's RAM (type 1 = usable), shared by multiboot and Linux.
pub(crate) fn e820(layout: &[RamRange]) -> Vec<(u64, u64, u32)> {
    let mut v = Vec::new();
    for r in layout {
        if r.start == 0 {
            // Conventional memory, then the legacy VGA/BIOS hole, then the rest.
            v.push((0, 0x9fc00, 1));
            v.push((0x9fc00, 0x400, 2));
            v.push((0xf0000, 0x10000, 2));
            if r.len > 0x100000 {
                v.push((0x100000, r.len - 0x100000, 1));
            }
        } else {
            v.push((r.start, r.len, 1));
        }
    }
    v
}

/// Loads what `boot` names; a Linux kernel's command line gets `linux_extra` appended (the
/// virtio-mmio devices it is to find).
pub(crate) fn load_source(
    mem: &GuestMem,
    layout: &[RamRange],
    boot: &BootSource,
    linux_extra: &[String],
) -> Result<Entry, BootError> {
    match boot {
        BootSource::TestGuest { args } => {
            let mut img = std::io::Cursor::new(ferry_guest_image());
            multiboot::load(mem, layout, &mut img, "test guest", args)
        }
        BootSource::Kernel {
            path,
            initrd,
            cmdline,
        } => {
            let name = path.display().to_string();
            let io = |what: &str| {
                let what = what.to_string();
                move |source| BootError::Io { what, source }
            };
            let mut f = std::fs::File::open(path).map_err(io(&name))?;
            let kind = detect(&mut f, &name)?;
            if kind == ImageKind::Multiboot {
                if initrd.is_some() {
                    return Err(BootError::Cmdline(
                        "--initrd is for Linux kernels, not multiboot images".into(),
                    ));
                }
                return multiboot::load(mem, layout, &mut f, &name, cmdline);
            }
            let iname = initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let mut ifile = match initrd {
                Some(p) => Some(std::fs::File::open(p).map_err(io(&iname))?),
                None => None,
            };
            let mut words = vec![cmdline.as_str()];
            words.extend(linux_extra.iter().map(String::as_str));
            let cmdline = words.join(" ");
            let b = linux::LinuxBoot {
                kernel: &mut f,
                kernel_name: &name,
                bzimage: kind == ImageKind::BzImage,
                initrd: ifile.as_mut().map(|f| (f, iname.as_str())),
                cmdline: cmdline.trim(),
            };
            linux::load(mem, layout, b)
        }
    }
}

fn ferry_guest_image() -> &'static [u8] {
    crate::TEST_GUEST_IMAGE
}
