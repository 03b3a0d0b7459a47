//! The agent's VMMs: one `ferry run` process per VM, fenced (`--fence-epoch`,
//! `--fence-deadline-ns`), its API socket, console and log in the run directory.
use super::VmSpec;
use ferry_cluster::agent::{Exited, Local, Runner};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in each VMM's environment: the file it writes its exit code to (`main`), so an agent
/// that adopted it (and cannot wait for it: it is not its child) knows how it ended.
pub const EXIT_FILE_ENV: &str = "FERRY_EXIT_FILE";

/// A VMM process: started by this agent, or adopted from the agent before it.
enum Proc {
    Child(Child),
    /// Not our child: watched through /proc, its exit code read from its exit file.
    Adopted {
        pid: u32,
        exit_file: PathBuf,
    },
}

impl Proc {
    fn id(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// Some(exit code, None for a signal) once it has ended.
    fn try_wait(&mut self) -> Option<Option<i32>> {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten().map(|s| s.code()),
            Proc::Adopted { pid, exit_file } => {
                // Alive while /proc has it and its state (after the name) is not Z.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
                let state = stat
                    .as_deref()
                    .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start()));
                if state.is_some_and(|r| !r.starts_with('Z')) {
                    return None;
                }
                let code = std::fs::read_to_string(&*exit_file).ok();
                Some(code.and_then(|c| c.trim().parse().ok()))
            }
        }
    }

    fn kill(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted { pid, .. } => {
                // SAFETY: a signal to a process this agent runs the VMM of.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                let t0 = Instant::now();
                while self.try_wait().is_none() && t0.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

struct Vmm {
    child: Proc,
    epoch: i64,
    /// Migrating in or out: the agent leaves it alone until the hand-over settles it.
    migrating: bool,
    /// Arriving (a `ferry receive` whose VM does not run yet): its API is not served yet,
    /// its fence deadline comes with the hand-over.
    arriving: bool,
    socket: PathBuf,
    /// The fence deadline last handed to it (monotonic ns).
    renewed: u64,
    /// Its NICs' taps and MACs (deleted when it ends).
    taps: Vec<super::overlay::TapMac>,
    /// Its taps are the bridge's ports for its MACs (`overlay::pin`).
    pinned: bool,
}

pub struct Processes {
    exe: PathBuf,
    storage: PathBuf,
    run_dir: PathBuf,
    vmms: HashMap<String, Vmm>,
    exited: Vec<Exited>,
    /// Writes refused by the fences of VMMs killed since the last `take_refused`.
    refused: std::sync::atomic::AtomicU64,
    /// Certificate, key and CA for migrations (None: plain TCP).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// The host's part of the overlay (None: no provider address, no NICs on networks).
    pub overlay: Option<super::overlay::Overlay>,
}

/// `deadline` in nanoseconds of CLOCK_MONOTONIC (what `Instant` counts on Linux).
pub fn monotonic_ns(deadline: Instant) -> u64 {
    let now = Instant::now();
    let base = ferry_storage::fence::monotonic_ns();
    match deadline.checked_duration_since(now) {
        Some(d) => base.saturating_add(d.as_nanos() as u64),
        None => base.saturating_sub(now.duration_since(deadline).as_nanos() as u64),
    }
}

/// The API sockets in the run directory that something answers on: VMMs an earlier agent
/// of this run directory left behind.
fn live_sockets(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
        .collect()
}

/// Shuts down the VMM serving `sock` and waits (bounded) until it is gone.
fn shut_down(sock: &Path) {
    let _ = call(sock, hyper::Method::PUT, "/vm/shutdown", None);
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_ok()
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The process whose command line serves `sock` (`--api-socket SOCK`).
fn pid_serving(sock: &Path) -> Option<u32> {
    let want = sock.to_string_lossy();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        let c = std::fs::read(p.path().join("cmdline")).ok()?;
        let args: Vec<_> = c.split(|b| *b == 0).map(String::from_utf8_lossy).collect();
        args.windows(2)
            .any(|w| w[0] == "--api-socket" && w[1] == want)
            .then_some(pid)
    })
}

/// A disk spec with a relative `path=` resolved against the shared storage.
pub fn on_storage(spec: &str, storage: &Path) -> String {
    spec.split(',')
        .map(|kv| match kv.strip_prefix("path=") {
            Some(p) if !Path::new(p).is_absolute() => {
                format!("path={}", storage.join(p).display())
            }
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One API call to a VMM, bounded (a stopped VMM must not stall the agent): the body of a
/// 2xx answer.
fn call(socket: &Path, method: hyper::Method, uri: &str, body: Option<String>) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let req = crate::api::client::request(socket, method, uri, body);
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), req).await }) {
        Ok(Ok((200..=299, b))) => Some(b),
        _ => None,
    }
}

