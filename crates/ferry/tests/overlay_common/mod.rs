//! What the overlay tests share (issue #14): scripts/netlab.sh's two sites (hosts `ha` in
//! P-a — and `hd` in P-d on the same LAN, when asked — and `hb` in P-b, across the delayed
//! WAN link) and a client namespace P-c; etcd in the
//! router's namespace; a `ferry host` agent in each (the client's is a gateway: no CPUs or
//! memory for VMs, it only joins the overlay); virtual network "blue" (VNI 42) and VM "v",
//! the test guest's TCP workload at CA 10.99.0.5. The test thread itself moves into P-c, so
//! everything it connects to it reaches as the client does.
#![allow(dead_code)]
use crate::common::*;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CA: &str = "10.99.0.5";
pub const CLIENT_CA: &str = "10.99.0.100";
pub const VNI: u32 = 42;
pub const PA_A: &str = "10.61.1.2";
/// Site A's second host.
pub const PA_D: &str = "10.61.1.3";
pub const PA_B: &str = "10.61.2.2";
pub const PA_C: &str = "10.61.3.2";

/// The ferry-wire binary: built beside the ferry binary (cargo builds it with the
/// workspace; alone, built here).
fn wire() -> String {
    let dir = std::path::Path::new(FERRY).parent().unwrap();
    let w = dir.join("ferry-wire");
    if !w.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "ferry-net", "--bin", "ferry-wire"])
            .status()
            .unwrap();
        assert!(st.success(), "building ferry-wire");
    }
    w.display().to_string()
}

