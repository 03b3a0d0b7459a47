//! The engine against an in-memory fake VM over real loopback TCP: a "guest" that dirties
//! pages deterministically between passes, destination memory compared page by page, and
//! faults: the destination dying, a stream corrupted or cut (control or data connection), a
//! version mismatch, cancel and timeout.
use ferry_migration::engine::{
    migrate, receive, DestinationVm, EngineError, Monitor, Options, Phase, SourceVm, TimeoutPolicy,
};
use ferry_migration::protocol::{send, Compression, Hello, Message, ProtocolError, MAGIC, PAGE};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

/// Source fake: `pages` pages; while running, each `fetch_dirty` first lets the "guest" write
/// `writes_per_pass` pages (a page's content encodes its index and a version), so what must
/// arrive is known exactly.
struct FakeSource {
    mem: Mutex<Vec<u8>>,
    dirty: Mutex<BTreeSet<u64>>,
    logging: AtomicBool,
    paused: AtomicBool,
    pauses: AtomicU64,
    version: AtomicU64,
    writes_per_pass: u64,
    /// Throttle the engine asked for (percent); the guest writes that much less.
    throttle: std::sync::atomic::AtomicU8,
}

fn fill(page: &mut [u8], index: u64, version: u64) {
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((index << 32) ^ (version << 12) ^ i as u64 ^ 0x5a5a).to_le_bytes());
    }
}

impl FakeSource {
    fn new(pages: u64, writes_per_pass: u64) -> Self {
        let mut mem = vec![0u8; (pages as usize) * PAGE];
        // Every third page touched at start; the rest stay zero.
        for p in (0..pages).step_by(3) {
            fill(&mut mem[p as usize * PAGE..(p as usize + 1) * PAGE], p, 0);
        }
        FakeSource {
            mem: Mutex::new(mem),
            dirty: Mutex::new(BTreeSet::new()),
            logging: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            pauses: AtomicU64::new(0),
            version: AtomicU64::new(1),
            writes_per_pass,
            throttle: Default::default(),
        }
    }
    fn pages(&self) -> u64 {
        (self.mem.lock().unwrap().len() / PAGE) as u64
    }
    fn guest_runs(&self) {
        if self.paused.load(Ordering::SeqCst) {
            return;
        }
        let v = self.version.fetch_add(1, Ordering::SeqCst);
        let n = self.pages();
        let writes =
            self.writes_per_pass * (100 - self.throttle.load(Ordering::SeqCst) as u64) / 100;
        let mut mem = self.mem.lock().unwrap();
        for k in 0..writes {
            let p = (v * 7919 + k * 104729) % n;
            fill(&mut mem[p as usize * PAGE..(p as usize + 1) * PAGE], p, v);
            if self.logging.load(Ordering::SeqCst) {
                self.dirty.lock().unwrap().insert(p * PAGE as u64);
            }
        }
    }
}

