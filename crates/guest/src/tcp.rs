//! Host side of the test guest's `tcp` workload: one TCP connection to its request/response
//! port (8) carrying a request line `N` every period; the guest answers `N R`, R its own reply
//! counter. [`TcpProbe`] checks, as it reads, that the connection never broke, that every
//! reply came in order (N = 0, 1, 2, ...) and that R went up by one each time, and keeps the
//! largest interval between two replies: the stall a user of the VM saw on an open
//! connection. It can run inside a network namespace (a client on another "site").
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a [`TcpProbe`] saw.
#[derive(Debug, Clone, Default)]
pub struct TcpStats {
    pub sent: u64,
    pub received: u64,
    /// Largest interval between two consecutive replies (from the first request for the
    /// first), and when the reply that ended it arrived (since the probe started).
    pub max_gap: Duration,
    pub max_gap_at: Duration,
    /// The guest's reply counter in the first and the last reply.
    pub first_counter: Option<u64>,
    pub last_counter: Option<u64>,
    /// The first thing that went wrong: the connection failed or closed, a reply out of
    /// order, a counter that skipped, a malformed line.
    pub error: Option<String>,
}

impl TcpStats {
    /// Nothing went wrong and every request sent was answered.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(format!(
                "{e} (after {} replies of {} requests)",
                self.received, self.sent
            ));
        }
        if self.received != self.sent {
            return Err(format!(
                "{} replies to {} requests",
                self.received, self.sent
            ));
        }
        Ok(())
    }
}

/// The connection and its checker threads; [`TcpProbe::stop`] ends them.
pub struct TcpProbe {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<TcpStats>>,
    stream: TcpStream,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Moves the calling thread into network namespace `name` (`ip netns add` made it).
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace file we opened; it changes only this thread's network
    // namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to `target` from network namespace `netns` (or this one), on a thread of its own
/// so the caller's namespace is untouched.
fn connect(
    target: SocketAddr,
    netns: Option<&str>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let ns = netns.map(String::from);
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            enter_netns(&ns)?;
        }
        TcpStream::connect_timeout(&target, timeout)
    })
    .join()
    .map_err(|_| std::io::Error::other("connect thread panicked"))?
}

impl TcpProbe {
    /// Connects (from `netns` if given) and sends a request every `period` until stopped.
    pub fn start(
        target: SocketAddr,
        netns: Option<&str>,
        period: Duration,
    ) -> std::io::Result<TcpProbe> {
        let stream = connect(target, netns, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(TcpStats::default()));
        let t0 = Instant::now();
        let fail = |stats: &Mutex<TcpStats>, e: String| {
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            s.error.get_or_insert(e);
        };
        let mut w = stream.try_clone()?;
        let (s, st) = (stop.clone(), stats.clone());
        let sender = std::thread::Builder::new()
            .name("tcp-probe-send".into())
            .spawn(move || {
                let mut next = Instant::now();
                let mut n = 0u64;
                while !s.load(Ordering::SeqCst) {
                    if let Err(e) = w.write_all(format!("{n}\n").as_bytes()) {
                        fail(&st, format!("sending request {n}: {e}"));
                        return;
                    }
                    n += 1;
                    st.lock().unwrap_or_else(|p| p.into_inner()).sent = n;
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })?;
        let r = stream.try_clone()?;
        let st = stats.clone();
        let reader = std::thread::Builder::new()
            .name("tcp-probe-recv".into())
            .spawn(move || {
                let mut lines = BufReader::new(r);
                let mut last = None::<Instant>;
                let mut line = String::new();
                loop {
                    line.clear();
                    match lines.read_line(&mut line) {
                        Ok(0) => {
                            fail(&st, "the connection was closed".into());
                            return;
                        }
                        Err(e) => {
                            fail(&st, format!("reading a reply: {e}"));
                            return;
                        }
                        Ok(_) => {}
                    }
                    let now = Instant::now();
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    let mut words = line.split_ascii_whitespace().map(|w| w.parse::<u64>());
                    let (Some(Ok(n)), Some(Ok(c)), None) =
                        (words.next(), words.next(), words.next())
                    else {
                        s.error.get_or_insert(format!("malformed reply {line:?}"));
                        return;
                    };
                    if n != s.received {
                        let due = s.received;
                        s.error
                            .get_or_insert(format!("reply to request {n} where {due} was due"));
                        return;
                    }
                    if let Some(prev) = s.last_counter {
                        if c != prev + 1 {
                            s.error.get_or_insert(format!(
                                "guest reply counter jumped from {prev} to {c}"
                            ));
                            return;
                        }
                    }
                    let gap = now - last.unwrap_or(t0);
                    if gap > s.max_gap {
                        s.max_gap = gap;
                        s.max_gap_at = now - t0;
                    }
                    last = Some(now);
                    s.first_counter.get_or_insert(c);
                    s.last_counter = Some(c);
                    s.received += 1;
                }
            })?;
        Ok(TcpProbe {
            stop,
            stats,
            stream,
            threads: vec![sender, reader],
        })
    }

    /// What was seen so far.
    pub fn stats(&self) -> TcpStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops sending, waits up to `drain` for the replies still due, closes the connection
    /// and returns what was seen.
    pub fn stop(mut self, drain: Duration) -> TcpStats {
        self.stop.store(true, Ordering::SeqCst);
        if !self.threads.is_empty() {
            let _ = self.threads.remove(0).join(); // the sender
        }
        let until = Instant::now() + drain;
        while Instant::now() < until {
            let s = self.stats();
            if s.received >= s.sent || s.error.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = self.stats();
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        s
    }
}

/// Sends `data` to the guest's echo port (7) and reads it back; the round trip's time.
pub fn echo_once(
    target: SocketAddr,
    netns: Option<&str>,
    data: &[u8],
) -> std::io::Result<Duration> {
    let mut s = connect(target, netns, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let t0 = Instant::now();
    s.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    std::io::Read::read_exact(&mut s, &mut back)?;
    if back != data {
        return Err(std::io::Error::other("the echo differs from what was sent"));
    }
    Ok(t0.elapsed())
}
