//! Disk images (raw; qcow2 through imago; VHDX, Ferry's own) behind one trait, [`Image`]: what a virtual disk needs of its backing file
//! (positional reads and writes, flush, discard, write-zeroes), and nothing of virtio or KVM.
//!
//! Guarantees:
//! - An image is locked while it is open (open file description locks, as QEMU takes them):
//!   a writable image excludes every other opener, from any process; a read-only image
//!   excludes writers. A second opener gets [`StorageError::Locked`], never a shared image.
//! - A write is acknowledged (`Ok`) only once the host file holds it; `flush` makes every
//!   acknowledged write durable (`fdatasync`).
//! - Out-of-range requests are refused with [`StorageError::OutOfRange`] before any I/O.
pub mod fence;
mod lock;
pub mod mirror;
mod qcow2;
mod raw;
pub mod vhdx;

pub use lock::{open_locked, LockMode};
pub use qcow2::Qcow2Image;
pub use raw::RawImage;
pub use vhdx::{VhdxImage, VhdxOptions};

use std::path::{Path, PathBuf};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{}: {err}", path.display())]
    Open { path: PathBuf, err: std::io::Error },
    #[error(
        "{} is in use by another process (locked for {held}); stop that VM or open the \
         image read-only",
        path.display()
    )]
    Locked { path: PathBuf, held: &'static str },
    #[error("{}: {why}", path.display())]
    Format { path: PathBuf, why: String },
    #[error("request of {len} bytes at {offset} lies outside the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the image is read-only")]
    ReadOnly,
    #[error("the image is released (the VM is paused for a hand-over to another host)")]
    Released,
    /// The VMM's right to write has lapsed (its host's lease deadline passed): issue #13's
    /// fencing ([`fence`]).
    #[error("write refused: this VMM is fenced (its ownership, epoch {epoch}, may have passed to another host)")]
    Fenced { epoch: i64 },
    /// A higher ownership epoch was accepted for the disk: another owner has it.
    #[error("{}: owned by epoch {stored}, this VMM holds only epoch {mine}: another host owns the disk now", path.display())]
    StaleEpoch {
        path: PathBuf,
        stored: i64,
        mine: i64,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Disk image formats Ferry opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Vhdx,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vhdx" => Ok(Format::Vhdx),
            other => Err(format!(
                "unknown disk format {other:?} (known: raw, qcow2, vhdx)"
            )),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhdx => "vhdx",
        })
    }
}

/// A virtual disk's backing store. Offsets and lengths are in bytes.
pub trait Image: Send + Sync {
    /// Size the guest sees, in bytes.
    fn size(&self) -> u64;
    fn readonly(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError>;
    /// Writes `buf` at `offset`; Ok once the host file holds it.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> Result<(), StorageError>;
    /// The range's contents no longer matter (it reads back as zeroes here).
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError>;
    /// The range reads back as zeroes; `unmap` lets the image free the space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError>;
    /// What `[offset, offset + len)` holds as the guest sees it, in order and covering the
    /// range: extents of data and extents that read as zeroes (a raw file's holes; qcow2's
    /// unallocated clusters with no backing data and its zero clusters). Copying the data
    /// extents copies the disk; how fine the map is depends on the format (file system
    /// blocks, clusters), and a data extent may still hold zeroes.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StorageError>;
    /// Starts writing `[offset, offset + len)` back to the storage device without waiting
    /// (a hint: a bulk copy's later `flush` then has little left to do). Durability still
    /// needs `flush`.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    /// The logical sector size the disk presents (512, or 4096 for a 4K-native VHDX).
    fn sector_size(&self) -> u32 {
        512
    }
}

/// A run of an image (see [`Image::extents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// False: the run reads as zeroes and need not be copied.
    pub data: bool,
}

