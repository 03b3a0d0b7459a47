//! A tap device as a network backend: `/dev/net/tun` attached to an existing tap interface
//! (`ip tuntap add dev NAME mode tap`), frames without the packet-information prefix,
//! non-blocking.
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {0} does not exist (create it first: ip tuntap add dev {0} mode tap)")]
    Missing(String),
    #[error("tap {0}: a name of 1 to 15 characters")]
    Name(String),
    #[error("tap {name} is in use by another process")]
    Busy { name: String },
    #[error("tap {name}: {err}")]
    Open { name: String, err: std::io::Error },
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(TapError::Name(name.into()));
        }
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(TapError::Missing(name.into()));
        }
        let open = |err| TapError::Open {
            name: name.into(),
            err,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(open)?;
        // struct ifreq: 16 bytes of name, then the flags (short) in the union.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte ifreq, which `ifr` is; the fd is open.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(TapError::Busy { name: name.into() });
            }
            return Err(open(e));
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Sends one frame; a full queue drops it (as a NIC would).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads one frame if one is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;
