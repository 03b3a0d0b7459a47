//! Image locks: open file description (OFD) locks, which belong to the open file (not the
//! process, unlike POSIX record locks), are released when it closes, and conflict across
//! processes — the kind QEMU takes on its images. A writer locks the whole file for writing,
//! a reader for reading, so a writer excludes everyone (QEMU included: its own locks on
//! bytes 100+ and 200+ conflict) and readers exclude writers.
use std::fs::File;
use std::os::fd::AsRawFd;

/// How an image is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Read,
    Write,
}

/// Takes the lock without waiting. `Err(Some(mode))` names the lock that is in the way,
/// `Err(None)` is returned with the OS error for anything else.
pub fn lock_file(f: &File, mode: LockMode) -> Result<(), Result<&'static str, std::io::Error>> {
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
