//! Clusters of `ferry host` agents on loopback over a throwaway etcd (issue #13), every VM
//! the test guest writing its disk on the shared storage:
//! - `kill -9` of a host (agent and VMMs): the VM runs on the other host within 10 s with a
//!   higher epoch, the disk held every pass flushed before the kill, and the failed host,
//!   back, leaves the VM where it is;
//! - `SIGSTOP` of an agent past its TTL: its VMM fences itself (paused, disk unchanged
//!   from then to the takeover), the VM is taken over, and after `SIGCONT` the old agent
//!   kills its copy; a checker sampling both hosts' VMMs never sees two running.
mod common;
#[path = "../../cluster/tests/common/mod.rs"]
mod etcd;
use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SPAN: u64 = 256 << 10;
const GUEST: &str = "disk span=256K passes=0 hb=1000";

struct Agent {
    id: String,
    addr: String,
    run: PathBuf,
    store: String,
    storage: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    fn start(s: &Scratch, id: &str, store: &str) -> Agent {
        Self::start_with(s, id, store, &[])
    }

    fn start_with(s: &Scratch, id: &str, store: &str, extra: &[&str]) -> Agent {
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

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run.with_extension("log"))
            .unwrap();
        let child = Command::new(FERRY)
            .args(["host", "--id", &self.id, "--listen", &self.addr])
            .args(["--store", &self.store, "--ttl", "2", "--grace", "1"])
            .arg("--storage")
            .arg(&self.storage)
            .arg("--run-dir")
            .arg(&self.run)
            .args(&self.extra)
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
                "agent {} never answered",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// `kill -9` of the agent and every VMM it started.
    fn kill_host(&mut self) {
        // SAFETY: signalling our child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.take().unwrap().wait();
    }

    fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.run.join(format!("{vm}.console"))).unwrap_or_default()
    }

    fn metric(&self, name: &str) -> Option<u64> {
        let (_, body) = http(&self.addr, "GET", "/metrics", "");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
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

fn owner(addr: &str, vm: &str) -> Option<(String, i64)> {
    let (code, body) = http(addr, "GET", "/cluster/vms", "");
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let r = v.as_array()?.iter().find(|r| r["name"] == vm)?;
    Some((r["owner"].as_str()?.to_string(), r["epoch"].as_i64()?))
}

fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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
fn last_pass(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("K0 ")?.strip_suffix(" ok")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The disk after a crash: a prefix of sectors at pass P, the rest at P - 1, with P - 1 at
/// least `flushed` (every pass the guest saw flushed is there).
fn check_crashed_disk(img: &Path, flushed: u64) {
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

fn cluster(s: &Scratch) -> (etcd::Etcd, Agent, Agent) {
    std::fs::create_dir_all(s.path("storage")).unwrap();
    std::fs::File::create(s.path("storage/a.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = etcd::Etcd::start(1);
    let store = format!("etcd://{}", e.clients[0].trim_start_matches("http://"));
    let h1 = Agent::start(s, "h1", &store);
    let h2 = Agent::start(s, "h2", &store);
    let out = ferry(&[
        "cluster",
        "--agent",
        &h1.addr,
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
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (e, h1, h2)
}

#[test]
fn a_killed_hosts_vm_runs_elsewhere_within_10s_and_the_host_coming_back_leaves_it() {
    let s = Scratch::new("cluster-kill");
    let (_etcd, h1, h2) = cluster(&s);
    let mut hosts = [h1, h2];
    let (first, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&hosts[0].addr, "a")
    });
    let (x, y) = if first == "h1" { (0, 1) } else { (1, 0) };
    wait(
        "two passes on the first host",
        Duration::from_secs(30),
        || (last_pass(&hosts[x].console("a")) >= 2).then_some(()),
    );
    let flushed = last_pass(&hosts[x].console("a"));
    hosts[x].kill_host();
    let t0 = Instant::now();
    check_crashed_disk(&s.path("storage/a.raw"), flushed);
    let survivor = hosts[y].addr.clone();
    let (now, e2) = wait("the takeover", Duration::from_secs(15), || {
        owner(&survivor, "a").filter(|(h, _)| *h == hosts[y].id)
    });
    assert_eq!(now, hosts[y].id);
    assert!(e2 > e1, "epoch {e2} not above {e1}");
    wait(
        "the guest running on the survivor",
        Duration::from_secs(15),
        || hosts[y].console("a").contains("K0 1 ok").then_some(()),
    );
    let took = t0.elapsed();
    eprintln!(
        "failover: the guest wrote and checked a pass on the survivor {took:?} after the kill"
    );
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    assert_eq!(hosts[y].metric("ferry_agent_failovers_total"), Some(1));
    // The failed host comes back: it finds the VM owned elsewhere and does not start it.
    hosts[x].spawn();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hosts[x].metric("ferry_agent_vm_starts_total"), Some(0));
    assert_eq!(owner(&survivor, "a"), Some((hosts[y].id.clone(), e2)));
}

#[test]
fn a_paused_agent_is_fenced_taken_over_and_kills_its_copy_and_two_never_run() {
    let s = Scratch::new("cluster-stop");
    let (_etcd, h1, h2) = cluster(&s);
    let hosts = [h1, h2];
    let (first, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&hosts[0].addr, "a")
    });
    let (x, y) = if first == "h1" { (0, 1) } else { (1, 0) };
    wait("a pass on the first host", Duration::from_secs(30), || {
        (last_pass(&hosts[x].console("a")) >= 1).then_some(())
    });
    // The checker: every 20 ms, each host's VMM of "a"; never two running at once.
    let socks: Vec<PathBuf> = hosts.iter().map(|h| h.run.join("a.sock")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (both, samples) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let checker = {
        let (stop, both, samples) = (stop.clone(), both.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let running = socks
                    .iter()
                    .filter(|s| {
                        try_api(s, "GET", "/vm", "")
                            .is_some_and(|(c, b)| c == 200 && b.contains("\"state\":\"running\""))
                    })
                    .count();
                if running > 1 {
                    both.fetch_add(1, Ordering::SeqCst);
                }
                samples.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let old_sock = hosts[x].run.join("a.sock");
    hosts[x].signal(libc::SIGSTOP);
    // Its VMM runs on until its deadline (at most a TTL), then fences itself.
    wait("the old VMM fenced", Duration::from_secs(10), || {
        let (_, b) = try_api(&old_sock, "GET", "/vm", "")?;
        b.contains("\"state\":\"paused\"").then_some(())
    });
    let fenced = std::fs::read(s.path("storage/a.raw")).unwrap();
    let survivor = hosts[y].addr.clone();
    // Until the takeover, the disk stays as the fenced VMM left it.
    let mut last = fenced.clone();
    let e2 = wait("the takeover", Duration::from_secs(15), || {
        match owner(&survivor, "a") {
            Some((h, e)) if h == hosts[y].id => Some(e),
            _ => {
                last = std::fs::read(s.path("storage/a.raw")).unwrap();
                None
            }
        }
    });
    assert!(e2 > e1);
    assert!(
        last == fenced,
        "the fenced VMM's disk changed before the takeover"
    );
    let (_, f) = api(&old_sock, "GET", "/vm/fence", "");
    assert!(f.contains("\"expired\":true"), "{f}");
    eprintln!("the fenced VMM: {f}");
    wait("the guest on the survivor", Duration::from_secs(15), || {
        hosts[y].console("a").contains("K0 1 ok").then_some(())
    });
    // The old agent wakes: its membership is gone, it kills its copy and joins again.
    hosts[x].signal(libc::SIGCONT);
    wait("the old copy gone", Duration::from_secs(10), || {
        try_api(&old_sock, "GET", "/vm", "").is_none().then_some(())
    });
    wait("the old agent back", Duration::from_secs(10), || {
        (hosts[x].metric("ferry_agent_rejoins_total")? >= 1).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    checker.join().unwrap();
    assert_eq!(owner(&survivor, "a"), Some((hosts[y].id.clone(), e2)));
    let n = samples.load(Ordering::SeqCst);
    assert!(n > 50, "only {n} samples");
    assert_eq!(both.load(Ordering::SeqCst), 0, "two copies ran at once");
}

fn cli(agent: &Agent, args: &[&str]) -> String {
    let mut a = vec!["cluster", "--agent", &agent.addr];
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
fn first_pass(console: &str) -> Option<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("K0 ")?.strip_suffix(" ok")?.parse().ok())
}

#[test]
fn a_vm_moves_live_with_its_ownership_and_a_drain_takes_it_back() {
    let s = Scratch::new("cluster-move");
    let (_etcd, h1, h2) = cluster(&s);
    let hosts = [h1, h2];
    let (first, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&hosts[0].addr, "a")
    });
    let (x, y) = if first == "h1" { (0, 1) } else { (1, 0) };
    wait(
        "two passes on the first host",
        Duration::from_secs(30),
        || (last_pass(&hosts[x].console("a")) >= 2).then_some(()),
    );
    let img = s.path("storage/a.raw");
    // Live to the other host: the ownership moves at the switch-over, with a higher epoch
    // the disk has taken; the guest carries on where it was (no restart, no bad pass).
    let out = cli(&hosts[x], &["migrate", "a"]);
    assert!(out.contains("live in"), "{out}");
    let before = last_pass(&hosts[x].console("a"));
    let (now, e2) = owner(&hosts[y].addr, "a").unwrap();
    assert_eq!(now, hosts[y].id);
    assert!(e2 > e1);
    assert_eq!(ferry_storage::fence::current_epoch(&img).unwrap(), e2);
    wait("passes on the new host", Duration::from_secs(30), || {
        (last_pass(&hosts[y].console("a")) >= before + 2).then_some(())
    });
    let there = hosts[y].console("a");
    assert!(
        first_pass(&there).unwrap() >= before,
        "the guest restarted instead of moving: {there}"
    );
    assert!(!there.contains("BAD"), "{there}");
    // Nothing moves to a draining host; a drain brings the VM back, live.
    let (code, body) = http(
        &hosts[x].addr,
        "POST",
        &format!("/cluster/hosts/{}/drain", hosts[y].id),
        "",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"downtime_ms\""), "{body}");
    let (back, e3) = owner(&hosts[x].addr, "a").unwrap();
    assert_eq!(back, hosts[x].id);
    assert!(e3 > e2);
    let listing = cli(&hosts[x], &["hosts"]);
    assert!(listing.contains("draining"), "{listing}");
    let (code, body) = http(
        &hosts[x].addr,
        "POST",
        "/cluster/vms/a/migrate",
        &format!("{{\"to\":\"{}\"}}", hosts[y].id),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("draining"), "{body}");
    cli(&hosts[x], &["undrain", &hosts[y].id]);
    let mark = last_pass(&hosts[x].console("a"));
    wait("passes after the moves", Duration::from_secs(30), || {
        (last_pass(&hosts[x].console("a")) >= mark + 2).then_some(())
    });
    let home = hosts[x].console("a");
    assert!(!home.contains("BAD"), "{home}");
    // Each host started the VM at most once: the moves were migrations, not restarts.
    let starts: u64 = hosts
        .iter()
        .map(|h| h.metric("ferry_agent_vm_starts_total").unwrap())
        .sum();
    assert_eq!(starts, 1);
}

#[test]
fn the_balancer_moves_one_vm_off_an_overloaded_host_and_then_stays_still() {
    let s = Scratch::new("cluster-balance");
    std::fs::create_dir_all(s.path("storage")).unwrap();
    let e = etcd::Etcd::start(1);
    let store = format!("etcd://{}", e.clients[0].trim_start_matches("http://"));
    // Hosts offering one CPU each; two beating guests (about 0.45 CPU each here) on one:
    // ~90 %, over 60 % for 3 s. After one moves, each host is under 60 %.
    let policy = [
        "--cpus",
        "1",
        "--balance-high",
        "0.6",
        "--balance-low",
        "0.55",
        "--balance-sustain",
        "3",
    ];
    let h1 = Agent::start_with(&s, "h1", &store, &policy);
    for vm in ["b1", "b2"] {
        cli(
            &h1,
            &[
                "create",
                vm,
                "--memory",
                "32M",
                "--guest",
                "heartbeat period=1000",
            ],
        );
    }
    wait("both VMs on h1", Duration::from_secs(20), || {
        let both = ["b1", "b2"]
            .iter()
            .all(|v| owner(&h1.addr, v).is_some_and(|(h, _)| h == "h1"));
        both.then_some(())
    });
    let h2 = Agent::start_with(&s, "h2", &store, &policy);
    let t0 = Instant::now();
    wait("one move", Duration::from_secs(40), || {
        (h1.metric("ferry_agent_balance_moves_total")? >= 1).then_some(())
    });
    eprintln!(
        "balancer moved a VM {:?} after the second host joined",
        t0.elapsed()
    );
    let spread = wait("the move done", Duration::from_secs(20), || {
        let o: Vec<_> = ["b1", "b2"].iter().map(|v| owner(&h1.addr, v)).collect();
        let hosts: Vec<_> = o.iter().flatten().map(|(h, _)| h.clone()).collect();
        (hosts.len() == 2 && hosts[0] != hosts[1]).then_some(o)
    });
    let out = cli(&h2, &["balance", "--dry-run"]);
    eprintln!("{out}");
    assert!(out.contains("leader h1"), "{out}");
    // Then still: no VM moves again.
    std::thread::sleep(Duration::from_secs(8));
    let now: Vec<_> = ["b1", "b2"].iter().map(|v| owner(&h1.addr, v)).collect();
    assert_eq!(now, spread, "a VM moved again");
    assert_eq!(h1.metric("ferry_agent_balance_moves_total"), Some(1));
    let out = cli(&h2, &["balance", "--dry-run"]);
    assert!(out.contains("nothing to move"), "{out}");
    drop(h2);
}
