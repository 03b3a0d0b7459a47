//! Image locks: open file description (OFD) locks, which belong to the open file (not the
//! process, unlike POSIX record locks), are released when it closes, and conflict across
//! processes — the kind QEMU takes on its images. A writer locks the whole file for writing,
//! a reader for reading, so a writer excludes everyone (QEMU included: its own locks on
//! bytes 100+ and 200+ conflict) and readers exclude writers.
use crate::StorageError;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// How an image is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Read,
    Write,
}

impl LockMode {
    /// Read for a read-only image, else write.
    pub fn of(readonly: bool) -> LockMode {
        if readonly {
            LockMode::Read
        } else {
            LockMode::Write
        }
    }
}

/// Opens `path` — for writing too when `mode` is [`LockMode::Write`] (a write lock needs a
/// descriptor open for writing) — checks it is a regular file, and locks it without waiting.
pub fn open_locked(path: &Path, mode: LockMode) -> Result<File, StorageError> {
    let err = |err| StorageError::Open {
        path: path.to_owned(),
        err,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(mode == LockMode::Write)
        .open(path)
        .map_err(err)?;
    if !f.metadata().map_err(err)?.is_file() {
        return Err(StorageError::Format {
            path: path.to_owned(),
            why: "not a regular file".into(),
        });
    }
    // A fenced VMM (a cluster's) shares its writable images with the next owner's VMM, which
    // may open them while this one, fenced, still runs: the ownership epoch decides who may
    // write (crate::fence). A writer that is not fenced still excludes, and is excluded by,
    // everyone.
    let lock = if mode == LockMode::Write && crate::fence::installed().is_some() {
        LockMode::Read
    } else {
        mode
    };
    match lock_file(&f, lock) {
        Ok(()) => Ok(f),
        Err(Ok(held)) => Err(StorageError::Locked {
            path: path.to_owned(),
            held,
        }),
        Err(Err(e)) => Err(err(e)),
    }
}

/// Takes the lock without waiting. `Err(Ok(held))` names the lock that is in the way,
/// `Err(Err(e))` is any other OS error.
fn lock_file(f: &File, mode: LockMode) -> Result<(), Result<&'static str, std::io::Error>> {
    let ty = match mode {
        LockMode::Read => libc::F_RDLCK,
        LockMode::Write => libc::F_WRLCK,
    };
    let mut fl = flock_whole(ty);
    // SAFETY: `fl` is a valid, initialised flock for the duration of the call and the fd is
    // open (borrowed from `f`).
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        return Err(Err(e));
    }
    // Who holds it: ask for the conflicting lock.
    let mut probe = flock_whole(libc::F_WRLCK);
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    let held = if r == 0 && i32::from(probe.l_type) == libc::F_RDLCK {
        "reading"
    } else {
        "writing"
    };
    Err(Ok(held))
}

fn flock_whole(ty: i32) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (then filled in).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however long it grows
    fl
}