impl Processes {
    /// The VMMs of a new agent. Those an earlier agent left in `run_dir` are either
    /// adopted ([`Processes::adopt`]) or stopped ([`Processes::stop_orphans`]) once the
    /// agent knows whether it goes on as the same member.
    pub fn new(storage: PathBuf, run_dir: PathBuf) -> std::io::Result<Processes> {
        Ok(Processes {
            exe: std::env::current_exe()?,
            storage,
            run_dir,
            vmms: HashMap::new(),
            exited: Vec::new(),
            refused: Default::default(),
            tls: None,
            overlay: None,
        })
    }

    /// Resident memory of each VMM (bytes), for the metrics.
    pub fn resident(&self) -> HashMap<String, u64> {
        self.vmms
            .iter()
            .filter_map(|(n, v)| {
                let s = std::fs::read_to_string(format!("/proc/{}/status", v.child.id())).ok()?;
                let kb: u64 = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some((n.clone(), kb << 10))
            })
            .collect()
    }

    pub fn take_refused(&self) -> u64 {
        self.refused.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    fn wait_bounded(child: &mut Proc, limit: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if child.try_wait().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill();
    }

    /// Stops the VMMs an earlier agent of this run directory left behind (it was killed and
    /// this agent joined as a new member: they have fenced themselves by now, or will at
    /// their deadline, and their API sockets are in the way of the VMMs it starts).
    pub fn stop_orphans(&self) {
        for sock in live_sockets(&self.run_dir) {
            eprintln!(
                "ferry host: stopping a VMM left by an earlier agent ({})",
                sock.display()
            );
            shut_down(&sock);
        }
    }

    /// Takes over the VMMs an earlier agent of this run directory left behind, when this
    /// agent goes on as the same member (its lease held): each fenced VMM whose fence has
    /// not run out is run on at its epoch (the reconcile loop then keeps it if the owner
    /// record still names this host at that epoch, and kills it if not); any other is
    /// stopped. Returns how many were adopted.
    pub fn adopt(&mut self) -> usize {
        let mut n = 0;
        for sock in live_sockets(&self.run_dir) {
            let name = sock
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let fence = call(&sock, hyper::Method::GET, "/vm/fence", None)
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
            let live = fence
                .as_ref()
                .filter(|f| f["expired"] == false)
                .and_then(|f| f["epoch"].as_i64());
            match (live, pid_serving(&sock)) {
                (Some(epoch), Some(pid)) if !name.is_empty() => {
                    eprintln!(
                        "ferry host: adopting the VMM of {name} (pid {pid}, epoch {epoch}) \
                         left by the agent before"
                    );
                    self.vmms.insert(
                        name.clone(),
                        Vmm {
                            child: Proc::Adopted {
                                pid,
                                exit_file: self.exit_file(&name),
                            },
                            epoch,
                            migrating: false,
                            arriving: false,
                            socket: sock,
                            renewed: 0,
                            taps: Vec::new(),
                            pinned: true,
                        },
                    );
                    n += 1;
                }
                _ => {
                    eprintln!(
                        "ferry host: stopping a VMM left by an earlier agent ({}): fenced \
                         for good or not a VM of this host",
                        sock.display()
                    );
                    shut_down(&sock);
                }
            }
        }
        n
    }

    fn exit_file(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.exit"))
    }

    /// Names VMM `name`'s exit file in `cmd`'s environment, removing a stale one.
    fn exit_env(&self, cmd: &mut Command, name: &str) {
        let f = self.exit_file(name);
        let _ = std::fs::remove_file(&f);
        cmd.env(EXIT_FILE_ENV, f);
    }
}

/// CPU time (user + system), in seconds, in a `/proc/.../stat` line.
fn stat_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counted after the name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((ticks(11) + ticks(12)) / hz)
}