/// Appends a run to `v`, merging it with the last one when they touch and are alike.
pub(crate) fn push_extent(v: &mut Vec<Extent>, offset: u64, len: u64, data: bool) {
    if len == 0 {
        return;
    }
    if let Some(l) = v.last_mut() {
        if l.data == data && l.offset + l.len == offset {
            l.len += len;
            return;
        }
    }
    v.push(Extent { offset, len, data });
}

/// Creates a new, empty (all zeroes, nothing allocated) image of `size` bytes at `path` and
/// opens it locked for writing. An existing file is never overwritten: that is an error.
/// On any failure after the file was made, the file is removed again.
pub fn create(path: &Path, format: Format, size: u64) -> Result<Box<dyn Image>, StorageError> {
    match format {
        Format::Vhdx => create_vhdx(path, &VhdxOptions::dynamic(size)),
        _ => create_file(path, format, |f| match format {
            Format::Qcow2 => qcow2::format(path, f, size),
            _ => Ok(f.set_len(size)?),
        }),
    }
}

/// [`create`] for a copy of a disk whose guest sees `sector`-byte logical sectors: a VHDX
/// gets the same; raw and qcow2 have only 512, so another size is refused.
pub fn create_for(
    path: &Path,
    format: Format,
    size: u64,
    sector: u32,
) -> Result<Box<dyn Image>, StorageError> {
    match (format, sector) {
        (_, 512) => create(path, format, size),
        (Format::Vhdx, _) => create_vhdx(
            path,
            &VhdxOptions {
                logical_sector: sector,
                ..VhdxOptions::dynamic(size)
            },
        ),
        _ => Err(StorageError::Format {
            path: path.to_owned(),
            why: format!(
                "the disk has {sector}-byte sectors and {format} images only 512-byte ones: \
                 keep it vhdx"
            ),
        }),
    }
}

/// [`create`] for a VHDX image with these options (fixed, 4 KiB sectors, block size).
pub fn create_vhdx(path: &Path, o: &VhdxOptions) -> Result<Box<dyn Image>, StorageError> {
    create_file(path, Format::Vhdx, |f| {
        vhdx::format(&f, o).map_err(|why| StorageError::Format {
            path: path.to_owned(),
            why: format!("cannot create a VHDX image: {why}"),
        })
    })
}

/// Makes `path` (never overwriting), lets `init` lay out an empty image in it, opens it;
/// removes the file again on any failure.
fn create_file(
    path: &Path,
    format: Format,
    init: impl FnOnce(std::fs::File) -> Result<(), StorageError>,
) -> Result<Box<dyn Image>, StorageError> {
    let err = |err| StorageError::Open {
        path: path.to_owned(),
        err,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let made = init(f).and_then(|()| open(path, format, false));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Opens `path` as `format`, locked for writing unless `readonly`. In a process with a fence
/// installed ([`fence::install`]: a VMM run by a cluster agent) a writable image is fenced
/// ([`fence::FencedImage`]): opening it accepts the fence's epoch for the disk.
pub fn open(path: &Path, format: Format, readonly: bool) -> Result<Box<dyn Image>, StorageError> {
    let img: Box<dyn Image> = match format {
        Format::Raw => Box::new(RawImage::open(path, readonly)?),
        Format::Qcow2 => Box::new(Qcow2Image::open(path, readonly)?),
        Format::Vhdx => Box::new(VhdxImage::open(path, readonly)?),
    };
    match fence::installed() {
        Some(f) if !readonly => Ok(Box::new(fence::FencedImage::new(img, path, f)?)),
        _ => Ok(img),
    }
}

/// Checks a request that changes the image: writable, and within its size.
pub(crate) fn check_writable(
    readonly: bool,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), StorageError> {
    if readonly {
        return Err(StorageError::ReadOnly);
    }
    in_range(offset, len, size)
}

/// Checks a request against the image size.
pub(crate) fn in_range(offset: u64, len: u64, size: u64) -> Result<(), StorageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StorageError::OutOfRange { offset, len, size }),
    }
}
