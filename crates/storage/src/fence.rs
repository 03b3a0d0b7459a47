//! Fencing a disk on shared storage (issue #13): the guard that keeps a VMM whose host lost
//! its cluster membership from writing a disk that another host now owns.
//!
//! Two checks, enforced here, below any VMM:
//! - **Epoch.** Beside each disk `FILE` lies `FILE.epoch`: the highest ownership epoch (the
//!   cluster store revision that made the current owner) any VMM has presented for it.
//!   [`accept_epoch`] raises it and refuses a lower epoch with [`StorageError::StaleEpoch`]
//!   (under an exclusive `flock`, written and fsynced before it returns). A [`FencedImage`]
//!   re-reads it at every flush and refuses the flush (and every write after) once a higher
//!   epoch is there: a stale owner can never have a flush acknowledged after the new owner
//!   opened the disk.
//! - **Deadline.** A [`Fence`] holds a deadline on the host's monotonic clock (the agent's
//!   last acknowledged lease renewal + TTL − margin); every write, discard, write-zeroes and
//!   flush checks it first and is refused with [`StorageError::Fenced`] past it, counted in
//!   [`Fence::refused`]. A takeover waits until the old owner's lease has expired plus a
//!   grace, which is after this deadline.
//!
//! The window left: a write whose deadline check passed just before the deadline and whose
//! thread was then descheduled (or its whole process stopped) across the takeover can still
//! reach the file. docs/cluster.md states this precisely.
use crate::{Extent, Image, StorageError};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// The host's monotonic clock (`CLOCK_MONOTONIC`) in nanoseconds: the same clock in every
/// process of a host, so an agent can hand its deadline to its VMMs as a number.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The sidecar file that keeps a disk's highest accepted epoch.
pub fn epoch_path(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".epoch");
    PathBuf::from(p)
}

