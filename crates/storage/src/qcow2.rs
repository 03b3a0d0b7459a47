//! qcow2 images through the `imago` crate (by one of QEMU's block-layer developers): clusters
//! allocated on write, backing files (an overlay reads through to its base), discard and
//! write-zeroes. imago takes no locks itself: the image (for writing, or reading) and its
//! backing file (for reading) are locked here, as QEMU locks them.
use crate::lock::{open_locked, LockMode};
use crate::{in_range, push_extent, Extent, Image, StorageError};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

pub struct Qcow2Image {
    /// Reads and writes share it; discards (which imago wants exclusively) take it alone.
    access: RwLock<FormatAccess<ImagoFile>>,
    size: u64,
    readonly: bool,
    /// Open only for their locks: the image and, when it has one, its backing file.
    _locks: Vec<std::fs::File>,
}

impl Qcow2Image {
    pub fn open(path: &Path, readonly: bool) -> Result<Self, StorageError> {
        let mut locks = vec![open_locked(path, LockMode::of(readonly))?];
        let bad = |why: String| StorageError::Format {
            path: path.to_owned(),
            why,
        };
        let q = Qcow2::<ImagoFile>::builder_path(path)
            .write(!readonly)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(|e| bad(format!("not a usable qcow2 image: {e}")))?;
        if let Some(b) = q.implicit_backing_file() {
            let bp = backing_path(path, b);
            locks.push(open_locked(&bp, LockMode::Read)?);
        }
        let access = FormatAccess::new(q);
        Ok(Qcow2Image {
            size: access.size(),
            access: RwLock::new(access),
            readonly,
            _locks: locks,
        })
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        crate::check_writable(self.readonly, offset, len, self.size)
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<ImagoFile>> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes an empty qcow2 image of `size` bytes (64 KiB clusters, no backing file) into the
/// new, empty file `f` at `path`.
pub(crate) fn format(path: &Path, f: std::fs::File, size: u64) -> Result<(), StorageError> {
    use imago::FormatCreateBuilder;
    let file = ImagoFile::try_from(f).map_err(|e| StorageError::Open {
        path: path.to_owned(),
        err: e,
    })?;
    Qcow2::<ImagoFile>::create_builder(file)
        .size(size)
        .create()
        .map_err(|e| StorageError::Format {
            path: path.to_owned(),
            why: format!("cannot create a qcow2 image: {e}"),
        })
}

/// A backing file name as qcow2 stores it: relative names are relative to the image's
/// directory.
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_owned()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl Image for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        in_range(offset, buf.len() as u64, self.size)?;
        self.read_lock().read(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.writable(offset, buf.len() as u64)?;
        self.read_lock().write(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        if !self.readonly {
            let a = self.read_lock();
            a.flush()?;
            a.sync()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.writable(offset, len)?;
        // Reads back as zeroes (not as the backing file: the guest asked for its data gone).
        let mut a = self.access.write().unwrap_or_else(|e| e.into_inner());
        a.discard_to_zero(offset, len)?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError> {
        self.writable(offset, len)?;
        if unmap {
            let mut a = self.access.write().unwrap_or_else(|e| e.into_inner());
            a.discard_to_zero(offset, len)?;
        } else {
            self.read_lock().write_zeroes(offset, len)?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StorageError> {
        in_range(offset, len, self.size)?;
        let end = offset + len;
        let a = self.read_lock();
        let mut v = Vec::new();
        let mut at = offset;
        while at < end {
            let (m, n) = a.get_mapping(at, end - at)?;
            let data = match m {
                imago::Mapping::Zero { .. } => false,
                imago::Mapping::Eof { .. } => {
                    // Past the last layer's end: zeroes to the disk's end.
                    push_extent(&mut v, at, end - at, false);
                    break;
                }
                // Raw (here or in a backing file) and Special (compressed): data.
                _ => true,
            };
            if n == 0 {
                return Err(std::io::Error::other(format!("qcow2: no mapping at {at:#x}")).into());
            }
            let n = n.min(end - at);
            push_extent(&mut v, at, n, data);
            at += n;
        }
        Ok(v)
    }
}
