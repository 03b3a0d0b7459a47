//! The core of storage live migration: an image that copies itself to a target while the
//! guest keeps writing it, and mirrors those writes so the copy converges at any write rate.
//!
//! A [`Mirror`] stands in for the source image. One bulk copy walks the disk once, from the
//! start to the end, behind a cursor: below it everything has reached the target. Every
//! guest write that lands below the cursor goes to the target too before it completes (an
//! active mirror, as VMware's mirror driver and QEMU's `copy-mode=write-blocking` do); a
//! write above it only goes to the source, and the bulk copy carries it over when it gets
//! there. A lock makes each copy step and each guest write atomic with respect to each
//! other, so no write is ever overtaken by an older copy of its block: when the cursor
//! reaches the end, the target equals the source, and stays equal, with no dirty pass and no
//! dependence on how fast the guest writes. Holes and zero clusters (see
//! [`Image::extents`]) are skipped: the target starts as all zeroes.
//!
//! The source stays the authority: a failure of the target (a write error, a lost link) is
//! recorded and ends the mirroring, never a guest request; the source has every write.
use crate::{Extent, Image, StorageError};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a mirror copies to: an image on this host, or a migration stream to another.
/// It starts as all zeroes.
pub trait Sink: Send {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError>;
    /// The range reads back as zeroes (a discard or write-zeroes on the source).
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), StorageError>;
}

/// An image as a mirror's target (a disk move on one host).
pub struct ImageSink(pub Arc<dyn Image>);

impl Sink for ImageSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.0.write_at(data, offset)?;
        self.0.start_writeback(offset, data.len() as u64);
        Ok(())
    }
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.0.write_zeroes(offset, len, true)
    }
}

/// How far a mirror has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Disk size in bytes.
    pub size: u64,
    /// Everything below this offset is on the target.
    pub cursor: u64,
    /// Bytes of data the bulk copy read and sent (holes are not counted: they are skipped).
    pub copied: u64,
    /// Bytes of guest writes sent to the target (writes below the cursor).
    pub mirrored: u64,
}

impl Progress {
    pub fn done(&self) -> bool {
        self.cursor >= self.size
    }
}

struct State {
    sink: Box<dyn Sink>,
    progress: Progress,
    /// The target failed: nothing more goes to it.
    failed: Option<String>,
}

/// The source image, mirrored to a sink (see the module's documentation).
pub struct Mirror {
    source: Arc<dyn Image>,
    state: Mutex<State>,
}

/// How much of the disk's allocation map one copy step looks at, at most.
const LOOKAHEAD: u64 = 1 << 30;

impl Mirror {
    pub fn new(source: Arc<dyn Image>, sink: Box<dyn Sink>) -> Mirror {
        let size = source.size();
        Mirror {
            source,
            state: Mutex::new(State {
                sink,
                progress: Progress {
                    size,
                    ..Progress::default()
                },
                failed: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image being mirrored.
    pub fn source(&self) -> &Arc<dyn Image> {
        &self.source
    }

    pub fn progress(&self) -> Progress {
        self.lock().progress
    }

    /// Why the target failed, if it did.
    pub fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// One step of the bulk copy: up to `max` bytes of data past the cursor (and any holes
    /// before and between them) go to the target, through `buf`. Returns the progress after.
    pub fn copy_step(&self, max: usize, buf: &mut Vec<u8>) -> Result<Progress, StorageError> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(StorageError::Io(std::io::Error::other(why.clone())));
        }
        let Progress { size, cursor, .. } = st.progress;
        if cursor >= size {
            return Ok(st.progress);
        }
        let map = self
            .source
            .extents(cursor, (size - cursor).min(LOOKAHEAD))?;
        let mut budget = max as u64;
        for Extent { offset, len, data } in map {
            if !data {
                st.progress.cursor = offset + len;
                continue;
            }
            let n = len.min(budget);
            buf.resize(n as usize, 0);
            self.source.read_at(buf, offset)?;
            if let Err(e) = st.sink.write(offset, buf) {
                st.failed = Some(format!("copy to the target at {offset}: {e}"));
                return Err(e);
            }
            st.progress.copied += n;
            st.progress.cursor = offset + n;
            budget -= n;
            if budget == 0 {
                break;
            }
        }
        Ok(st.progress)
    }

    /// Runs `on_source` and, for the part of `[offset, offset + len)` below the cursor,
    /// `on_sink`, under the lock. A sink error is recorded, not returned.
    fn both(
        &self,
        offset: u64,
        len: u64,
        on_source: impl FnOnce() -> Result<(), StorageError>,
        on_sink: impl FnOnce(&mut dyn Sink, u64) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut st = self.lock();
        on_source()?;
        let below = st.progress.cursor.saturating_sub(offset).min(len);
        if below > 0 && st.failed.is_none() {
            match on_sink(st.sink.as_mut(), below) {
                Ok(()) => st.progress.mirrored += below,
                Err(e) => st.failed = Some(format!("mirrored write at {offset}: {e}")),
            }
        }
        Ok(())
    }
}

impl Image for Mirror {
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn readonly(&self) -> bool {
        self.source.readonly()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.source.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.both(
            offset,
            buf.len() as u64,
            || self.source.write_at(buf, offset),
            |s, n| s.write(offset, &buf[..n as usize]),
        )
    }
    /// The source's flush: until the pivot the source is the disk; whoever pivots flushes
    /// the target first.
    fn flush(&self) -> Result<(), StorageError> {
        self.source.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.both(
            offset,
            len,
            || self.source.discard(offset, len),
            |s, n| s.zero(offset, n),
        )
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError> {
        self.both(
            offset,
            len,
            || self.source.write_zeroes(offset, len, unmap),
            |s, n| s.zero(offset, n),
        )
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StorageError> {
        self.source.extents(offset, len)
    }
    fn sector_size(&self) -> u32 {
        self.source.sector_size()
    }
}