fn script() -> String {
    format!("{}/../../scripts/netlab.sh", env!("CARGO_MANIFEST_DIR"))
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The network namespace the test started in (taken at the first topology's start).
static HOST_NS: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Moves the calling thread back into the namespace the test started in.
fn root_netns() {
    use std::os::fd::AsRawFd;
    let f = HOST_NS.get_or_init(|| std::fs::File::open("/proc/thread-self/ns/net").unwrap());
    // SAFETY: setns on a namespace file we opened; only this thread's namespace changes.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

/// The topology, etcd and the three agents; all torn down when dropped.
pub struct Overlay {
    pub p: String,
    pub scratch: Scratch,
    etcd: Option<Child>,
    pub etcd_url: String,
    pub agents: Vec<(String, String, Option<Child>)>,
    /// The agents balance: `ha` has one CPU, the others two, and a host over 50 % of its
    /// CPUs for 3 s sheds a VM to one that stays at or under 49 % (else `--no-balance`).
    balance: bool,
}

impl Overlay {
    /// Brings it all up with `delay_ms` each way on the WAN link (and `rate`, a tc rate).
    pub fn up(tag: &str, delay_ms: u32, rate: Option<&str>) -> Overlay {
        Self::up_with(tag, delay_ms, rate, false)
    }

    /// As [`Overlay::up`], with agent `hd` on site A's second host if asked.
    pub fn up_with(
        tag: &str,
        delay_ms: u32,
        rate: Option<&str>,
        second_host_in_a: bool,
    ) -> Overlay {
        Self::build(tag, delay_ms, rate, second_host_in_a, false)
    }

    /// As [`Overlay::up`], the agents balancing (see [`Overlay::balance`]): a VM that keeps
    /// a CPU busy on `ha` is moved to `hb` by the balancer.
    pub fn up_balancing(tag: &str, delay_ms: u32) -> Overlay {
        Self::build(tag, delay_ms, None, false, true)
    }

    fn build(
        tag: &str,
        delay_ms: u32,
        rate: Option<&str>,
        second_host_in_a: bool,
        balance: bool,
    ) -> Overlay {
        let p = format!("{tag}{}", std::process::id() % 1000);
        // An earlier topology of this process left this thread in its (deleted) client
        // namespace: back to the host's, where the new one is built.
        root_netns();
        let mut cmd = Command::new(script());
        cmd.args(["up", &p, "--delay-ms", &delay_ms.to_string()]);
        if let Some(r) = rate {
            cmd.args(["--rate", r]);
        }
        let out = cmd.env("FERRY_WIRE", wire()).output().unwrap();
        assert!(
            out.status.success(),
            "netlab.sh up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let scratch = Scratch::new(&format!("overlay-{tag}"));
        std::fs::create_dir_all(scratch.path("storage")).unwrap();
        let mut o = Overlay {
            p,
            scratch,
            etcd: None,
            etcd_url: String::new(),
            agents: Vec::new(),
            balance,
        };
        o.start_etcd();
        ferry_guest::tcp::enter_netns(&o.ns("c")).expect("into the client's namespace");
        for (id, ns, pa) in [("ha", "a", PA_A), ("hb", "b", PA_B), ("gw", "c", PA_C)] {
            o.start_agent(id, ns, pa);
        }
        if second_host_in_a {
            o.start_agent("hd", "d", PA_D);
        }
        o.cli(&["net", "create", "blue", "--vni", &VNI.to_string()]);
        // The client: an address on the network's bridge in the gateway's namespace.
        wait("the gateway's bridge", Duration::from_secs(10), || {
            o.exec("c", &["ip", "link", "show", &format!("fbr{VNI}")])
                .status
                .success()
                .then_some(())
        });
        let br = format!("fbr{VNI}");
        o.exec_ok(
            "c",
            &["ip", "addr", "add", &format!("{CLIENT_CA}/24"), "dev", &br],
        );
        o
    }

    pub fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.p)
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> String {
        let out = self.exec(ns, args);
        assert!(
            out.status.success(),
            "{args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_etcd(&mut self) {
        let url = "http://10.61.1.1:2379";
        let peer = "http://127.0.0.1:2380";
        let data = self.scratch.path("etcd");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("r"), "etcd", "--name", "m0"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .arg("--unsafe-no-fsync")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("etcd");
        self.etcd = Some(child);
        self.etcd_url = "etcd://10.61.1.1:2379".into();
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) etcd.
    pub fn etcd_signal(&self, sig: libc::c_int) {
        let pid = self.etcd.as_ref().unwrap().id() as i32;
        // SAFETY: signalling our child's process group.
        assert_eq!(unsafe { libc::kill(-pid, sig) }, 0);
    }

    fn start_agent(&mut self, id: &str, ns: &str, pa: &str) {
        let addr = format!("{pa}:7{}", 100 + self.agents.len());
        let run = self.scratch.path(id);
        let log = std::fs::File::create(run.with_extension("log")).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns), FERRY, "host", "--id", id])
            .args(["--listen", &addr, "--store", &self.etcd_url, "--insecure"])
            .args(["--provider-addr", pa, "--ttl", "4", "--grace", "2"]);
        if !self.balance {
            cmd.arg("--no-balance");
        } else if id != "gw" {
            let cpus = if id == "ha" { "1" } else { "2" };
            cmd.args([
                "--cpus",
                cpus,
                "--balance-high",
                "0.5",
                "--balance-low",
                "0.49",
            ])
            .args(["--balance-sustain", "3"]);
        }
        cmd.arg("--storage")
            .arg(self.scratch.path("storage"))
            .arg("--run-dir")
            .arg(&run);
        if id == "gw" {
            cmd.args(["--cpus", "0", "--memory", "0"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        self.agents.push((id.into(), addr.clone(), Some(child)));
        let t0 = Instant::now();
        while http(&addr, "GET", "/cluster/hosts", "").0 != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent {id} never answered: {}",
                std::fs::read_to_string(run.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn agent(&self, id: &str) -> &str {
        &self.agents.iter().find(|a| a.0 == id).unwrap().1
    }

    /// `kill -9` of host `id`: its agent and every VMM it started.
    pub fn kill_host(&mut self, id: &str) {
        let a = self.agents.iter_mut().find(|a| a.0 == id).unwrap();
        if let Some(mut c) = a.2.take() {
            // SAFETY: signalling our child's process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// `ferry cluster ARGS` through the gateway's agent.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut a = vec!["cluster", "--agent", self.agent("gw")];
        a.extend_from_slice(args);
        let out = ferry(&a);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// VM `vm`'s owner host and epoch.
    pub fn owner(&self, vm: &str) -> Option<(String, i64)> {
        let (_, body) = http(self.agent("gw"), "GET", "/cluster/vms", "");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let e = v.as_array()?.iter().find(|e| e["name"] == vm)?;
        Some((e["owner"].as_str()?.to_string(), e["epoch"].as_i64()?))
    }

    /// NIC `mac`'s map entry: (host, PA, CA).
    pub fn map_entry(&self, mac: &str) -> Option<(String, String, String)> {
        let (_, body) = http(self.agent("gw"), "GET", "/cluster/nets", "");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let e = v["map"].as_array()?.iter().find(|e| e["mac"] == mac)?;
        Some((
            e["host"].as_str()?.into(),
            e["pa"].as_str()?.into(),
            e["ca"].as_str()?.into(),
        ))
    }

    /// Where host namespace `ns`'s VXLAN device sends frames for `mac` (its static entry).
    pub fn fdb_dst(&self, ns: &str, mac: &str) -> Option<String> {
        let out = self.exec_ok(ns, &["bridge", "fdb", "show", "dev", &format!("fvx{VNI}")]);
        out.lines().filter(|l| l.starts_with(mac)).find_map(|l| {
            l.split(" dst ")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(String::from)
        })
    }

    /// Defines VM "v" (test guest `guest`, one NIC at CA with MAC `mac`) and waits until it
    /// runs and its stack is up; returns its host.
    pub fn create_vm(&self, guest: &str, mac: &str, cpus: u8) -> String {
        let nic = format!("network=blue,ca={CA},mac={mac}");
        self.cli(&[
            "create",
            "v",
            "--memory",
            "64M",
            "--cpus",
            &cpus.to_string(),
            "--guest",
            guest,
            "--nic",
            &nic,
        ]);
        let (h, _) = wait("an owner", Duration::from_secs(30), || self.owner("v"));
        wait("the guest's TCP stack", Duration::from_secs(30), || {
            self.console(&h, "v").contains("T0 up ").then_some(())
        });
        // Past the booted VM's announcement rounds (800 ms from its start), so that what a
        // test sees announced after a move is that move's.
        std::thread::sleep(Duration::from_millis(800));
        h
    }

    pub fn console(&self, host: &str, vm: &str) -> String {
        std::fs::read_to_string(self.scratch.path(host).join(format!("{vm}.console")))
            .unwrap_or_default()
    }

    pub fn log(&self, host: &str) -> String {
        std::fs::read_to_string(self.scratch.path(host).with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(c) = &mut a.2 {
                // SAFETY: signalling our child's process group.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                let _ = c.wait();
            }
        }
        if let Some(c) = &mut self.etcd {
            // SAFETY: as above.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
        let _ = Command::new(script()).args(["down", &self.p]).output();
    }
}

/// Polls `f` every 50 ms until it gives a value, at most `limit`.
pub fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The heartbeat lines (`H0 SEQ TSC`) of VM consoles, timestamped as they are written (the
/// files polled every millisecond): the guest-observed downtime of a move is the largest
/// gap between consecutive heartbeats, whichever host printed them.
pub struct Beats {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::collections::BTreeMap<u64, Instant>>>,
}

impl Beats {
    pub fn watch(files: Vec<std::path::PathBuf>) -> Beats {
        use std::io::{Read, Seek, SeekFrom};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = std::collections::BTreeMap::new();
            let mut at = vec![(0u64, String::new()); files.len()];
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                for (f, (off, partial)) in files.iter().zip(at.iter_mut()) {
                    let Ok(mut file) = std::fs::File::open(f) else {
                        continue;
                    };
                    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                    if len < *off {
                        (*off, *partial) = (0, String::new()); // truncated: a new VMM
                    }
                    if file.seek(SeekFrom::Start(*off)).is_err() {
                        continue;
                    }
                    let mut buf = String::new();
                    if let Ok(n) = file.read_to_string(&mut buf) {
                        *off += n as u64;
                    }
                    partial.push_str(&buf);
                    let now = Instant::now();
                    while let Some(i) = partial.find('\n') {
                        let line: String = partial.drain(..=i).collect();
                        let mut w = line.split_whitespace();
                        if w.next() == Some("H0") {
                            if let Some(seq) = w.next().and_then(|x| x.parse().ok()) {
                                seen.entry(seq).or_insert(now);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        Beats {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; the largest gap between consecutive heartbeats after `from`, and whether
    /// none was missing there.
    pub fn stop(self, from: Instant) -> (Duration, bool) {
        let (gap, _, whole) = self.stop_at(from);
        (gap, whole)
    }

    /// As [`Beats::stop`], with when the largest gap ended.
    pub fn stop_at(mut self, from: Instant) -> (Duration, Instant, bool) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = self.thread.take().unwrap().join().unwrap();
        let v: Vec<(u64, Instant)> = seen.into_iter().filter(|(_, t)| *t >= from).collect();
        let (gap, end) = v
            .windows(2)
            .map(|w| (w[1].1.saturating_duration_since(w[0].1), w[1].1))
            .max()
            .unwrap_or((Duration::ZERO, from));
        let whole = v.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        (gap, end, whole)
    }
}
