//! A delaying wire: every frame that arrives on one interface leaves on the other a fixed
//! delay later, in order, through a bounded queue per direction (full: the frame is dropped,
//! as a router's tail drop would). It stands in for netem's delay, which this kernel lacks, so
//! migrations over the test topology's WAN link see a real round-trip time
//! (`scripts/netlab.sh`). Frames are read and written with AF_PACKET sockets bound to each
//! interface in promiscuous mode; frames the wire itself sent out are skipped
//! (`PACKET_OUTGOING`). Offloads must be off on both interfaces and on the two that send into
//! them (GRO/GSO/TSO would hand it frames larger than the MTU; with TX checksum offload a veth
//! leaves TCP and UDP checksums unfilled, and the frames carried on would be dropped as
//! corrupt — ping worked, TCP did not): netlab.sh turns them off with ethtool.
use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("interface {name}: {why}")]
    Interface { name: String, why: std::io::Error },
    #[error("starting a wire thread: {0}")]
    Thread(std::io::Error),
}

/// Longest frame read (offloads off: the MTU plus the Ethernet header; room for jumbo).
const FRAME: usize = 65536;

/// One side of the wire: an AF_PACKET socket bound to an interface.
pub struct Leg {
    fd: OwnedFd,
    name: String,
}

fn iface_err(name: &str) -> impl Fn(std::io::Error) -> WireError + '_ {
    move |why| WireError::Interface {
        name: name.to_string(),
        why,
    }
}

impl Leg {
    /// Opens interface `name` for the wire (promiscuous, every protocol).
    pub fn open(name: &str) -> Result<Leg, WireError> {
        let err = iface_err(name);
        let (fd, ifindex) = packet_socket(name, libc::SOCK_RAW, libc::ETH_P_ALL as u16)?;
        let mreq = libc::packet_mreq {
            mr_ifindex: ifindex as i32,
            mr_type: libc::PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq).map_err(&err)?;
        Ok(Leg {
            fd,
            name: name.to_string(),
        })
    }

    /// The next frame that arrived on the interface (not one sent out through it): its
    /// length; None when none came within the read timeout.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            // SAFETY: an all-zero sockaddr_ll is valid for recvfrom to fill.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `sll` are valid for writes of the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        return Ok(None)
                    }
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(n as usize));
        }
    }

    /// Sends `frame` out through the interface (on a tap: to its reader, the VM).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An AF_PACKET socket of `kind` (`SOCK_RAW`: whole frames; `SOCK_DGRAM`: payloads) for
/// ethertype `proto` (`ETH_P_ALL`: every one), bound to interface `name`, reads timing out
/// every 100 ms; with the interface's index.
pub fn packet_socket(name: &str, kind: i32, proto: u16) -> Result<(OwnedFd, u32), WireError> {
    let err = iface_err(name);
    let c = CString::new(name).map_err(|_| err(std::io::Error::other("a name with a NUL byte")))?;
    // SAFETY: a NUL-terminated string that lives across the call.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let proto = proto.to_be();
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_PACKET, kind | libc::SOCK_CLOEXEC, proto as i32) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a socket just opened and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) with a sockaddr_ll of its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // Readers wake up this often to see whether they were stopped.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv).map_err(&err)?;
    Ok((fd, ifindex))
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, v: &T) -> std::io::Result<()> {
    // SAFETY: `v` is a valid T for the option, passed with its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Added to every frame, each way.
    pub delay: Duration,
    /// Frames held per direction at most; more are dropped.
    pub queue: usize,
}

/// Frames carried and dropped (queue full, or the send failed), both directions together.
#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

type Queue = (Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar);

/// A running wire; dropping it stops its threads.
pub struct Wire {
    stop: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Wire {
    /// Starts carrying frames between interfaces `a` and `b`.
    pub fn start(a: &str, b: &str, cfg: Config) -> Result<Wire, WireError> {
        let (a, b) = (Arc::new(Leg::open(a)?), Arc::new(Leg::open(b)?));
        let mut w = Wire {
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::default(),
            threads: Vec::new(),
        };
        for (from, to) in [(a.clone(), b.clone()), (b, a)] {
            let q: Arc<Queue> = Arc::default();
            let name = format!("wire-{}", from.name);
            let (stop, stats, q2) = (w.stop.clone(), w.stats.clone(), q.clone());
            w.threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || read_side(&from, &q2, cfg, &stop, &stats))
                    .map_err(WireError::Thread)?,
            );
            let (stop, stats) = (w.stop.clone(), w.stats.clone());
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-out"))
                    .spawn(move || write_side(&to, &q, &stop, &stats))
                    .map_err(WireError::Thread)?,
            );
        }
        Ok(w)
    }

    /// Blocks until the wire stops (a leg failed).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_side(from: &Leg, q: &Queue, cfg: Config, stop: &AtomicBool, stats: &Stats) {
    let mut buf = vec![0u8; FRAME];
    while !stop.load(Ordering::SeqCst) {
        match from.recv(&mut buf) {
            Ok(Some(n)) => {
                let due = Instant::now() + cfg.delay;
                let mut g = q.0.lock().unwrap_or_else(|e| e.into_inner());
                if g.len() >= cfg.queue {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                g.push_back((due, buf[..n].to_vec()));
                q.1.notify_one();
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("ferry-wire: reading {}: {e}; stopping", from.name);
                break;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    q.1.notify_all();
}

fn write_side(to: &Leg, q: &Queue, stop: &AtomicBool, stats: &Stats) {
    let mut g = q.0.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(Ordering::SeqCst) {
        let Some(&(due, _)) = g.front() else {
            g =
                q.1.wait_timeout(g, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            continue;
        };
        let now = Instant::now();
        if due > now {
            g =
                q.1.wait_timeout(g, due - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            continue;
        }
        let Some((_, frame)) = g.pop_front() else {
            continue;
        };
        drop(g);
        match to.send(&frame) {
            Ok(()) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
            Err(_) => stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
        g = q.0.lock().unwrap_or_else(|e| e.into_inner());
    }
}
