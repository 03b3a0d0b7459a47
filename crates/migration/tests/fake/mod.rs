//! The fake VM the engine tests run against: a source whose "guest" dirties pages
//! deterministically between passes, a destination that keeps pages in a vector (and, in
//! post-copy, a set of missing pages a test "vCPU" can fault on), and a loopback pair with an
//! optional proxy that tampers with or cuts the source's bytes.
#![allow(dead_code)]
use ferry_migration::disk_wire::DiskSpec;
use ferry_migration::engine::{
    migrate, receive, Acceptor, DestinationVm, DiskCopy, DiskLink, EngineError, Limits, Monitor,
    Options, PageSet, SourceVm,
};
use ferry_migration::protocol::PAGE;
use ferry_migration::tls::{TlsClient, TlsServer};
use ferry_migration::transport::Conn;
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
pub struct FakeSource {
    pub mem: Mutex<Vec<u8>>,
    pub dirty: Mutex<BTreeSet<u64>>,
    pub logging: AtomicBool,
    pub paused: AtomicBool,
    pub pauses: AtomicU64,
    pub version: AtomicU64,
    pub writes_per_pass: u64,
    /// Throttle the engine asked for (percent); the guest writes that much less.
    pub throttle: std::sync::atomic::AtomicU8,
    /// Models KVM's manual dirty-log protection: a fetch leaves the log as it is, and only
    /// `rearm` clears pages from it; the "guest" writes the first page of every re-armed
    /// group just before it is cleared, so an engine that read a page before re-arming it
    /// would lose that write.
    pub manual: bool,
    pub rearmed: AtomicU64,
    /// Nice value of the last thread that read a page (the senders' CPU priority).
    pub reader_nice: std::sync::atomic::AtomicI32,
    /// A disk that comes with the VM (`copy_storage`), mirrored as Ferry's mirror does.
    pub disk: Option<FakeDisk>,
    /// `populated` names only the pages that are not zero (as a VMM that knows which pages
    /// its guest wrote), not all of memory.
    pub only_written: bool,
    /// A seed this source made (its id) and the pages written since, as a VMM's dirty log
    /// since its seed would name them.
    pub seed_mark: Mutex<Option<(u64, BTreeSet<u64>)>>,
}

/// The source's disk: its bytes, the bulk copy's cursor, the link of a running mirror. A
/// "guest write" lands on the disk and, below the cursor, on the link too, under one lock.
#[derive(Default)]
pub struct FakeDisk {
    pub state: Mutex<(Vec<u8>, u64, Option<DiskLink>)>,
    pub unmirrored: AtomicBool,
    pub writes: AtomicU64,
}

impl FakeDisk {
    pub fn new(len: usize) -> Self {
        let mut d = vec![0u8; len];
        // Data in the first and third quarters; the rest stays zero (holes).
        for (i, b) in d.iter_mut().enumerate() {
            if (i / (len / 4)).is_multiple_of(2) {
                *b = (i / 512) as u8 | 1;
            }
        }
        FakeDisk {
            state: Mutex::new((d, 0, None)),
            ..Default::default()
        }
    }

    /// The guest writes 512 bytes at a place derived from `k`.
    pub fn guest_write(&self, k: u64) -> Result<(), String> {
        let mut st = self.state.lock().unwrap();
        let (d, cursor, link) = &mut *st;
        let off = (k.wrapping_mul(2654435761) % (d.len() as u64 / 512)) * 512;
        let v = self.writes.fetch_add(1, Ordering::SeqCst) as u8 ^ 0xa5;
        d[off as usize..off as usize + 512].fill(v);
        if off < *cursor {
            if let Some(l) = link {
                let _ = l.write(0, off, &d[off as usize..off as usize + 512]);
            }
        }
        Ok(())
    }
}

/// The calling thread's nice value.
pub fn nice() -> i32 {
    // SAFETY: getpriority has no memory effects; `who` = 0 is the calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

pub fn fill(page: &mut [u8], index: u64, version: u64) {
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((index << 32) ^ (version << 12) ^ i as u64 ^ 0x5a5a).to_le_bytes());
    }
}

