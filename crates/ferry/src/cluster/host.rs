//! `ferry host`: join the cluster, run the reconcile loop every 250 ms, serve the cluster
//! API. Losing the membership kills this host's VMMs (they have fenced themselves by then)
//! and joins again; SIGTERM or SIGINT stops the VMs gracefully, hands them back to the
//! cluster and leaves.
use super::args::HostArgs;
use super::runner::{Processes, SharedProcesses};
use anyhow::{bail, Context, Result};
use ferry_cluster::agent::{Agent, AgentError, Config, Stats};
use ferry_cluster::membership::{valid_id, DeadlineWatch, HostRecord, MemberError, Membership};
use ferry_cluster::store::{EtcdStore, MemStore};
use ferry_cluster::Store;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A hand-over read ahead (when its live migration began).
pub struct Prepared {
    pub from: i64,
    pub to: String,
    /// The claim's map writes.
    pub map: Vec<ferry_cluster::Op>,
    /// What arrives for the VM's NICs here, and the new host's agent to forward it to.
    pub capture: Option<Arc<super::forward::Forwarder>>,
}

/// What the API serves besides the store.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub id: String,
    /// Where this agent's API listens.
    pub addr: String,
    /// The shared storage.
    pub storage: PathBuf,
    pub runner: SharedProcesses,
    /// This host's membership deadline (CLOCK_MONOTONIC ns), for VMMs arriving by migration.
    pub deadline_ns: std::sync::atomic::AtomicU64,
    pub stats: Mutex<Arc<Mutex<Stats>>>,
    /// Resident memory of each local VMM.
    pub resident: Mutex<HashMap<String, u64>>,
    /// Membership losses survived (the agent joined again).
    pub rejoins: Mutex<u64>,
    /// Writes refused by the fences of VMMs this agent killed.
    pub refused: Mutex<u64>,
    /// Live migrations away from this host that completed, and the last one's report.
    pub migrations: Mutex<(u64, serde_json::Value)>,
    /// Hand-overs of live migrations under way from here: VM → (from epoch, to host, the
    /// claim's map writes), read when each began.
    pub prepared: Mutex<HashMap<String, Prepared>>,
    /// Frames forwarded to a VM's new host after its switch-over, and frames injected
    /// here for VMs that arrived.
    pub forwarded: std::sync::atomic::AtomicU64,
    pub injected: std::sync::atomic::AtomicU64,
    /// VMs arriving here by live migration: their owner record as a watch (or a read)
    /// first reported it after the hand-over (`moves::handed`).
    pub arrivals: Mutex<HashMap<String, Arrival>>,
}

/// The owner of an arriving VM once known, and who waits for it.
pub type Arrival = Arc<(
    Mutex<Option<ferry_cluster::records::Owner>>,
    std::sync::Condvar,
)>;

impl Shared {
    pub fn prepare(&self, vm: &str, p: Prepared) {
        let mut all = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        all.insert(vm.into(), p);
    }

    /// The map writes read ahead for VM `vm`'s hand-over from epoch `from` to host `to`,
    /// and its capture.
    pub fn prepared(
        &self,
        vm: &str,
        from: i64,
        to: &str,
    ) -> Option<(
        Vec<ferry_cluster::Op>,
        Option<Arc<super::forward::Forwarder>>,
    )> {
        let p = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        p.get(vm)
            .filter(|p| p.from == from && p.to == to)
            .map(|p| (p.map.clone(), p.capture.clone()))
    }

    pub fn prepared_done(&self, vm: &str) {
        let mut p = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(vm);
    }

    pub fn record_migration(&self, report: &serde_json::Value) {
        let mut m = self.migrations.lock().unwrap_or_else(|e| e.into_inner());
        m.0 += 1;
        m.1 = report.clone();
    }
}

/// Opens `--store`.
pub fn open_store(url: Option<&str>, run_dir: &Path) -> Result<Arc<dyn Store>> {
    let default = format!("file:{}", run_dir.join("cluster.json").display());
    let url = url.unwrap_or(&default);
    if let Some(list) = url.strip_prefix("etcd://") {
        let eps: Vec<String> = list
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|e| format!("http://{e}"))
            .collect();
        if eps.is_empty() {
            bail!("--store {url}: no etcd endpoint (etcd://HOST:PORT[,HOST:PORT...])");
        }
        return Ok(Arc::new(EtcdStore::connect(&eps)?));
    }
    if let Some(path) = url.strip_prefix("file:") {
        return Ok(Arc::new(MemStore::open(Path::new(path))?));
    }
    bail!("--store {url}: expected etcd://HOST:PORT[,...] or file:PATH")
}

fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
            l.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .map_or(0, |kb| kb << 10)
}

/// Moves every VMM's fence deadline on as soon as the membership's moves (every 100 ms,
/// until the membership is lost or left), on a thread of its own: a reconcile round can sit
/// in store calls for seconds (etcd electing a new leader), and the renewals that did get
/// through must reach the VMMs meanwhile, or they fence themselves with the host alive.
fn renew_fences(watch: DeadlineWatch, mut runner: SharedProcesses, shared: Arc<Shared>) {
    let r = std::thread::Builder::new()
        .name("ferry-fences".into())
        .spawn(move || {
            while let Some(d) = watch.current() {
                ferry_cluster::agent::Runner::renew(&mut runner, d);
                shared
                    .deadline_ns
                    .store(super::runner::monotonic_ns(d), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    if let Err(e) = r {
        tracing::warn!("no fence renewal thread (the reconcile loop renews them): {e}");
    }
}

/// The membership the agent before this one left in `lease_file`, if its lease still
/// holds the host's record.
fn resume(
    store: &Arc<dyn Store>,
    rec: &HostRecord,
    ttl: Duration,
    lease_file: &Path,
) -> Option<Membership> {
    let lease: i64 = std::fs::read_to_string(lease_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    match Membership::resume(store.clone(), rec, ttl, lease) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "ferry host {}: resuming lease {lease:x}: {e}; joining anew",
                rec.id
            );
            None
        }
    }
}

fn join(store: &Arc<dyn Store>, rec: &HostRecord, ttl: Duration) -> Result<Option<Membership>> {
    let mut said = false;
    while !STOP.load(Ordering::SeqCst) {
        match Membership::join(store.clone(), rec, ttl) {
            Ok(m) => return Ok(Some(m)),
            Err(MemberError::IdTaken(_)) => {
                if !said {
                    eprintln!(
                        "ferry host {}: the id is still held by an earlier lease; waiting for it to end",
                        rec.id
                    );
                    said = true;
                }
            }
            Err(MemberError::Store(e)) => {
                if !said {
                    eprintln!("ferry host {}: {e}; retrying", rec.id);
                    said = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(None)
}

pub fn main(args: HostArgs) -> Result<i32> {
    if !valid_id(&args.id) {
        bail!(
            "--id {:?}: ids are 1-64 letters, digits, '-', '_' or '.'",
            args.id
        );
    }
    if !args.storage.is_dir() {
        bail!(
            "--storage {}: not a directory (the storage every host sees)",
            args.storage.display()
        );
    }
    if !(args.grace.is_finite() && (0.0..=600.0).contains(&args.grace)) {
        bail!("--grace {}: expected 0 to 600 seconds", args.grace);
    }
    let storage = args.storage.canonicalize()?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/ferry").join(&args.id));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("--run-dir {}", run_dir.display()))?;
    let memory_bytes = match &args.memory {
        Some(m) => ferry_vmm::memory::parse_size(m)?,
        None => host_memory(),
    };
    let cpus = args
        .cpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let listener = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("--listen {}", args.listen))?;
    let store = open_store(args.store.as_deref(), &run_dir)?;
    let rec = HostRecord {
        version: 1,
        id: args.id.clone(),
        addr: listener.local_addr()?.to_string(),
        cpus,
        memory_bytes,
        pa: args.provider_addr,
    };
    let mut procs = Processes::new(storage.clone(), run_dir.clone())?;
    procs.tls = args.tls.paths();
    if let Some(pa) = args.provider_addr {
        // A provider address must be this host's: VXLAN sends from it.
        std::net::UdpSocket::bind((pa, 0))
            .with_context(|| format!("--provider-addr {pa}: not an address of this host"))?;
        let o = super::overlay::Overlay {
            store: store.clone(),
            pa,
        };
        o.clone().spawn().context("the overlay's thread")?;
        procs.overlay = Some(o);
    }
    let api_tls = match args.tls.files() {
        Some(files) => {
            super::secure::use_tls(&files)?;
            Some(Arc::new(ferry_migration::tls::TlsServer::new(&files)?))
        }
        None => {
            eprintln!(
                "ferry host {}: --insecure: the cluster API answers anyone who reaches {} and \
                 live migrations between hosts run over plain TCP (not authenticated, not \
                 encrypted)",
                args.id, args.listen
            );
            None
        }
    };
    let runner = SharedProcesses(Arc::new(Mutex::new(procs)));
    let shared = Arc::new(Shared {
        store: store.clone(),
        id: args.id.clone(),
        addr: rec.addr.clone(),
        storage: storage.clone(),
        runner: runner.clone(),
        deadline_ns: Default::default(),
        stats: Mutex::default(),
        resident: Mutex::default(),
        rejoins: Mutex::default(),
        refused: Mutex::default(),
        migrations: Mutex::new((0, serde_json::Value::Null)),
        prepared: Mutex::default(),
        forwarded: Default::default(),
        injected: Default::default(),
        arrivals: Mutex::default(),
    });
    let _api = super::api::spawn(listener, api_tls, shared.clone())?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let secs = |v: f64, what: &str| {
        if v.is_finite() && (0.0..=86400.0).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!("--{what} {v}: expected 0 to 86400 seconds"))
        }
    };
    if !(0.0 < args.balance_low && args.balance_low < args.balance_high && args.balance_high <= 1.0)
    {
        bail!("balancing thresholds: expected 0 < --balance-low < --balance-high <= 1");
    }
    let policy = ferry_cluster::balance::Policy {
        high: args.balance_high,
        low: args.balance_low,
        sustain: secs(args.balance_sustain, "balance-sustain")?,
        backoff: secs(args.balance_backoff, "balance-backoff")?,
    };
    let cfg = Config {
        grace: Duration::from_secs_f64(args.grace),
        balance: (!args.no_balance).then_some(policy),
        ..Config::default()
    };
    let moving = Arc::new(AtomicBool::new(false));
    let ttl = Duration::from_secs(args.ttl);
    let lease_file = run_dir.join("lease");
    let mut first = true;
    loop {
        // A restarted agent goes on as the same member while the lease it left still holds
        // (then it adopts the VMMs it left); otherwise it joins anew and stops them.
        let resumed = if first {
            resume(&store, &rec, ttl, &lease_file)
        } else {
            None
        };
        let member = match resumed {
            Some(m) => {
                let n = runner.lock().adopt();
                eprintln!(
                    "ferry host {}: went on as the same member (lease {:x}): adopted {n} \
                     VMM(s) left running",
                    rec.id,
                    m.lease()
                );
                m
            }
            None => {
                let Some(m) = join(&store, &rec, ttl)? else {
                    return Ok(0);
                };
                if first {
                    runner.lock().stop_orphans();
                }
                m
            }
        };
        first = false;
        if let Err(e) = std::fs::write(&lease_file, format!("{}\n", member.lease())) {
            tracing::warn!(
                "{}: {e} (a restart will not go on as this member)",
                lease_file.display()
            );
        }
        renew_fences(member.watch(), runner.clone(), shared.clone());
        let mut agent = Agent::new(store.clone(), member, runner.clone(), cfg);
        *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = agent.stats();
        eprintln!(
            "ferry host {}: member of the cluster at {} (lease TTL {}s), API on {}",
            rec.id,
            store.endpoint(),
            args.ttl,
            rec.addr
        );
        loop {
            if STOP.load(Ordering::SeqCst) {
                eprintln!("ferry host {}: stopping its VMs and leaving", rec.id);
                let _ = std::fs::remove_file(&lease_file);
                agent.leave()?;
                return Ok(0);
            }
            agent.set_moving(moving.load(Ordering::SeqCst));
            match agent.tick() {
                Ok(()) => {}
                Err(e @ AgentError::LeaseLost(_)) => {
                    eprintln!("ferry host {}: {e}; joining again", rec.id);
                    *shared.rejoins.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                    break;
                }
                Err(e) => tracing::warn!("reconcile: {e}"),
            }
            *shared.resident.lock().unwrap_or_else(|e| e.into_inner()) = runner.lock().resident();
            *shared.refused.lock().unwrap_or_else(|e| e.into_inner()) +=
                runner.lock().take_refused();
            if let Some((vm, _, to)) = agent.take_move() {
                moving.store(true, Ordering::SeqCst);
                let (moving, addr) = (moving.clone(), rec.addr.clone());
                std::thread::spawn(move || {
                    let body = serde_json::json!({ "to": to }).to_string();
                    let uri = format!("/cluster/vms/{vm}/migrate");
                    let r = super::client::call_long(
                        &addr,
                        hyper::Method::POST,
                        &uri,
                        Some(body),
                        Duration::from_secs(3600),
                    );
                    if let Err(e) = r {
                        eprintln!("ferry host: balancing move of {vm} to {to} failed: {e:#}");
                    }
                    moving.store(false, Ordering::SeqCst);
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
