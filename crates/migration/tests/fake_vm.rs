//! The engine against an in-memory fake VM over real loopback TCP: a "guest" that dirties
//! pages deterministically between passes, destination memory compared page by page, and
//! faults: the destination dying, the stream corrupted or cut, a version mismatch.
use ferry_migration::engine::{migrate, receive, DestinationVm, EngineError, Options, SourceVm};
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
        let mut mem = self.mem.lock().unwrap();
        for k in 0..self.writes_per_pass {
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
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(format!("state v{}", self.version.load(Ordering::SeqCst)).into_bytes())
    }
}

#[derive(Default)]
struct FakeDest {
    mem: Vec<u8>,
    state: Vec<u8>,
    resumed: bool,
}

impl DestinationVm for FakeDest {
    fn prepare(&mut self, config: &[u8]) -> Result<(), String> {
        let pages = u64::from_le_bytes(config.try_into().map_err(|_| "bad config")?);
        self.mem = vec![0u8; pages as usize * PAGE];
        Ok(())
    }
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let at = gpa as usize;
        self.mem
            .get_mut(at..at + PAGE)
            .ok_or("page outside memory")?
            .copy_from_slice(data);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        self.state = state.to_vec();
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.resumed = true;
        Ok(())
    }
}

/// Sees (bytes already passed, next chunk) of the source→destination stream; may change the
/// chunk; false cuts the connection after it.
type Tamper = Box<dyn FnMut(u64, &mut Vec<u8>) -> bool + Send>;
type DestThread = thread::JoinHandle<(FakeDest, Result<(), EngineError>)>;

/// Listens on loopback; the destination runs on a thread, behind an optional proxy that may
/// tamper with the source→destination bytes.
fn pair(tamper: Option<Tamper>) -> (TcpStream, DestThread) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut d = FakeDest::default();
        let r = receive(&mut d, &mut s).map(|_| ());
        (d, r)
    });
    let Some(mut tamper) = tamper else {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        return (s, dest);
    };
    // Proxy: source connects here; bytes to the destination go through `tamper`.
    let pl = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = pl.local_addr().unwrap();
    thread::spawn(move || {
        let (mut from_src, _) = pl.accept().unwrap();
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
            let go_on = tamper(seen, &mut chunk);
            seen += n as u64;
            if to_dst.write_all(&chunk).is_err() || !go_on {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
        let _ = from_src.shutdown(std::net::Shutdown::Both);
    });
    (TcpStream::connect(paddr).unwrap(), dest)
}

fn assert_exact(src: &FakeSource, dst: &FakeDest) {
    let mem = src.mem.lock().unwrap();
    assert_eq!(mem.len(), dst.mem.len());
    for (i, (a, b)) in mem.chunks(PAGE).zip(dst.mem.chunks(PAGE)).enumerate() {
        assert!(a == b, "page {i} differs");
    }
    assert_eq!(dst.state, src.save_state().unwrap());
}

#[test]
fn converging_guest_arrives_page_exact() {
    let src = FakeSource::new(4096, 64);
    let (mut s, dest) = pair(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(5),
        ..Options::default()
    };
    let rep = migrate(&src, &mut s, &opts).unwrap();
    let (dst, r) = dest.join().unwrap();
    r.unwrap();
    assert!(dst.resumed);
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
}

#[test]
fn a_guest_that_never_converges_is_switched_over_after_the_pass_limit() {
    let src = FakeSource::new(2048, 1500);
    let (mut s, dest) = pair(None);
    let opts = Options {
        downtime_limit: Duration::ZERO,
        max_passes: 4,
        compression: Compression::Lz4,
        max_bandwidth: None,
    };
    let rep = migrate(&src, &mut s, &opts).unwrap();
    assert_eq!(rep.passes.len(), 5, "4 live passes and the final one");
    let (dst, r) = dest.join().unwrap();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn bandwidth_cap_is_respected() {
    let src = FakeSource::new(1024, 0);
    let (mut s, dest) = pair(None);
    let opts = Options {
        max_bandwidth: Some(8 << 20),
        ..Options::default()
    };
    let t = std::time::Instant::now();
    migrate(&src, &mut s, &opts).unwrap();
    dest.join().unwrap().1.unwrap();
    // ~342 data pages of 4 KiB at 8 MiB/s: at least ~0.15 s.
    assert!(
        t.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn destination_dying_mid_stream_leaves_the_source_running() {
    let src = FakeSource::new(4096, 64);
    let (mut s, dest) = pair(Some(Box::new(|seen, _| seen < 2 << 20)));
    let e = migrate(&src, &mut s, &Options::default()).unwrap_err();
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
    assert!(!src.paused.load(Ordering::SeqCst));
    assert!(
        !src.logging.load(Ordering::SeqCst),
        "dirty logging off again"
    );
    let (dst, r) = dest.join().unwrap();
    assert!(r.is_err());
    assert!(!dst.resumed);
}

#[test]
fn a_flipped_byte_is_caught_and_nothing_resumes() {
    let src = FakeSource::new(1024, 16);
    let (mut s, dest) = pair(Some(Box::new(|seen, chunk: &mut Vec<u8>| {
        let target = 300_000u64;
        if seen <= target && target < seen + chunk.len() as u64 {
            chunk[(target - seen) as usize] ^= 0x20;
        }
        true
    })));
    let e = migrate(&src, &mut s, &Options::default()).unwrap_err();
    let (dst, r) = dest.join().unwrap();
    let de = r.unwrap_err();
    assert!(
        matches!(de, EngineError::Protocol(ProtocolError::Crc(_))),
        "{de}"
    );
    assert!(!dst.resumed);
    // The source hears the destination's reason when it arrives before the connection resets.
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
    assert!(!src.paused.load(Ordering::SeqCst));
}

#[test]
fn a_cut_at_switch_over_rolls_back() {
    // Cut right after the source's State frame starts: the source had paused; it resumes.
    let src = FakeSource::new(256, 4);
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let s2 = sent.clone();
    let (mut s, dest) = pair(Some(Box::new(move |seen, chunk: &mut Vec<u8>| {
        s2.store(seen + chunk.len() as u64, Ordering::SeqCst);
        // The state frame is the only one holding "state v".
        if let Some(i) = chunk.windows(7).position(|w| w == b"state v") {
            chunk.truncate(i);
            return false;
        }
        true
    })));
    let e = migrate(&src, &mut s, &Options::default()).unwrap_err();
    assert!(!matches!(e, EngineError::InDoubt(_)), "{e}");
    assert_eq!(
        src.pauses.load(Ordering::SeqCst),
        1,
        "it did pause for switch-over"
    );
    assert!(
        !src.paused.load(Ordering::SeqCst),
        "and resumed after the failure"
    );
    let (dst, r) = dest.join().unwrap();
    assert!(r.is_err() && !dst.resumed);
}

#[test]
fn version_mismatch_is_a_clear_error() {
    let (mut s, dest) = pair(None);
    send(
        &mut s,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: 2,
            caps: 0,
            config: vec![],
        }),
    )
    .unwrap();
    let (dst, r) = dest.join().unwrap();
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("peer speaks migration protocol version 2, this Ferry speaks 1"),
        "{e}"
    );
    assert!(!dst.resumed);
    // The source side hears why.
    match ferry_migration::protocol::recv(&mut s) {
        Ok(Message::Abort(why)) => assert!(why.contains("version 2")),
        other => panic!("{other:?}"),
    }
}
