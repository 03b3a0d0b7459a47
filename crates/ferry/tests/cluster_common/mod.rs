//! What the cluster tests share: `ferry host` agents on loopback over a throwaway etcd, the
//! test guest writing its disk on the shared directory, and checks of that disk.
#![allow(dead_code)]
#[path = "../../../cluster/tests/common/mod.rs"]
pub mod etcd;
use crate::common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SPAN: u64 = 256 << 10;
pub const GUEST: &str = "disk span=256K passes=0 hb=1000";

pub struct Agent {
    pub id: String,
    pub addr: String,
    pub run: PathBuf,
    pub store: String,
    pub storage: PathBuf,
    pub extra: Vec<String>,
    pub child: Option<Child>,
}

impl Agent {
    pub fn start(s: &Scratch, id: &str, store: &str) -> Agent {
        Self::start_with(s, id, store, &[])
    }

    pub fn start_with(s: &Scratch, id: &str, store: &str, extra: &[&str]) -> Agent {
        let mut a = Agent {
            id: id.into(),
            addr: format!("127.0.0.1:{}", free_port()),
            run: s.path(id),
            store: store.into(),
            storage: s.path("storage"),
            extra: extra.iter().map(|e| e.to_string()).collect(),
            child: None,
        };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run.with_extension("log"))
            .unwrap();
        let child = Command::new(FERRY)
            .args(["host", "--id", &self.id, "--listen", &self.addr])
            .args(["--store", &self.store])
            .args(if self.extra.iter().any(|e| e == "--ttl") {
                &[][..]
            } else {
                &["--ttl", "2", "--grace", "1"][..]
            })
            .arg("--storage")
            .arg(&self.storage)
            .arg("--run-dir")
            .arg(&self.run)
            .args(&self.extra)
            .args(if self.tls().is_some() {
                &[][..]
            } else {
                &["--insecure"][..]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0) // its VMMs too: `kill -9` of the whole host
            .spawn()
            .expect("spawn ferry host");
        self.child = Some(child);
        let t0 = Instant::now();
        while http(&self.addr, "GET", "/cluster/hosts", "").0 != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "agent {} never answered: {}",
                self.id,
                std::fs::read_to_string(self.run.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its `--tls-cert`, `--tls-key`, `--tls-ca` arguments, when its API is TLS.
    pub fn tls(&self) -> Option<Vec<String>> {
        let i = self.extra.iter().position(|e| e == "--tls-cert")?;
        Some(self.extra[i..].iter().take(6).cloned().collect())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// `kill -9` of the agent and every VMM it started.
    pub fn kill_host(&mut self) {
        // SAFETY: signalling our child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.take().unwrap().wait();
    }

    pub fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.run.join(format!("{vm}.console"))).unwrap_or_default()
    }

    pub fn metric(&self, name: &str) -> Option<u64> {
        metric_at(&self.addr, name)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // SAFETY: signalling our child's process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

pub fn owner(addr: &str, vm: &str) -> Option<(String, i64)> {
    let (code, body) = http(addr, "GET", "/cluster/vms", "");
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let r = v.as_array()?.iter().find(|r| r["name"] == vm)?;
    Some((r["owner"].as_str()?.to_string(), r["epoch"].as_i64()?))
}

pub fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The last pass the guest reported flushed and checked (`K0 <pass> ok`).
pub fn last_pass(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("K0 ")?.strip_suffix(" ok")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The disk after a crash: a prefix of sectors at pass P, the rest at P - 1, with P - 1 at
/// least `flushed` (every pass the guest saw flushed is there).
pub fn check_crashed_disk(img: &Path, flushed: u64) {
    use ferry_guest::pattern::{disk_word, SECTOR, WORDS_PER_SECTOR};
    let bytes = std::fs::read(img).unwrap();
    let mut passes = Vec::new();
    for s in 0..SPAN / SECTOR {
        let sec = &bytes[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let holds = |p: u64| {
            (0..WORDS_PER_SECTOR).all(|w| {
                let o = (w * 8) as usize;
                u64::from_le_bytes(sec[o..o + 8].try_into().unwrap()) == disk_word(s, p, w)
            })
        };
        let p = (0..flushed + 64)
            .find(|&p| holds(p))
            .unwrap_or_else(|| panic!("sector {s} holds no pass: corrupt"));
        passes.push(p);
    }
    let top = passes[0];
    assert!(
        passes.iter().all(|&p| p == top || p + 1 == top),
        "passes not a prefix/suffix: {passes:?}"
    );
    assert!(
        passes.windows(2).all(|w| w[0] >= w[1]),
        "a later sector at a newer pass: {passes:?}"
    );
    let oldest = *passes.last().unwrap();
    assert!(
        oldest >= flushed,
        "pass {flushed} was flushed but sector {} holds pass {oldest}",
        passes.len() - 1
    );
}

/// Creates VM "a" (the disk-writing guest on `storage/a.raw`, priority 5) through `agent`.
pub fn create_a(s: &Scratch, agent: &Agent) {
    std::fs::create_dir_all(s.path("storage")).unwrap();
    std::fs::File::create(s.path("storage/a.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    cli(
        agent,
        &[
            "create",
            "a",
            "--memory",
            "64M",
            "--disk",
            "path=a.raw",
            "--guest",
            GUEST,
            "--priority",
            "5",
        ],
    );
}

/// The store URL of an etcd's members.
pub fn etcd_url(e: &etcd::Etcd) -> String {
    let eps: Vec<_> = e
        .clients
        .iter()
        .map(|c| c.trim_start_matches("http://").to_string())
        .collect();
    format!("etcd://{}", eps.join(","))
}

/// One etcd, two agents, VM "a".
pub fn cluster(s: &Scratch) -> (etcd::Etcd, Agent, Agent) {
    std::fs::create_dir_all(s.path("storage")).unwrap();
    let e = etcd::Etcd::start(1);
    let store = etcd_url(&e);
    let h1 = Agent::start(s, "h1", &store);
    let h2 = Agent::start(s, "h2", &store);
    create_a(s, &h1);
    (e, h1, h2)
}

/// Samples the two hosts' VMMs of "a" (their API sockets) every 20 ms: how often both ran at
/// once. One sample asks A, then B, then A again; only all three answering "running" counts
/// (A running before and after B was seen running): asking one after the other could
/// otherwise catch a live migration's source just before and its destination just after a
/// switch-over of a few milliseconds.
pub struct TwoCopies {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u32, u32)>>,
}

fn running(sock: &Path) -> bool {
    try_api(sock, "GET", "/vm", "")
        .is_some_and(|(c, b)| c == 200 && b.contains("\"state\":\"running\""))
}

impl TwoCopies {
    pub fn watch(socks: Vec<PathBuf>) -> TwoCopies {
        use std::sync::atomic::Ordering;
        assert_eq!(socks.len(), 2);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut both, mut samples) = (0, 0);
            while !s2.load(Ordering::SeqCst) {
                if running(&socks[0]) && running(&socks[1]) && running(&socks[0]) {
                    both += 1;
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (both, samples)
        });
        TwoCopies {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops: (samples that saw two copies running, samples).
    pub fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }

    /// Stops; asserts it sampled enough and never saw two copies running.
    pub fn check(self) {
        let (both, samples) = self.finish();
        assert!(samples > 50, "only {samples} samples");
        assert_eq!(
            both, 0,
            "two copies ran at once ({both} of {samples} samples)"
        );
    }
}

pub fn cli(agent: &Agent, args: &[&str]) -> String {
    let tls = agent.tls().unwrap_or_default();
    let mut a = vec!["cluster", "--agent", &agent.addr];
    a.extend(tls.iter().map(String::as_str));
    a.extend_from_slice(args);
    let out = ferry(&a);
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "ferry {args:?}: {e}{o}");
    o
}

/// The first pass a console reports.
pub fn first_pass(console: &str) -> Option<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("K0 ")?.strip_suffix(" ok")?.parse().ok())
}