fn open_sidecar(path: &Path) -> Result<std::fs::File, StorageError> {
    let open_err = |err| StorageError::Open {
        path: path.to_path_buf(),
        err,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(open_err)?;
    // SAFETY: flock on a descriptor this function owns; it blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    Ok(f)
}

fn read_epoch(path: &Path, f: &mut std::fs::File) -> Result<i64, StorageError> {
    let mut s = String::new();
    f.seek(std::io::SeekFrom::Start(0))?;
    f.read_to_string(&mut s)?;
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    s.parse().map_err(|_| StorageError::Format {
        path: path.to_path_buf(),
        why: format!("epoch file holds {s:?}, not a number: refusing to guess the owner"),
    })
}

/// The highest epoch accepted for `disk` (0 when none was).
pub fn current_epoch(disk: &Path) -> Result<i64, StorageError> {
    let path = epoch_path(disk);
    match std::fs::File::open(&path) {
        Ok(mut f) => read_epoch(&path, &mut f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(StorageError::Open { path, err }),
    }
}

/// Records that the owner with `epoch` writes `disk` from now on; refused when a higher epoch
/// was accepted already. Returns the epoch that was there before. Durable when it returns.
pub fn accept_epoch(disk: &Path, epoch: i64) -> Result<i64, StorageError> {
    let path = epoch_path(disk);
    let mut f = open_sidecar(&path)?;
    let stored = read_epoch(&path, &mut f)?;
    if stored > epoch {
        return Err(StorageError::StaleEpoch {
            path: disk.to_path_buf(),
            stored,
            mine: epoch,
        });
    }
    if stored < epoch {
        f.set_len(0)?;
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(format!("{epoch}\n").as_bytes())?;
        f.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(stored)
}

/// A VMM's right to write its disks: an epoch and a deadline, shared by all its disks.
#[derive(Debug)]
pub struct Fence {
    epoch: AtomicI64,
    /// On [`monotonic_ns`]; `u64::MAX`: none.
    deadline_ns: AtomicU64,
    refused: AtomicU64,
    /// The writable disks open under this fence (their paths, once per open image).
    disks: std::sync::Mutex<Vec<PathBuf>>,
}

impl Fence {
    pub fn new(epoch: i64, deadline_ns: Option<u64>) -> Arc<Fence> {
        Arc::new(Fence {
            epoch: AtomicI64::new(epoch),
            deadline_ns: AtomicU64::new(deadline_ns.unwrap_or(u64::MAX)),
            refused: AtomicU64::new(0),
            disks: Default::default(),
        })
    }

    /// Ownership handed over to this VMM at `epoch` (a live migration's switch-over): every
    /// writable disk open under this fence accepts it, then the fence carries it. Refused
    /// (nothing changed for that disk and the fence keeps its epoch) if a disk already holds
    /// a higher one.
    pub fn hand_over(&self, epoch: i64) -> Result<(), StorageError> {
        let disks = self.disks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for d in &disks {
            accept_epoch(d, epoch)?;
        }
        self.set_epoch(epoch);
        Ok(())
    }

    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A new epoch (ownership handed over to this VMM by a migration): accept it for the
    /// disks first ([`accept_epoch`]).
    pub fn set_epoch(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Moves the deadline (the agent renewed its lease).
    pub fn set_deadline(&self, deadline_ns: u64) {
        self.deadline_ns.store(deadline_ns, Ordering::SeqCst);
    }

    pub fn deadline_ns(&self) -> Option<u64> {
        Some(self.deadline_ns.load(Ordering::SeqCst)).filter(|&d| d != u64::MAX)
    }

    /// The deadline has passed.
    pub fn expired(&self) -> bool {
        monotonic_ns() >= self.deadline_ns.load(Ordering::SeqCst)
    }

    /// Writes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    fn refuse(&self, e: StorageError) -> StorageError {
        self.refused.fetch_add(1, Ordering::SeqCst);
        e
    }

    /// Ok while the deadline holds; otherwise counts a refused write.
    pub fn check(&self) -> Result<(), StorageError> {
        if self.expired() {
            return Err(self.refuse(StorageError::Fenced {
                epoch: self.epoch(),
            }));
        }
        Ok(())
    }
}

static PROCESS_FENCE: std::sync::OnceLock<Arc<Fence>> = std::sync::OnceLock::new();

/// Fences every writable image this process opens from now on with `fence` (a VMM has one
/// owner and one fence). Refused once one is installed.
pub fn install(fence: Arc<Fence>) -> Result<(), Arc<Fence>> {
    PROCESS_FENCE.set(fence)
}

/// The process's fence, if one is installed.
pub fn installed() -> Option<Arc<Fence>> {
    PROCESS_FENCE.get().cloned()
}

/// An image whose writes are fenced (see the module's documentation).
pub struct FencedImage {
    inner: Box<dyn Image>,
    fence: Arc<Fence>,
    disk: PathBuf,
}

impl FencedImage {
    /// Accepts the fence's epoch for `disk` (refused if a higher one is there) and wraps
    /// `inner`, the image opened from `disk`.
    pub fn new(
        inner: Box<dyn Image>,
        disk: &Path,
        fence: Arc<Fence>,
    ) -> Result<FencedImage, StorageError> {
        if !inner.readonly() {
            accept_epoch(disk, fence.epoch())?;
            fence
                .disks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(disk.to_path_buf());
        }
        Ok(FencedImage {
            inner,
            fence,
            disk: disk.to_path_buf(),
        })
    }

    fn write_ok(&self) -> Result<(), StorageError> {
        self.fence.check()
    }
}

impl Drop for FencedImage {
    fn drop(&mut self) {
        if !self.inner.readonly() {
            let mut d = self.fence.disks.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = d.iter().position(|p| *p == self.disk) {
                d.remove(i);
            }
        }
    }
}

impl Image for FencedImage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn readonly(&self) -> bool {
        self.inner.readonly()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.write_ok()?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.write_ok()?;
        if !self.inner.readonly() {
            let stored = current_epoch(&self.disk)?;
            if stored > self.fence.epoch() {
                // Another owner opened the disk: from now on nothing of ours is durable.
                self.fence.set_deadline(0);
                return Err(self.fence.refuse(StorageError::StaleEpoch {
                    path: self.disk.clone(),
                    stored,
                    mine: self.fence.epoch(),
                }));
            }
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.write_ok()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError> {
        self.write_ok()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StorageError> {
        self.inner.extents(offset, len)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len)
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &Path) -> (PathBuf, Box<dyn Image>) {
        let p = dir.join("d.raw");
        let img = crate::create(&p, crate::Format::Raw, 1 << 20).unwrap();
        (p, img)
    }

    #[test]
    fn a_hand_over_raises_every_open_disk_and_the_fence() {
        let d = tempfile::tempdir().unwrap();
        let (p, img) = raw(d.path());
        let q = d.path().join("e.raw");
        let img2 = crate::create(&q, crate::Format::Raw, 1 << 20).unwrap();
        let f = Fence::new(4, None);
        let a = FencedImage::new(img, &p, f.clone()).unwrap();
        let b = FencedImage::new(img2, &q, f.clone()).unwrap();
        f.hand_over(6).unwrap();
        assert_eq!(f.epoch(), 6);
        assert_eq!(
            (current_epoch(&p).unwrap(), current_epoch(&q).unwrap()),
            (6, 6)
        );
        a.write_at(&[1; 512], 0).unwrap();
        a.flush().unwrap();
        // A disk closed is no longer the fence's; one taken by a higher epoch refuses it.
        drop(b);
        accept_epoch(&p, 9).unwrap();
        assert!(f.hand_over(7).is_err());
        assert_eq!(f.epoch(), 6);
        assert_eq!(current_epoch(&q).unwrap(), 6, "a closed disk was touched");
    }

    #[test]
    fn epochs_only_rise() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        assert_eq!(current_epoch(&p).unwrap(), 0);
        assert_eq!(accept_epoch(&p, 5).unwrap(), 0);
        assert_eq!(accept_epoch(&p, 5).unwrap(), 5, "the same owner again");
        assert_eq!(accept_epoch(&p, 9).unwrap(), 5);
        match accept_epoch(&p, 7) {
            Err(StorageError::StaleEpoch { stored, mine, .. }) => {
                assert_eq!((stored, mine), (9, 7))
            }
            r => panic!("a lower epoch was accepted: {r:?}"),
        }
        assert_eq!(current_epoch(&p).unwrap(), 9);
        assert_eq!(std::fs::read_to_string(epoch_path(&p)).unwrap().trim(), "9");
    }

    #[test]
    fn a_damaged_epoch_file_is_an_error_not_zero() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        std::fs::write(epoch_path(&p), "garbage").unwrap();
        assert!(matches!(
            accept_epoch(&p, 100),
            Err(StorageError::Format { .. })
        ));
        assert!(current_epoch(&p).is_err());
    }

    #[test]
    fn racing_owners_leave_the_highest_epoch() {
        let d = tempfile::tempdir().unwrap();
        let p = Arc::new(d.path().join("disk.raw"));
        let ts: Vec<_> = (1..=16)
            .map(|e| {
                let p = p.clone();
                std::thread::spawn(move || accept_epoch(&p, e).is_ok())
            })
            .collect();
        let ok: Vec<bool> = ts.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(ok[15], "the highest epoch is always accepted");
        assert_eq!(current_epoch(&p).unwrap(), 16);
    }

    #[test]
    fn past_the_deadline_writes_are_refused_and_counted_reads_are_not() {
        let d = tempfile::tempdir().unwrap();
        let (p, img) = raw(d.path());
        let fence = Fence::new(3, Some(monotonic_ns() + 60_000_000_000));
        let img = FencedImage::new(img, &p, fence.clone()).unwrap();
        img.write_at(&[7; 512], 0).unwrap();
        img.flush().unwrap();
        fence.set_deadline(monotonic_ns());
        assert!(matches!(
            img.write_at(&[9; 512], 0),
            Err(StorageError::Fenced { epoch: 3 })
        ));
        assert!(img.write_zeroes(0, 512, false).is_err());
        assert!(img.discard(0, 512).is_err());
        assert!(img.flush().is_err());
        assert_eq!(fence.refused(), 4);
        let mut b = [0; 512];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 512], "the refused writes did not reach the file");
        // Renewed: writes flow again.
        fence.set_deadline(monotonic_ns() + 60_000_000_000);
        img.write_at(&[8; 512], 0).unwrap();
    }

    #[test]
    fn a_new_owner_stops_the_old_ones_flushes_and_writes() {
        let d = tempfile::tempdir().unwrap();
        let (p, img) = raw(d.path());
        let old = Fence::new(10, None);
        let img = FencedImage::new(img, &p, old.clone()).unwrap();
        img.write_at(&[1; 512], 0).unwrap();
        img.flush().unwrap();
        // Another host takes the disk over with a higher epoch.
        accept_epoch(&p, 11).unwrap();
        assert!(matches!(
            img.flush(),
            Err(StorageError::StaleEpoch {
                stored: 11,
                mine: 10,
                ..
            })
        ));
        assert!(img.write_at(&[2; 512], 0).is_err(), "fenced for good");
        assert_eq!(old.refused(), 2);
        // And the old owner cannot open it again.
        drop(img);
        let again = crate::open(&p, crate::Format::Raw, false).unwrap();
        assert!(matches!(
            FencedImage::new(again, &p, Fence::new(10, None)),
            Err(StorageError::StaleEpoch { .. })
        ));
    }

    #[test]
    fn read_only_openers_do_not_take_the_disk() {
        let d = tempfile::tempdir().unwrap();
        let (p, img) = raw(d.path());
        drop(img);
        let ro = crate::open(&p, crate::Format::Raw, true).unwrap();
        FencedImage::new(ro, &p, Fence::new(50, None)).unwrap();
        assert_eq!(current_epoch(&p).unwrap(), 0);
    }
}