impl SourceVm for FakeSource {
    fn config(&self) -> Vec<u8> {
        self.pages().to_le_bytes().to_vec()
    }
    fn populated(&self) -> Result<Vec<u64>, String> {
        Ok((0..self.pages()).map(|p| p * PAGE as u64).collect())
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        let mem = self.mem.lock().unwrap();
        buf.copy_from_slice(&mem[gpa as usize..gpa as usize + PAGE]);
        Ok(())
    }
    fn start_dirty_log(&self) -> Result<(), String> {
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn stop_dirty_log(&self) -> Result<(), String> {
        self.logging.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn fetch_dirty(&self) -> Result<Vec<u64>, String> {
        self.guest_runs();
        Ok(std::mem::take(&mut *self.dirty.lock().unwrap())
            .into_iter()
            .collect())
    }
    fn pause(&self) -> Result<(), String> {
        self.paused.store(true, Ordering::SeqCst);
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&self, percent: u8) -> Result<(), String> {
        self.throttle.store(percent, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(format!("state v{}", self.version.load(Ordering::SeqCst)).into_bytes())
    }
}

#[derive(Default)]
struct FakeDest {
    mem: Mutex<Vec<u8>>,
    /// Bytes the engine asked to map ahead of the pages.
    hinted: AtomicU64,
    state: Mutex<Vec<u8>>,
    resumed: AtomicBool,
    /// Post-copy: missing pages and the "vCPU" faults on them (shared with the test).
    pc: std::sync::Arc<Faults>,
}

/// The destination's missing pages in post-copy, and a "vCPU" that touches pages: a touch of
/// a missing page queues a fault and waits until the engine installs the page.
#[derive(Default)]
struct Faults {
    missing: Mutex<BTreeSet<u64>>,
    queue: Mutex<std::collections::VecDeque<u64>>,
    cv: std::sync::Condvar,
    active: AtomicBool,
    resumed: AtomicBool,
    ended: AtomicBool,
}

impl Faults {
    /// The guest touches `gpa`: returns at once when present, else after its install.
    fn touch(&self, gpa: u64) -> bool {
        let mut m = self.missing.lock().unwrap();
        if !self.active.load(Ordering::SeqCst) || !m.contains(&gpa) {
            return false;
        }
        self.queue.lock().unwrap().push_back(gpa);
        self.cv.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while m.contains(&gpa) {
            assert!(
                std::time::Instant::now() < deadline,
                "page {gpa:#x} never came"
            );
            m = self
                .cv
                .wait_timeout(m, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        true
    }
}

impl DestinationVm for FakeDest {
    fn prepare(&mut self, config: &[u8]) -> Result<(), String> {
        let pages = u64::from_le_bytes(config.try_into().map_err(|_| "bad config")?);
        self.mem = Mutex::new(vec![0u8; pages as usize * PAGE]);
        Ok(())
    }
    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let at = gpa as usize;
        self.mem
            .lock()
            .unwrap()
            .get_mut(at..at + PAGE)
            .ok_or("page outside memory")?
            .copy_from_slice(data);
        Ok(())
    }
    fn prefault(&self, gpa: u64, len: u64) -> Result<(), String> {
        // Memory is already allocated; the hint must still lie inside it.
        let end = gpa.checked_add(len).ok_or("prefault range overflows")?;
        if end as usize > self.mem.lock().unwrap().len() {
            return Err(format!("prefault {gpa:#x}+{len} outside memory"));
        }
        self.hinted.fetch_add(len, Ordering::SeqCst);
        Ok(())
    }
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        *self.state.lock().unwrap() = state.to_vec();
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        self.resumed.store(true, Ordering::SeqCst);
        self.pc.resumed.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, runs: &[(u64, u64)]) -> Result<(), String> {
        let mut mem = self.mem.lock().unwrap();
        let mut m = self.pc.missing.lock().unwrap();
        for &(gpa, n) in runs {
            for k in 0..n {
                let at = (gpa + k * PAGE as u64) as usize;
                // Dropped, as MADV_DONTNEED would: a stale copy must not survive.
                mem.get_mut(at..at + PAGE)
                    .ok_or("missing page outside memory")?
                    .fill(0xEE);
                m.insert(at as u64);
            }
        }
        Ok(())
    }
    fn begin_postcopy(&self) -> Result<(), String> {
        self.pc.active.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, String> {
        let q = self.pc.queue.lock().unwrap();
        let (mut q, _) = self
            .pc
            .cv
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap();
        Ok(q.pop_front())
    }
    fn install_pages(&self, gpa: u64, data: &[u8]) -> Result<u64, String> {
        assert!(data.len().is_multiple_of(PAGE) && data.len() <= 64 * PAGE);
        let mut m = self.pc.missing.lock().unwrap();
        let mut mask = 0;
        for (k, page) in data.chunks(PAGE).enumerate() {
            let g = gpa + (k * PAGE) as u64;
            if m.remove(&g) {
                self.mem.lock().unwrap()[g as usize..g as usize + PAGE].copy_from_slice(page);
                mask |= 1 << k;
            }
        }
        self.pc.cv.notify_all();
        Ok(mask)
    }
    fn install_zero(&self, gpa: u64) -> Result<bool, String> {
        Ok(self.install_pages(gpa, &[0; PAGE])? != 0)
    }
    fn end_postcopy(&self) -> Result<(), String> {
        let m = self.pc.missing.lock().unwrap();
        if !m.is_empty() {
            return Err(format!("post-copy ended with {} pages missing", m.len()));
        }
        self.pc.ended.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Sees (connection number in accept order — 0 is the control connection —, bytes already
/// passed on it, next chunk) of the source→destination bytes; may change the chunk; false cuts
/// that connection after it.
type Tamper = Box<dyn FnMut(usize, u64, &mut Vec<u8>) -> bool + Send>;
type DestThread = thread::JoinHandle<(FakeDest, Result<(), EngineError>)>;

struct Pair {
    ctl: TcpStream,
    addr: std::net::SocketAddr,
    dest: DestThread,
}

impl Pair {
    fn connect(&self) -> std::io::Result<TcpStream> {
        let s = TcpStream::connect(self.addr)?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn migrate(
        &self,
        src: &FakeSource,
        opts: &Options,
    ) -> Result<ferry_migration::engine::Report, EngineError> {
        self.migrate_with(src, opts, &Monitor::default())
    }

    fn migrate_with(
        &self,
        src: &FakeSource,
        opts: &Options,
        mon: &Monitor,
    ) -> Result<ferry_migration::engine::Report, EngineError> {
        let ctl = self.ctl.try_clone().unwrap();
        migrate(src, ctl, &|| self.connect(), opts, mon)
    }

    fn join(self) -> (FakeDest, Result<(), EngineError>) {
        self.dest.join().unwrap()
    }
}

/// Listens on loopback; the destination runs on a thread, behind an optional proxy that may
/// tamper with the source→destination bytes of every connection.
fn pair(tamper: Option<Tamper>) -> Pair {
    pair_with(tamper, Default::default())
}

/// As [`pair`], the destination's post-copy faults shared with the caller.
fn pair_with(tamper: Option<Tamper>, pc: std::sync::Arc<Faults>) -> Pair {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut d = FakeDest {
            pc,
            ..FakeDest::default()
        };
        let r = receive(&mut d, s, &l).map(|_| ());
        (d, r)
    });
    let Some(tamper) = tamper else {
        let ctl = TcpStream::connect(addr).unwrap();
        return Pair { ctl, addr, dest };
    };
    // Proxy: the source connects here; bytes to the destination go through `tamper`.
    let pl = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = pl.local_addr().unwrap();
    let tamper = std::sync::Arc::new(Mutex::new(tamper));
    thread::spawn(move || {
        for (conn, from_src) in pl.incoming().enumerate() {
            let Ok(mut from_src) = from_src else { break };
            let tamper = tamper.clone();
            thread::spawn(move || {
                let mut to_dst = TcpStream::connect(addr).unwrap();
                let (mut back_src, mut back_dst) =
                    (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut back_dst, &mut back_src);
                });
                let mut seen = 0u64;
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match from_src.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut chunk = buf[..n].to_vec();
                    let go_on = (tamper.lock().unwrap())(conn, seen, &mut chunk);
                    seen += n as u64;
                    if to_dst.write_all(&chunk).is_err() || !go_on {
                        break;
                    }
                }
                let _ = to_dst.shutdown(std::net::Shutdown::Both);
                let _ = from_src.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    let ctl = TcpStream::connect(paddr).unwrap();
    Pair {
        ctl,
        addr: paddr,
        dest,
    }
}

fn assert_exact(src: &FakeSource, dst: &FakeDest) {
    let mem = src.mem.lock().unwrap();
    let dmem = dst.mem.lock().unwrap();
    assert_eq!(mem.len(), dmem.len());
    for (i, (a, b)) in mem.chunks(PAGE).zip(dmem.chunks(PAGE)).enumerate() {
        assert!(a == b, "page {i} differs");
    }
    assert_eq!(*dst.state.lock().unwrap(), src.save_state().unwrap());
}

fn assert_rolled_back(src: &FakeSource, p: Pair) -> EngineError {
    assert!(!src.paused.load(Ordering::SeqCst), "the source runs");
    assert!(
        !src.logging.load(Ordering::SeqCst),
        "dirty logging off again"
    );
    assert_eq!(src.throttle.load(Ordering::SeqCst), 0, "vCPUs unthrottled");
    let (dst, r) = p.join();
    assert!(
        !dst.resumed.load(Ordering::SeqCst),
        "nothing resumed on the destination"
    );
    r.unwrap_err()
}

#[test]
fn converging_guest_arrives_page_exact() {
    let src = FakeSource::new(4096, 64);
    let p = pair(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(5),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert!(dst.resumed.load(Ordering::SeqCst));
    assert!(
        src.paused.load(Ordering::SeqCst),
        "the source stays paused after commit"
    );
    assert_exact(&src, &dst);
    assert!(rep.passes.len() >= 2, "{rep:?}");
    assert!(
        rep.passes[0].zero_pages > 2000,
        "zero pages are not sent as data"
    );
    assert!(rep.saved_bytes > 2000 * 4096);
    assert!(rep.downtime_ms > 0.0 && rep.total_ms >= rep.downtime_ms);
    assert_eq!(rep.switch_reason, "converged");
}

#[test]
fn four_connections_with_each_compression_arrive_page_exact() {
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let src = FakeSource::new(8192, 700);
        let p = pair(None);
        let opts = Options {
            downtime_limit: Duration::ZERO,
            max_passes: 6,
            connections: 4,
            compression,
            ..Options::default()
        };
        let rep = p.migrate(&src, &opts).unwrap();
        let (dst, r) = p.join();
        r.unwrap();
        assert_exact(&src, &dst);
        assert_eq!(rep.connections, 4);
        assert_eq!(rep.passes.len(), 7);
        if compression != Compression::None {
            // The fake's pages are regular: compression must save most of each page.
            assert!(
                rep.saved_bytes > rep.passes.iter().map(|p| p.pages).sum::<u64>() * 2048,
                "{compression:?}: {rep:?}"
            );
        }
    }
}

#[test]
fn a_guest_that_never_converges_is_switched_over_after_the_pass_limit() {
    let src = FakeSource::new(2048, 1500);
    let p = pair(None);
    let opts = Options {
        downtime_limit: Duration::ZERO,
        max_passes: 4,
        compression: Compression::Lz4,
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    assert_eq!(rep.passes.len(), 5, "4 live passes and the final one");
    assert_eq!(rep.switch_reason, "max passes");
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn auto_converge_throttles_a_writer_faster_than_the_link_until_it_fits() {
    // Each pass the guest rewrites 1900 of 2048 pages: without throttling this never fits a
    // 1 ms downtime; auto-converge raises the throttle until the dirty set is small.
    let src = FakeSource::new(2048, 1900);
    let p = pair(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(1),
        max_passes: 0,
        auto_converge: true,
        timeout: Some(Duration::from_secs(60)),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    assert_eq!(rep.switch_reason, "converged", "{rep:?}");
    assert!(rep.max_throttle_percent >= 40, "{rep:?}");
    let steps: Vec<u8> = rep.passes.iter().map(|p| p.throttle_percent).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(src.throttle.load(Ordering::SeqCst), 0, "unthrottled after");
}

#[test]
fn bandwidth_cap_is_respected() {
    let src = FakeSource::new(1024, 0);
    let p = pair(None);
    let opts = Options {
        max_bandwidth: Some(8 << 20),
        connections: 2,
        ..Options::default()
    };
    let t = std::time::Instant::now();
    p.migrate(&src, &opts).unwrap();
    p.join().1.unwrap();
    // ~342 data pages of 4 KiB at 8 MiB/s, whatever the connection count: at least ~0.15 s.
    assert!(
        t.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn cancel_rolls_back_and_progress_is_visible() {
    let src = FakeSource::new(8192, 0);
    let p = pair(None);
    let opts = Options {
        max_bandwidth: Some(4 << 20),
        connections: 2,
        ..Options::default()
    };
    let mon = Monitor::default();
    let e = thread::scope(|s| {
        let h = s.spawn(|| p.migrate_with(&src, &opts, &mon));
        thread::sleep(Duration::from_millis(300));
        let st = mon.status();
        assert_eq!(st.phase, Phase::PreCopy);
        assert_eq!((st.pass, st.pass_pages), (1, 8192));
        assert!(st.pass_sent > 0 && st.pass_sent < 8192, "{st:?}");
        assert!(st.wire_bytes > 0);
        // The running pass's own rate (capped at 4 MiB/s) and what is left of it.
        assert!(
            st.bandwidth_bytes_per_s > 1e6 && st.bandwidth_bytes_per_s < 8e6,
            "{st:?}"
        );
        assert!(st.eta_ms > 0.0, "{st:?}");
        mon.cancel();
        h.join().unwrap().unwrap_err()
    });
    assert!(matches!(e, EngineError::Cancelled), "{e}");
    assert_eq!(mon.status().phase, Phase::Cancelled);
    let de = assert_rolled_back(&src, p);
    assert!(de.to_string().contains("cancelled"), "{de}");
}

#[test]
fn timeout_cancels_or_switches_over_by_policy() {
    for policy in [TimeoutPolicy::Cancel, TimeoutPolicy::SwitchOver] {
        let src = FakeSource::new(8192, 0);
        let p = pair(None);
        let opts = Options {
            max_bandwidth: Some(8 << 20),
            timeout: Some(Duration::from_millis(200)),
            on_timeout: policy,
            ..Options::default()
        };
        let r = p.migrate(&src, &opts);
        match policy {
            TimeoutPolicy::Cancel => {
                assert!(matches!(r, Err(EngineError::Timeout(_))), "{r:?}");
                assert_rolled_back(&src, p);
            }
            TimeoutPolicy::SwitchOver => {
                let rep = r.unwrap();
                assert_eq!(rep.switch_reason, "timeout");
                assert_eq!(rep.passes.len(), 2, "the cut pass, then the final one");
                assert!(rep.passes[1].pages > 0, "the final pass carried the rest");
                let (dst, r) = p.join();
                r.unwrap();
                assert_exact(&src, &dst);
            }
        }
    }
}

#[test]
fn destination_dying_mid_stream_leaves_the_source_running() {
    let src = FakeSource::new(4096, 64);
    let p = pair(Some(Box::new(|conn, seen, _| conn == 0 || seen < 2 << 20)));
    let e = p.migrate(&src, &Options::default()).unwrap_err();
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
    assert_rolled_back(&src, p);
}

#[test]
fn a_flipped_byte_on_any_connection_is_caught_and_nothing_resumes() {
    for victim in [1usize, 3] {
        let src = FakeSource::new(4096, 16);
        let p = pair(Some(Box::new(move |conn, seen, chunk: &mut Vec<u8>| {
            // Just past the Join frame (28 bytes) and the next frame's header: inside the
            // first payload this connection carries, however few pages it got.
            let target = 50u64;
            if conn == victim && seen <= target && target < seen + chunk.len() as u64 {
                chunk[(target - seen) as usize] ^= 0x20;
            }
            true
        })));
        let opts = Options {
            connections: 3,
            ..Options::default()
        };
        let e = p.migrate(&src, &opts).unwrap_err();
        let de = assert_rolled_back(&src, p);
        // A connection may carry no page at all (the others took every chunk): then the
        // flip lands in a frame header, whose reserved bytes must be zero.
        assert!(
            matches!(
                de,
                EngineError::Protocol(ProtocolError::Crc(_) | ProtocolError::Malformed { .. })
            ),
            "{de}"
        );
        // The source hears the destination's reason.
        assert!(
            e.to_string().contains("CRC") || e.to_string().contains("malformed"),
            "{e}"
        );
    }
}

#[test]
fn a_cut_at_switch_over_rolls_back() {
    // Cut the control connection where the State frame starts: the source had paused; it
    // resumes.
    let src = FakeSource::new(256, 4);
    let p = pair(Some(Box::new(move |conn, _, chunk: &mut Vec<u8>| {
        // The state frame is the only one holding "state v".
        if let Some(i) = chunk.windows(7).position(|w| w == b"state v") {
            assert_eq!(conn, 0);
            chunk.truncate(i);
            return false;
        }
        true
    })));
    let e = p.migrate(&src, &Options::default()).unwrap_err();
    assert!(!matches!(e, EngineError::InDoubt(_)), "{e}");
    assert_eq!(
        src.pauses.load(Ordering::SeqCst),
        1,
        "it did pause for switch-over"
    );
    assert_rolled_back(&src, p);
}

#[test]
fn a_stray_connection_does_not_join_the_migration() {
    let src = FakeSource::new(512, 8);
    let p = pair(None);
    // A port probe before the data connections: accepted, not a Join, closed.
    drop(TcpStream::connect(p.addr).unwrap());
    let rep = p
        .migrate(
            &src,
            &Options {
                connections: 2,
                ..Options::default()
            },
        )
        .unwrap();
    assert_eq!(rep.connections, 2);
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn version_mismatch_is_a_clear_error() {
    let mut p = pair(None);
    send(
        &mut p.ctl,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: 4,
            caps: 0,
            session: 1,
            connections: 1,
            config: vec![],
        }),
    )
    .unwrap();
    let mut ctl = p.ctl.try_clone().unwrap();
    let (dst, r) = p.join();
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("peer speaks migration protocol version 4, this Ferry speaks 3"),
        "{e}"
    );
    assert!(!dst.resumed.load(Ordering::SeqCst));
    // The source side hears why.
    match ferry_migration::protocol::recv(&mut ctl) {
        Ok(Message::Abort(why)) => assert!(why.contains("version 4")),
        other => panic!("{other:?}"),
    }
}

/// Touches pages from the top of memory down while the destination runs in post-copy, as a
/// guest would; returns how many touches had to wait for a page.
fn touch_from_top(pc: std::sync::Arc<Faults>, pages: u64) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        while !pc.resumed.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        let mut waited = 0;
        for p in (0..pages).rev().step_by(97) {
            if pc.ended.load(Ordering::SeqCst) {
                break;
            }
            waited += pc.touch(p * PAGE as u64) as u64;
            thread::sleep(Duration::from_millis(2));
        }
        waited
    })
}

#[test]
fn post_copy_at_once_serves_faults_on_demand_and_arrives_page_exact() {
    let src = FakeSource::new(4096, 64);
    let pc = std::sync::Arc::new(Faults::default());
    let p = pair_with(None, pc.clone());
    let toucher = touch_from_top(pc.clone(), 4096);
    let opts = Options {
        postcopy_after: Some(0),
        // Slow enough (16 MiB in ~2 s) that the guest touches pages the push has not reached.
        max_bandwidth: Some(8 << 20),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let waited = toucher.join().unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    assert!(
        pc.ended.load(Ordering::SeqCst),
        "post-copy ended on the destination"
    );
    assert_eq!(rep.switch_reason, "post-copy requested");
    assert_eq!(
        rep.passes.len(),
        1,
        "no pre-copy pass, only the empty switch-over"
    );
    let pcr = rep.postcopy.expect("post-copy report");
    let d = &pcr.destination;
    assert_eq!(pcr.pages, 4096);
    assert_eq!(d.pushed + d.pulled, 4096, "{pcr:?}");
    assert!(waited > 0 && d.faults >= waited, "{waited} waits, {pcr:?}");
    assert!(d.pulled > 0 && pcr.demanded >= d.pulled, "{pcr:?}");
    assert!(d.latency_p50_us > 0 && d.latency_p99_us >= d.latency_p50_us);
    assert!(pcr.released_ms >= pcr.postcopy_ms && pcr.recoveries == 0);
}

#[test]
fn hybrid_and_automatic_post_copy_arrive_page_exact() {
    // Two pre-copy passes, then post-copy (a limit no pass can meet, so pre-copy does not
    // finish by itself first).
    let src = FakeSource::new(4096, 256);
    let p = pair(None);
    let opts = Options {
        postcopy_after: Some(2),
        downtime_limit: Duration::from_micros(1),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    assert_eq!(rep.passes.len(), 3);
    let pcr = rep.postcopy.expect("post-copy report");
    assert!(pcr.pages > 0 && pcr.pages < 4096, "{pcr:?}");
    // A guest rewriting more than the passes carry: post-copy instead of a long pause.
    let src = FakeSource::new(4096, 3000);
    let p = pair(None);
    let opts = Options {
        auto_postcopy: true,
        downtime_limit: Duration::from_micros(1),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    assert_eq!(rep.switch_reason, "not converging");
    assert!(rep.passes.len() <= 3, "{} passes", rep.passes.len());
    assert!(rep.postcopy.is_some());
}

#[test]
fn a_link_cut_during_post_copy_is_recovered_page_exact() {
    let src = FakeSource::new(4096, 64);
    let pc = std::sync::Arc::new(Faults::default());
    let cut = std::sync::Arc::new(AtomicBool::new(false));
    let c = cut.clone();
    // The first data connection (accept order 1) dies after 4 MiB of the push.
    let tamper: Tamper = Box::new(move |conn, seen, _| {
        !(conn == 1 && seen > 4 << 20 && !c.swap(true, Ordering::SeqCst))
    });
    let p = pair_with(Some(tamper), pc.clone());
    let toucher = touch_from_top(pc.clone(), 4096);
    let opts = Options {
        postcopy_after: Some(0),
        max_bandwidth: Some(8 << 20),
        ..Options::default()
    };
    let mon = Monitor::default();
    let rep = p.migrate_with(&src, &opts, &mon).unwrap();
    toucher.join().unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert!(cut.load(Ordering::SeqCst), "the link was cut");
    assert_exact(&src, &dst);
    let pcr = rep.postcopy.expect("post-copy report");
    assert_eq!(pcr.recoveries, 1, "{pcr:?}");
    assert_eq!(mon.status().phase, Phase::Completed);
}