/// CPU time of a VMM's vCPU threads (named `vcpuN`), in seconds; of the whole process when
/// it has none.
fn cpu_seconds(pid: u32) -> f64 {
    let mut vcpus = None;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("vcpu") {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            *vcpus.get_or_insert(0.0) += stat_seconds(&stat).unwrap_or(0.0);
        }
    }
    vcpus.unwrap_or_else(|| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| stat_seconds(&s))
            .unwrap_or(0.0)
    })
}

impl Processes {
    /// Starts `ferry receive` for VM `name` arriving owned at `epoch`; returns where it
    /// listens. It runs only once this agent confirms the hand-over (`handed`).
    pub fn receive(
        &mut self,
        name: &str,
        epoch: i64,
        ip: std::net::IpAddr,
        agent: &str,
        host: &str,
    ) -> Result<String, String> {
        self.collect_exits(); // a VMM of it that has just ended (it left by migration)
        if self.vmms.contains_key(name) {
            return Err(format!("VM {name} already has a VMM on this host"));
        }
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let listen = std::net::SocketAddr::new(ip, port).to_string();
        // Its NICs' taps, under the names its state carries, before its state arrives.
        let taps = self.taps_for(name, None)?.0;
        let socket = self.run_dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let log_path = self.run_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["receive", "--listen", &listen]);
        match &self.tls {
            Some((c, k, ca)) => {
                cmd.arg("--tls-cert").arg(c).arg("--tls-key").arg(k);
                cmd.arg("--tls-ca").arg(ca);
            }
            None => {
                cmd.arg("--insecure");
            }
        }
        self.exit_env(&mut cmd, name);
        let child = cmd
            .arg("--api-socket")
            .arg(&socket)
            .arg("--console-log")
            .arg(self.run_dir.join(format!("{name}.console")))
            .args(["--fence-epoch", &epoch.to_string()])
            .args([
                "--cluster-agent",
                agent,
                "--cluster-vm",
                name,
                "--cluster-host",
                host,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                super::overlay::remove_taps(&taps);
                format!("starting {}: {e}", self.exe.display())
            })?;
        // It binds its API socket, then at once its port: wait for the socket.
        let t0 = Instant::now();
        while !socket.exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.vmms.insert(
            name.into(),
            Vmm {
                child: Proc::Child(child),
                epoch,
                migrating: true,
                arriving: true,
                socket,
                renewed: 0,
                taps,
                pinned: false,
            },
        );
        Ok(listen)
    }

    /// The hand-over to this host settled: the arriving VMM of `name` owns it at `epoch`.
    pub fn handed(&mut self, name: &str, epoch: i64) -> bool {
        self.pin(name);
        match self.vmms.get_mut(name) {
            Some(v) if v.arriving => {
                v.epoch = epoch;
                v.migrating = false;
                v.arriving = false;
                true
            }
            _ => false,
        }
    }

    /// Makes the taps of VM `name`'s VMM its MACs' bridge ports (once): done as soon as
    /// the VM is known to be this host's.
    pub fn pin(&mut self, name: &str) {
        if let Some(v) = self.vmms.get_mut(name).filter(|v| !v.pinned) {
            super::overlay::pin(&v.taps);
            v.pinned = true;
        }
    }

    pub fn socket(&self, name: &str) -> Option<PathBuf> {
        self.vmms.get(name).map(|v| v.socket.clone())
    }

    /// VMMs migrating in or out now.
    pub fn migrating(&self) -> usize {
        self.vmms.values().filter(|v| v.migrating).count()
    }

    /// Marks the VMM of `name` as leaving (or no longer): left alone until it exits.
    pub fn set_leaving(&mut self, name: &str, leaving: bool) -> Option<PathBuf> {
        let v = self.vmms.get_mut(name)?;
        v.migrating = leaving;
        Some(v.socket.clone())
    }
}