impl FakeSource {
    pub fn new(pages: u64, writes_per_pass: u64) -> Self {
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
            manual: false,
            rearmed: AtomicU64::new(0),
            reader_nice: Default::default(),
            disk: None,
            only_written: false,
            seed_mark: Mutex::new(None),
        }
    }

    /// As [`FakeSource::new`], with manual dirty-log protection.
    pub fn new_manual(pages: u64, writes_per_pass: u64) -> Self {
        FakeSource {
            manual: true,
            ..Self::new(pages, writes_per_pass)
        }
    }

    fn write_page(&self, p: u64) {
        let v = self.version.fetch_add(1, Ordering::SeqCst);
        let mut mem = self.mem.lock().unwrap();
        fill(&mut mem[p as usize * PAGE..(p as usize + 1) * PAGE], p, v);
        if self.logging.load(Ordering::SeqCst) || self.manual {
            self.dirty.lock().unwrap().insert(p * PAGE as u64);
        }
    }
    pub fn pages(&self) -> u64 {
        (self.mem.lock().unwrap().len() / PAGE) as u64
    }
    pub fn guest_runs(&self) {
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
            if self.logging.load(Ordering::SeqCst) || self.manual {
                self.dirty.lock().unwrap().insert(p * PAGE as u64);
            }
        }
    }
}

