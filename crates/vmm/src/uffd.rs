//! Guest RAM whose missing pages are filled from user space on demand (userfaultfd): the
//! mechanism post-copy migration stands on (issue "Post-copy"). Every RAM range is registered
//! for missing-page faults; a fault thread waits for [`MissingPages::next_fault`], fetches the
//! page from wherever it lives and installs it with [`MissingPages::install`] (or
//! [`MissingPages::install_zero`]), which wakes the faulting thread. Faults taken by KVM on a
//! vCPU's behalf arrive here too (registration is not limited to user-mode faults), so a vCPU
//! touching a missing page waits inside KVM_RUN until the page is installed.
use crate::memory::GuestMem;
use std::os::fd::AsRawFd;
use std::time::Duration;
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd: {0}")]
    Create(userfaultfd::Error),
    #[error("registering guest RAM with userfaultfd: {0}")]
    Register(userfaultfd::Error),
    #[error("reading a userfaultfd event: {0}")]
    Read(userfaultfd::Error),
    #[error("waiting for userfaultfd: {0}")]
    Poll(std::io::Error),
    #[error("installing page {gpa:#x}: {source}")]
    Install {
        gpa: u64,
        source: userfaultfd::Error,
    },
    #[error("page {0:#x} is not guest RAM")]
    NotRam(u64),
    #[error("a run of {len} bytes at {gpa:#x} is not 1..=64 whole pages")]
    BadRun { gpa: u64, len: usize },
    #[error("fault at host address {0:#x}, outside guest RAM")]
    Outside(u64),
}

/// One RAM range: guest address, host address, length.
#[derive(Debug, Clone, Copy)]
struct Range {
    gpa: u64,
    host: u64,
    len: u64,
}

/// Guest RAM registered for missing-page faults; unregistered when dropped.
pub struct MissingPages {
    uffd: Uffd,
    ranges: Vec<Range>,
}

impl MissingPages {
    /// Registers every RAM range of `mem`. Pages already present stay as they are; only
    /// missing ones fault from now on.
    pub fn register(mem: &GuestMem) -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        let ranges: Vec<Range> = mem
            .iter()
            .map(|r| Range {
                gpa: r.start_addr().0,
                host: r.as_ptr() as u64,
                len: r.len(),
            })
            .collect();
        for r in &ranges {
            uffd.register(r.host as *mut libc::c_void, r.len as usize)
                .map_err(UffdError::Register)?;
        }
        Ok(MissingPages { uffd, ranges })
    }

    fn host(&self, gpa: u64) -> Result<u64, UffdError> {
        self.ranges
            .iter()
            .find(|r| gpa >= r.gpa && gpa + PAGE <= r.gpa + r.len)
            .map(|r| r.host + (gpa - r.gpa))
            .ok_or(UffdError::NotRam(gpa))
    }

    /// The next page some thread (a vCPU inside KVM, or the VMM) is waiting for, as a guest
    /// page address; None when none arrived within `timeout`.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        let mut p = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Poll(e));
        }
        if n == 0 {
            return Ok(None);
        }
        match self.uffd.read_event().map_err(UffdError::Read)? {
            Some(Event::Pagefault { addr, .. }) => {
                let host = addr as u64 & !(PAGE - 1);
                let r = self
                    .ranges
                    .iter()
                    .find(|r| host >= r.host && host < r.host + r.len)
                    .ok_or(UffdError::Outside(host))?;
                Ok(Some(r.gpa + (host - r.host)))
            }
            // Only missing-page faults are registered for; other events need no answer.
            Some(_) | None => Ok(None),
        }
    }

    /// Installs `page` (4 KiB) at `gpa` and wakes whoever waits for it. False when the page
    /// was already there (installed by someone else first); its contents are left alone.
    pub fn install(&self, gpa: u64, page: &[u8]) -> Result<bool, UffdError> {
        let host = self.host(gpa)?;
        let page = &page[..PAGE as usize];
        // SAFETY: `host` is the start of a page inside a registered RAM range (checked by
        // `host`), and `page` is 4 KiB of readable memory; UFFDIO_COPY copies it atomically
        // into the missing page or fails with EEXIST when the page is present.
        let r = unsafe {
            self.uffd.copy(
                page.as_ptr() as *const libc::c_void,
                host as *mut libc::c_void,
                PAGE as usize,
                true,
            )
        };
        match r {
            Ok(_) => Ok(true),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                self.wake(host);
                Ok(false)
            }
            Err(source) => Err(UffdError::Install { gpa, source }),
        }
    }

    /// Installs up to 64 consecutive pages from `gpa` (`data` is a whole number of pages), one
    /// ioctl for the run where it can, and wakes their waiters. Returns a mask of the pages
    /// installed by this call (bit k: page k); pages already present are left alone.
    pub fn install_run(&self, gpa: u64, data: &[u8]) -> Result<u64, UffdError> {
        let n = data.len() as u64 / PAGE;
        if n == 0 || n > 64 || data.len() as u64 != n * PAGE {
            return Err(UffdError::BadRun {
                gpa,
                len: data.len(),
            });
        }
        let host = self.host(gpa)?;
        self.host(gpa + (n - 1) * PAGE)?;
        let mut mask = 0u64;
        let mut k = 0u64;
        while k < n {
            let (src, dst) = (&data[(k * PAGE) as usize..], host + k * PAGE);
            // SAFETY: [dst, dst + (n - k) pages) lies inside one registered RAM range (both
            // ends checked by `host`), `src` holds that many readable bytes; UFFDIO_COPY copies
            // page by page into missing pages and stops at the first present one.
            let r = unsafe {
                self.uffd.copy(
                    src.as_ptr() as *const libc::c_void,
                    dst as *mut libc::c_void,
                    ((n - k) * PAGE) as usize,
                    true,
                )
            };
            let done = match r {
                Ok(b) => b as u64 / PAGE,
                Err(userfaultfd::Error::PartiallyCopied(b)) => b as u64 / PAGE,
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    // Page k is present (pulled on demand first): skip it.
                    self.wake(dst);
                    k += 1;
                    continue;
                }
                Err(source) => {
                    return Err(UffdError::Install {
                        gpa: gpa + k * PAGE,
                        source,
                    })
                }
            };
            for j in k..k + done {
                mask |= 1 << j;
            }
            k += done.max(1);
        }
        Ok(mask)
    }

    /// Installs a zero page at `gpa` (a page the guest never wrote); false when present.
    pub fn install_zero(&self, gpa: u64) -> Result<bool, UffdError> {
        let host = self.host(gpa)?;
        // SAFETY: as in `install`: a page inside a registered range; UFFDIO_ZEROPAGE maps a
        // zero page there or fails with EEXIST.
        let r = unsafe {
            self.uffd
                .zeropage(host as *mut libc::c_void, PAGE as usize, true)
        };
        match r {
            Ok(_) => Ok(true),
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                self.wake(host);
                Ok(false)
            }
            Err(source) => Err(UffdError::Install { gpa, source }),
        }
    }

    /// A page that raced in before us: whoever faulted on it may still wait for a wake.
    fn wake(&self, host: u64) {
        let _ = self.uffd.wake(host as *mut libc::c_void, PAGE as usize);
    }
}

impl Drop for MissingPages {
    fn drop(&mut self) {
        for r in &self.ranges {
            let _ = self
                .uffd
                .unregister(r.host as *mut libc::c_void, r.len as usize);
        }
    }
}