/// The agent's runner, shared with the cluster API (which starts arriving VMMs).
#[derive(Clone)]
pub struct SharedProcesses(pub std::sync::Arc<std::sync::Mutex<Processes>>);

impl SharedProcesses {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Processes> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Runner for SharedProcesses {
    fn start(
        &mut self,
        name: &str,
        spec: &serde_json::Value,
        epoch: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        self.lock().start(name, spec, epoch, deadline)
    }
    fn stop(&mut self, name: &str) {
        self.lock().stop(name)
    }
    fn kill(&mut self, name: &str) {
        self.lock().kill(name)
    }
    fn renew(&mut self, deadline: Instant) {
        self.lock().renew(deadline)
    }
    fn running(&mut self) -> Vec<Local> {
        self.lock().running()
    }
    fn reap(&mut self) -> Vec<Exited> {
        self.lock().reap()
    }
}

impl Runner for Processes {
    fn start(
        &mut self,
        name: &str,
        spec: &serde_json::Value,
        epoch: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        let spec: VmSpec =
            serde_json::from_value(spec.clone()).map_err(|e| format!("its spec: {e}"))?;
        let socket = self.run_dir.join(format!("{name}.sock"));
        let console = self.run_dir.join(format!("{name}.console"));
        let log_path = self.run_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let ns = monotonic_ns(deadline);
        let mut cmd = Command::new(&self.exe);
        if let Some(dir) = &spec.restore_from {
            // A quick migration's state: the configuration (disks included) comes with it.
            cmd.arg("restore").arg("--from").arg(dir);
        } else {
            cmd.arg("run")
                .args(["--cpus", &spec.cpus.to_string(), "--memory", &spec.memory]);
        }
        cmd.arg("--api-socket")
            .arg(&socket)
            .arg("--console-log")
            .arg(&console)
            .args(["--fence-epoch", &epoch.to_string()])
            .args(["--fence-deadline-ns", &ns.to_string()]);
        if spec.restore_from.is_none() {
            for d in &spec.disks {
                cmd.args(["--disk", &on_storage(d, &self.storage)]);
            }
            if let Some(g) = &spec.guest {
                cmd.args(["--guest", g]);
            }
            if let Some(k) = &spec.kernel {
                cmd.arg("--kernel").arg(self.storage.join(k));
            }
            if let Some(c) = &spec.cmdline {
                cmd.args(["--cmdline", c]);
            }
        }
        let (taps, nets) = self.taps_for(name, Some(&spec.nics))?;
        super::overlay::pin(&taps); // it runs here from the start
        if spec.restore_from.is_none() {
            for n in &nets {
                cmd.args(["--net", n]);
            }
        }
        self.exit_env(&mut cmd, name);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                super::overlay::remove_taps(&taps);
                format!("starting {}: {e}", self.exe.display())
            })?;
        tracing::info!("VM {name}: started (pid {}, epoch {epoch})", child.id());
        self.vmms.insert(
            name.into(),
            Vmm {
                child: Proc::Child(child),
                epoch,
                migrating: false,
                arriving: false,
                socket,
                renewed: ns,
                taps,
                pinned: true,
            },
        );
        Ok(())
    }

    fn stop(&mut self, name: &str) {
        if let Some(mut v) = self.vmms.remove(name) {
            let _ = call(&v.socket, hyper::Method::PUT, "/vm/shutdown", None);
            Self::wait_bounded(&mut v.child, Duration::from_secs(10));
            super::overlay::remove_taps(&v.taps);
        }
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut v) = self.vmms.remove(name) {
            // What its fence refused, for the metrics (a fenced VMM still answers).
            let fence = call(&v.socket, hyper::Method::GET, "/vm/fence", None)
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
            let refused = fence
                .as_ref()
                .and_then(|f| f["refused_writes"].as_u64())
                .unwrap_or(0);
            self.refused
                .fetch_add(refused, std::sync::atomic::Ordering::Relaxed);
            v.child.kill();
            super::overlay::remove_taps(&v.taps);
            tracing::warn!(
                "VM {name}: VMM killed (epoch {}); its fence had refused {refused} writes",
                v.epoch
            );
        }
    }

    fn renew(&mut self, deadline: Instant) {
        let ns = monotonic_ns(deadline);
        // An arriving VMM serves its API only once its VM runs; its deadline comes with the
        // hand-over (`handed_over`). A leaving one is renewed as any other: its migration may
        // take longer than a TTL.
        for v in self.vmms.values_mut().filter(|v| !v.arriving) {
            if ns > v.renewed {
                let body = format!("{{\"deadline_ns\":{ns}}}");
                if call(&v.socket, hyper::Method::PUT, "/vm/fence", Some(body)).is_some() {
                    v.renewed = ns;
                }
            }
        }
    }

    fn running(&mut self) -> Vec<Local> {
        self.collect_exits();
        self.vmms
            .iter()
            .map(|(n, v)| Local {
                name: n.clone(),
                epoch: v.epoch,
                migrating: v.migrating,
                cpu_seconds: cpu_seconds(v.child.id()),
            })
            .collect()
    }

    fn reap(&mut self) -> Vec<Exited> {
        self.collect_exits();
        std::mem::take(&mut self.exited)
    }
}