impl SourceVm for FakeSource {
    fn config(&self) -> Vec<u8> {
        self.pages().to_le_bytes().to_vec()
    }
    fn memory_end(&self) -> u64 {
        self.pages() * PAGE as u64
    }
    fn populated(&self, into: &PageSet) -> Result<(), String> {
        if !self.only_written {
            return into.insert_run(0, self.pages());
        }
        let mem = self.mem.lock().unwrap();
        for (i, p) in mem.chunks(PAGE).enumerate() {
            if p.iter().any(|&b| b != 0) {
                into.insert((i * PAGE) as u64)?;
            }
        }
        Ok(())
    }
    fn seed_baseline(&self) -> Option<u64> {
        self.seed_mark.lock().unwrap().as_ref().map(|m| m.0)
    }
    fn changed_since_seed(&self, into: &PageSet) -> Result<(), String> {
        let m = self.seed_mark.lock().unwrap();
        for &gpa in &m.as_ref().ok_or("no seed")?.1 {
            into.insert(gpa)?;
        }
        Ok(())
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.reader_nice.store(nice(), Ordering::SeqCst);
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
    fn fetch_dirty(&self, into: &PageSet) -> Result<(), String> {
        self.guest_runs();
        let mut dirty = self.dirty.lock().unwrap();
        for &gpa in dirty.iter() {
            into.insert(gpa)?;
        }
        if !self.manual {
            dirty.clear();
        }
        Ok(())
    }
    fn rearm(&self, first: usize, words: &[u64]) -> Result<(), String> {
        if !self.manual {
            return Ok(());
        }
        self.rearmed.fetch_add(1, Ordering::SeqCst);
        let pages: Vec<u64> = words
            .iter()
            .enumerate()
            .flat_map(|(k, &w)| PageSet::pages_of(first + k, w))
            .collect();
        if let Some(&p) = pages.first() {
            if !self.paused.load(Ordering::SeqCst) {
                self.write_page(p / PAGE as u64);
            }
        }
        let mut dirty = self.dirty.lock().unwrap();
        for p in pages {
            dirty.remove(&p);
        }
        Ok(())
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
    fn disks(&self) -> Vec<DiskSpec> {
        self.disk
            .iter()
            .map(|d| DiskSpec {
                id: "disk0".into(),
                size: d.state.lock().unwrap().0.len() as u64,
                format: "raw".into(),
                name: "disk0.raw".into(),
                path: None,
                to_format: None,
                sector: 512,
            })
            .collect()
    }
    fn mirror_disks(&self, link: DiskLink) -> Result<(), String> {
        let d = self.disk.as_ref().ok_or("no disk")?;
        d.state.lock().unwrap().2 = Some(link);
        Ok(())
    }
    fn copy_disks(&self) -> Result<DiskCopy, String> {
        let d = self.disk.as_ref().ok_or("no disk")?;
        if !self.paused.load(Ordering::SeqCst) {
            for k in 0..3 {
                d.guest_write(self.version.fetch_add(1, Ordering::SeqCst) * 3 + k)?;
            }
        }
        let mut st = d.state.lock().unwrap();
        let (data, cursor, link) = &mut *st;
        let len = data.len() as u64;
        let link = link.as_ref().ok_or("not mirrored")?;
        if *cursor < len {
            let end = (*cursor + (64 << 10)).min(len);
            let chunk = &data[*cursor as usize..end as usize];
            // Holes (all zeroes) are skipped, as the real mirror's allocation map does.
            if chunk.iter().any(|&b| b != 0) {
                link.write(0, *cursor, chunk)?;
            }
            *cursor = end;
        }
        Ok(DiskCopy {
            done: *cursor >= len,
            size: len,
            cursor: *cursor,
            copied: *cursor,
        })
    }
    fn unmirror_disks(&self) {
        if let Some(d) = &self.disk {
            d.state.lock().unwrap().2 = None;
            d.unmirrored.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Default)]
pub struct FakeDest {
    pub mem: Mutex<Vec<u8>>,
    /// Bytes the engine asked to map ahead of the pages.
    pub hinted: AtomicU64,
    pub state: Mutex<Vec<u8>>,
    pub resumed: AtomicBool,
    /// Post-copy: missing pages and the "vCPU" faults on them (shared with the test).
    pub pc: std::sync::Arc<Faults>,
    /// The disk created for a `copy_storage` migration, and what happened to it.
    pub disk: Mutex<Option<Vec<u8>>>,
    pub disk_synced_last: AtomicBool,
    pub disk_removed: AtomicBool,
    /// A seed of the VM (its memory image) this destination holds (`load_seed`), and its
    /// snapshot id (`seed_id`; None: not loaded whole).
    pub seed: Option<Vec<u8>>,
    pub seed_id: Option<u64>,
}

/// The destination's missing pages in post-copy, and a "vCPU" that touches pages: a touch of
/// a missing page queues a fault and waits until the engine installs the page.
#[derive(Default)]
pub struct Faults {
    pub missing: Mutex<BTreeSet<u64>>,
    pub queue: Mutex<std::collections::VecDeque<u64>>,
    pub cv: std::sync::Condvar,
    pub active: AtomicBool,
    pub resumed: AtomicBool,
    pub ended: AtomicBool,
    /// The destination's disk refuses writes at and past this offset (a full disk).
    pub disk_full_at: Mutex<Option<u64>>,
}

impl Faults {
    /// The guest touches `gpa`: returns at once when present, else after its install.
    pub fn touch(&self, gpa: u64) -> bool {
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
    fn load_seed(&mut self) -> Result<Vec<(u64, ferry_migration::seed::PageHash)>, String> {
        let seed = self.seed.as_ref().ok_or("no seed here")?;
        let mut mem = self.mem.lock().unwrap();
        if seed.len() != mem.len() {
            return Err(format!(
                "the seed is of a VM with {} pages, this one has {}",
                seed.len() / PAGE,
                mem.len() / PAGE
            ));
        }
        mem.copy_from_slice(seed);
        Ok(mem
            .chunks(PAGE)
            .enumerate()
            .filter(|(_, p)| p.iter().any(|&b| b != 0))
            .map(|(i, p)| ((i * PAGE) as u64, ferry_migration::seed::page_hash(p)))
            .collect())
    }
    fn seed_id(&self) -> Option<u64> {
        self.seed_id
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
    fn create_disks(&mut self, disks: &[DiskSpec]) -> Result<(), String> {
        let [d] = disks else {
            return Err(format!("{} disks", disks.len()));
        };
        *self.disk.lock().unwrap() = Some(vec![0u8; d.size as usize]);
        Ok(())
    }
    fn disk_write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        if self
            .pc
            .disk_full_at
            .lock()
            .unwrap()
            .is_some_and(|f| offset >= f)
        {
            return Err("No space left on device (os error 28)".into());
        }
        let mut g = self.disk.lock().unwrap();
        let d = g.as_mut().filter(|_| disk == 0).ok_or("no such disk")?;
        d.get_mut(offset as usize..offset as usize + data.len())
            .ok_or("outside the disk")?
            .copy_from_slice(data);
        Ok(())
    }
    fn disk_zero(&self, disk: u32, offset: u64, len: u64) -> Result<(), String> {
        let mut g = self.disk.lock().unwrap();
        let d = g.as_mut().filter(|_| disk == 0).ok_or("no such disk")?;
        d.get_mut(offset as usize..(offset + len) as usize)
            .ok_or("outside the disk")?
            .fill(0);
        Ok(())
    }
    fn disk_sync(&self, last: bool) -> Result<(), String> {
        if last {
            self.disk_synced_last.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn remove_disks(&self) {
        self.disk.lock().unwrap().take();
        self.disk_removed.store(true, Ordering::SeqCst);
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

/// What the proxy does with a connection after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Passes the chunk on and goes on.
    Go,
    /// Passes the chunk on, then closes the connection both ways.
    Cut,
    /// Passes the chunk on, then stops reading from the source without closing anything (a
    /// peer that hangs): the source's sends block once the buffers are full.
    Stall,
}

impl From<bool> for Flow {
    fn from(go: bool) -> Self {
        if go {
            Flow::Go
        } else {
            Flow::Cut
        }
    }
}

/// Sees (connection number in accept order — 0 is the control connection —, bytes already
/// passed on it, next chunk) of the source→destination bytes; may change the chunk; says what
/// happens next on that connection.
pub type Tamper = Box<dyn FnMut(usize, u64, &mut Vec<u8>) -> Flow + Send>;
pub type DestThread = thread::JoinHandle<(FakeDest, Result<(), EngineError>)>;

pub struct Pair {
    pub ctl: Conn,
    pub addr: std::net::SocketAddr,
    pub dest: DestThread,
    /// The source's TLS side, when the pair runs TLS.
    pub tls: Option<std::sync::Arc<TlsClient>>,
}

impl Pair {
    pub fn connect(&self) -> std::io::Result<Conn> {
        open(self.addr, self.tls.as_deref())
    }

    pub fn migrate(
        &self,
        src: &FakeSource,
        opts: &Options,
    ) -> Result<ferry_migration::engine::Report, EngineError> {
        self.migrate_with(src, opts, &Monitor::default())
    }

    pub fn migrate_with(
        &self,
        src: &FakeSource,
        opts: &Options,
        mon: &Monitor,
    ) -> Result<ferry_migration::engine::Report, EngineError> {
        let ctl = self.ctl.try_clone().unwrap();
        migrate(src, ctl, &|| self.connect(), opts, mon)
    }

    pub fn join(self) -> (FakeDest, Result<(), EngineError>) {
        self.dest.join().unwrap()
    }
}

/// One connection to `addr`, under TLS with `tls` if given.
fn open(addr: std::net::SocketAddr, tls: Option<&TlsClient>) -> std::io::Result<Conn> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    match tls {
        Some(t) => t.handshake(s, "127.0.0.1").map_err(std::io::Error::other),
        None => Ok(Conn::plain(s)),
    }
}

/// Listens on loopback; the destination runs on a thread, behind an optional proxy that may
/// tamper with the source→destination bytes of every connection.
pub fn pair(tamper: Option<Tamper>) -> Pair {
    pair_with(tamper, Default::default())
}

/// As [`pair`], the destination's post-copy faults shared with the caller.
pub fn pair_with(tamper: Option<Tamper>, pc: std::sync::Arc<Faults>) -> Pair {
    pair_limits(tamper, pc, Limits::default())
}

/// As [`pair_with`], with the destination's limits.
pub fn pair_limits(tamper: Option<Tamper>, pc: std::sync::Arc<Faults>, limits: Limits) -> Pair {
    pair_full(tamper, pc, limits, None)
}

/// As [`pair`], the destination accepting TLS with `server`, the source connecting with
/// `client`.
pub fn pair_tls(tamper: Option<Tamper>, server: TlsServer, client: TlsClient) -> Pair {
    pair_full(
        tamper,
        Default::default(),
        Limits::default(),
        Some((std::sync::Arc::new(server), std::sync::Arc::new(client))),
    )
}

/// Logs the engine's tracing to stderr when `FERRY_TEST_LOG` names a filter (e.g. `info`).
fn log_if_asked() {
    if let Ok(filter) = std::env::var("FERRY_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

pub fn pair_full(
    tamper: Option<Tamper>,
    pc: std::sync::Arc<Faults>,
    limits: Limits,
    tls: Option<(std::sync::Arc<TlsServer>, std::sync::Arc<TlsClient>)>,
) -> Pair {
    pair_seeded(tamper, pc, limits, tls, None)
}

/// As [`pair`], the destination holding `seed` (a memory image of the VM).
pub fn pair_seed(seed: Option<Vec<u8>>) -> Pair {
    pair_seeded(
        None,
        Default::default(),
        Limits::default(),
        None,
        seed.map(|s| (s, None)),
    )
}

/// As [`pair_seed`], the seed with its snapshot id.
pub fn pair_seed_id(seed: Vec<u8>, id: u64) -> Pair {
    pair_seeded(
        None,
        Default::default(),
        Limits::default(),
        None,
        Some((seed, Some(id))),
    )
}

fn pair_seeded(
    tamper: Option<Tamper>,
    pc: std::sync::Arc<Faults>,
    limits: Limits,
    tls: Option<(std::sync::Arc<TlsServer>, std::sync::Arc<TlsClient>)>,
    seed: Option<(Vec<u8>, Option<u64>)>,
) -> Pair {
    log_if_asked();
    let (seed, seed_id) = match seed {
        Some((s, id)) => (Some(s), id),
        None => (None, None),
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (server, client) = match tls {
        Some((s, c)) => (Some(s), Some(c)),
        None => (None, None),
    };
    // A test's destination waits for its migration's Hello a bounded time (a real receiver
    // waits as long as it takes).
    let hello_wait = limits.hello_timeout * 5;
    let acc = Acceptor::new(l, server, limits).unwrap();
    let dest = thread::spawn(move || {
        let mut d = FakeDest {
            pc,
            seed,
            seed_id,
            ..FakeDest::default()
        };
        let Some(first) = acc.next_hello(Some(hello_wait)) else {
            return (d, Err(EngineError::Stalled("no Hello came".into())));
        };
        let r = receive(&mut d, first, &acc).map(|_| ());
        (d, r)
    });
    let Some(tamper) = tamper else {
        let ctl = open(addr, client.as_deref()).unwrap();
        return Pair {
            ctl,
            addr,
            dest,
            tls: client,
        };
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
                let stalled = std::sync::Arc::new(AtomicBool::new(false));
                let held = stalled.clone();
                thread::spawn(move || {
                    let _ = std::io::copy(&mut back_dst, &mut back_src);
                    // The destination closed: its FIN reaches the source, as over a real
                    // link (unless this connection plays a hung peer).
                    if !held.load(Ordering::SeqCst) {
                        let _ = back_src.shutdown(std::net::Shutdown::Write);
                    }
                });
                let mut seen = 0u64;
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match from_src.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut chunk = buf[..n].to_vec();
                    let flow = (tamper.lock().unwrap())(conn, seen, &mut chunk);
                    seen += n as u64;
                    if to_dst.write_all(&chunk).is_err() || flow == Flow::Cut {
                        break;
                    }
                    if flow == Flow::Stall {
                        stalled.store(true, Ordering::SeqCst);
                        // Hold both ends open, reading nothing, until the test is long over.
                        thread::sleep(Duration::from_secs(600));
                        break;
                    }
                }
                let _ = to_dst.shutdown(std::net::Shutdown::Both);
                let _ = from_src.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    Pair {
        ctl: open(paddr, client.as_deref()).unwrap(),
        addr: paddr,
        dest,
        tls: client,
    }
}

pub fn assert_exact(src: &FakeSource, dst: &FakeDest) {
    let mem = src.mem.lock().unwrap();
    let dmem = dst.mem.lock().unwrap();
    assert_eq!(mem.len(), dmem.len());
    for (i, (a, b)) in mem.chunks(PAGE).zip(dmem.chunks(PAGE)).enumerate() {
        assert!(a == b, "page {i} differs");
    }
    assert_eq!(*dst.state.lock().unwrap(), src.save_state().unwrap());
}

pub fn assert_rolled_back(src: &FakeSource, p: Pair) -> EngineError {
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
