//! Host side of the test guest's `net` workload: a steady stream of UDP echo requests, each
//! with a sequence number, and what came back — the guest appends its own reply counter, so
//! a reply lost after the guest counted it shows as a gap in that counter, and the largest
//! interval between replies is the network gap a user of the VM saw.
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an [`EchoProbe`] saw.
#[derive(Debug, Clone, Default)]
pub struct EchoStats {
    pub sent: u64,
    pub received: u64,
    /// Largest interval between two consecutive replies (or from the first request to the
    /// first reply).
    pub max_gap: Duration,
    /// Guest reply counters in arrival order.
    pub counters: Vec<u64>,
}

impl EchoStats {
    /// The guest's reply counter went up by one from reply to reply: no reply the guest sent
    /// was lost, none repeated.
    pub fn check_counter_continuous(&self) -> Result<(), String> {
        for w in self.counters.windows(2) {
            if w[1] != w[0] + 1 {
                return Err(format!(
                    "guest reply counter jumped from {} to {}",
                    w[0], w[1]
                ));
            }
        }
        Ok(())
    }
}

/// Sends a request every `period` to `target` (the guest's UDP echo port) until stopped.
pub struct EchoProbe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<EchoStats>>,
}

impl EchoProbe {
    pub fn start(target: SocketAddr, period: Duration) -> std::io::Result<EchoProbe> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(period.max(Duration::from_micros(200))))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("echo-probe".into())
            .spawn(move || {
                let mut st = EchoStats::default();
                let (t0, mut last) = (Instant::now(), None::<Instant>);
                let mut next = Instant::now();
                let mut buf = [0u8; 64];
                // After the stop, requests still in flight get up to a second to come back:
                // a reply late under load is not a reply lost.
                let mut drain_until = None::<Instant>;
                loop {
                    let sending = match drain_until {
                        None if s.load(Ordering::SeqCst) => {
                            drain_until = Some(Instant::now() + Duration::from_secs(1));
                            false
                        }
                        None => true,
                        Some(t) => {
                            if st.received >= st.sent || Instant::now() >= t {
                                break;
                            }
                            false
                        }
                    };
                    if sending && Instant::now() >= next {
                        let _ = sock.send_to(&st.sent.to_le_bytes(), target);
                        st.sent += 1;
                        next += period;
                    }
                    if let Ok((n, _)) = sock.recv_from(&mut buf) {
                        if n == 16 {
                            let now = Instant::now();
                            let gap = now - last.unwrap_or(t0);
                            st.max_gap = st.max_gap.max(gap);
                            last = Some(now);
                            st.received += 1;
                            let c = u64::from_le_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
                            st.counters.push(c);
                        }
                    }
                }
                st
            })?;
        Ok(EchoProbe {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sending and returns what was seen, once every request has been answered or a
    /// second has passed since the stop.
    pub fn stop(mut self) -> EchoStats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// A tap on the host for a test VM's NIC, with the host's end of a /24 on it, deleted on drop.
/// The host is `10.<subnet>.<net>.1`, the guest is to take `.2`.
pub struct HostTap {
    pub name: String,
    prefix: String,
}

impl HostTap {
    /// Creates tap `name` (replacing a leftover one of that name) as root, with
    /// `10.subnet.net.1/24` on it, up.
    pub fn create(name: &str, subnet: u8, net: u8) -> Result<HostTap, String> {
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip (iproute2): {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        let _ = ip(&["link", "del", name]);
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let t = HostTap {
            name: name.to_string(),
            prefix: format!("10.{subnet}.{net}"),
        };
        ip(&["addr", "add", &format!("{}.1/24", t.prefix), "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(t)
    }

    /// The address the guest is to take.
    pub fn guest(&self) -> String {
        format!("{}.2", self.prefix)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Watches a host interface (a VM's tap) for frames of one ethertype: each one's arrival
/// time and what `parse` makes of its payload (after the Ethernet header; frames it
/// returns None for are skipped). Root needed (AF_PACKET).
pub struct FrameWatch<T> {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Instant, T)>>>,
}

impl<T: Send + 'static> FrameWatch<T> {
    pub fn start(
        iface: &str,
        ethertype: u16,
        parse: fn(&[u8]) -> Option<T>,
    ) -> Result<FrameWatch<T>, String> {
        use std::os::fd::AsRawFd;
        let (fd, _) = ferry_net::wire::packet_socket(iface, libc::SOCK_DGRAM, ethertype)
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::SeqCst) {
                // SAFETY: `buf` is valid for writes of its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if let Some(t) = usize::try_from(n).ok().and_then(|n| parse(&buf[..n])) {
                    seen.push((Instant::now(), t));
                }
            }
            seen
        });
        Ok(FrameWatch {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops watching: what was seen.
    pub fn stop(mut self) -> Vec<(Instant, T)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// When a RARP arrived, and its sender's MAC.
pub type Rarp = (Instant, [u8; 6]);

/// Watches a host interface for RARP frames, the announcements a VMM sends for a VM after a
/// move (see [`FrameWatch`]).
pub struct RarpWatch(FrameWatch<[u8; 6]>);

impl RarpWatch {
    pub fn start(iface: &str) -> Result<RarpWatch, String> {
        // A RARP payload: htype, ptype, hlen, plen, op, then the sender's MAC.
        FrameWatch::start(iface, 0x8035, |p| p.get(8..14)?.try_into().ok()).map(RarpWatch)
    }

    /// Stops watching: what was seen.
    pub fn stop(self) -> Vec<Rarp> {
        self.0.stop()
    }
}

/// A gratuitous ARP: when it arrived, its sender's MAC and the address it announces.
pub type Garp = (Instant, [u8; 6], [u8; 4]);

/// Watches a host interface for gratuitous ARP requests (sender and target address the
/// same), the announcements a guest sends for itself (see [`FrameWatch`]).
pub struct GarpWatch(FrameWatch<([u8; 6], [u8; 4])>);

impl GarpWatch {
    pub fn start(iface: &str) -> Result<GarpWatch, String> {
        FrameWatch::start(iface, 0x0806, |p| {
            let (op, sha, spa, tpa) = (p.get(6..8)?, p.get(8..14)?, p.get(14..18)?, p.get(24..28)?);
            if op != [0, 1] || spa != tpa {
                return None;
            }
            Some((sha.try_into().ok()?, spa.try_into().ok()?))
        })
        .map(GarpWatch)
    }

    /// Stops watching: what was seen.
    pub fn stop(self) -> Vec<Garp> {
        self.0
            .stop()
            .into_iter()
            .map(|(t, (m, a))| (t, m, a))
            .collect()
    }
}