impl Processes {
    /// The taps for VM `name`'s NICs (`nics`, or read from its record) and their `--net`
    /// specs; none when it has no NICs.
    fn taps_for(
        &self,
        name: &str,
        nics: Option<&[ferry_cluster::net::Nic]>,
    ) -> Result<(Vec<super::overlay::TapMac>, Vec<String>), String> {
        let Some(o) = &self.overlay else {
            let has = match nics {
                Some(n) => !n.is_empty(),
                None => false,
            };
            return if has {
                Err(format!(
                    "VM {name} has NICs on virtual networks and this host has no \
                     --provider-addr"
                ))
            } else {
                Ok((Vec::new(), Vec::new()))
            };
        };
        let read;
        let nics = match nics {
            Some(n) => n,
            None => {
                read = o.nics_of_vm(name)?;
                &read
            }
        };
        if nics.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        o.taps(name, nics)
    }

    /// Moves the VMMs that ended to `exited` (no /proc reading: `reap` needs only this).
    fn collect_exits(&mut self) {
        let mut gone = Vec::new();
        for (n, v) in self.vmms.iter_mut() {
            if let Some(code) = v.child.try_wait() {
                gone.push((n.clone(), v.epoch, code, v.migrating));
            }
        }
        for (n, epoch, code, migrating) in gone {
            if let Some(v) = self.vmms.remove(&n) {
                super::overlay::remove_taps(&v.taps);
            }
            tracing::info!("VM {n}: its VMM exited ({code:?})");
            self.exited.push(Exited {
                name: n,
                epoch,
                code,
                migrating,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_disk_paths_are_on_the_shared_storage() {
        let st = Path::new("/srv/shared");
        assert_eq!(
            on_storage("path=a.raw,format=raw", st),
            "path=/srv/shared/a.raw,format=raw"
        );
        assert_eq!(
            on_storage("id=d,path=/abs/b.qcow2", st),
            "id=d,path=/abs/b.qcow2"
        );
    }

    #[test]
    fn cpu_time_of_this_process_is_read_from_proc() {
        let t0 = cpu_seconds(std::process::id());
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let t1 = cpu_seconds(std::process::id());
        assert!(t1 - t0 > 0.1, "{t0} -> {t1}");
    }

    #[test]
    fn a_deadline_becomes_monotonic_nanoseconds() {
        let now = ferry_storage::fence::monotonic_ns();
        let d = monotonic_ns(Instant::now() + Duration::from_secs(2));
        assert!(
            d >= now + 1_900_000_000 && d <= now + 2_100_000_000,
            "{now} {d}"
        );
        assert!(monotonic_ns(Instant::now() - Duration::from_secs(1)) < now);
    }
}
