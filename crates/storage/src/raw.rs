//! Raw images: the file is the disk, byte for byte. Holes stay holes: discard punches one,
//! write-zeroes with unmap punches one, without unmap zeroes the range in place.
use crate::lock::{open_locked, LockMode};
use crate::{in_range, push_extent, Extent, Image, StorageError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
}

impl RawImage {
    /// Opens and locks `path` (for reading only when `readonly`).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, StorageError> {
        let file = open_locked(path, LockMode::of(readonly))?;
        let size = file
            .metadata()
            .map_err(|err| StorageError::Open {
                path: path.to_owned(),
                err,
            })?
            .len();
        Ok(RawImage {
            file,
            path: path.to_owned(),
            size,
            readonly,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        crate::check_writable(self.readonly, offset, len, self.size)
    }
}

impl Image for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        in_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.writable(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        if !self.readonly {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        zero_range(&self.file, offset, len, unmap)?;
        Ok(())
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        start_writeback(&self.file, offset, len);
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StorageError> {
        in_range(offset, len, self.size)?;
        let mut v = Vec::new();
        push_file_extents(&self.file, &mut v, offset, len, offset)?;
        Ok(v)
    }
}

/// `lseek(SEEK_DATA | SEEK_HOLE)` from `at`: the next such offset, None when there is no
/// more data (ENXIO).
fn lseek(file: &File, at: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: plain syscall on an open fd; the file position it moves is unused (all I/O
    // here is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open fd; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes file bytes `[offset, offset + len)` read as zeroes: a hole punched when `punch`,
/// else zeroed in place (still allocated); written out when the file system can do neither.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
    let mode = if punch {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    if len == 0 || fallocate(file, mode, offset, len).is_ok() {
        return Ok(());
    }
    let zero = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zero.len() as u64) as usize;
        file.write_all_at(&zero[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Appends to `v` the data and hole runs of file bytes `[at, at + len)`, as runs of the
/// disk starting at `disk` (where those file bytes sit in the disk).
pub(crate) fn push_file_extents(
    file: &File,
    v: &mut Vec<Extent>,
    at: u64,
    len: u64,
    disk: u64,
) -> std::io::Result<()> {
    let end = at + len;
    let mut pos = at;
    while pos < end {
        let data = lseek(file, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        push_extent(v, disk + (pos - at), data - pos, false);
        if data >= end {
            break;
        }
        let hole = lseek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        push_extent(v, disk + (data - at), hole - data, true);
        pos = hole;
    }
    Ok(())
}

/// Starts writing file bytes `[offset, offset + len)` back without waiting (a hint).
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an open fd; no memory is passed. A failure only means the
    // later flush does all the work.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
