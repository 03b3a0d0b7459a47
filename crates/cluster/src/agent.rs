//! A host agent's reconcile loop (issue #13): what `ferry host` does every round, with the
//! VMM processes behind [`Runner`] so the logic is tested against a fake.
//!
//! Every round an agent:
//! 1. stops everything and returns [`AgentError::LeaseLost`] once its membership is lost (its
//!    deadline passed: it may no longer act as a member);
//! 2. moves every VMM's fence deadline on to its own membership deadline;
//! 3. kills any local VMM it no longer owns (at that VMM's epoch), stops the ones whose VM
//!    should be stopped, records the VMs whose guest powered off as stopped, and backs off
//!    before restarting one that crashed;
//! 4. starts each VM it owns that should run and does not, with the owner's epoch;
//! 5. publishes its VMs' CPU use (`/ferry/load/ID`, on its lease);
//! 6. if it holds the leader key (`/ferry/leader`, on its lease), places VMs without an owner
//!    and — once their owner's membership has been gone for the grace period — takes the VMs
//!    of a failed host over onto surviving ones, highest priority first.
//!
//! Every change of owner is `records::claim`, a compare-and-swap on the epoch read, so two
//! leaders for a moment (one whose lease just went) cannot both move a VM.
use crate::balance::{self, Balancer, Decision, HostLoad, Policy, VmLoad};
use crate::membership::{HostRecord, Membership, HOSTS};
use crate::records::{self, Desired, Owner, RecordError, VmRecord, OWNERS};
use crate::store::{Compare, Op, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The leader key: the id of the agent that places VMs and runs failover, on its lease.
pub const LEADER: &str = "/ferry/leader";
/// `/ferry/load/ID`: JSON `{"vm": cpus, ...}`, the CPUs each of a host's VMs used lately.
pub const LOADS: &str = "/ferry/load/";
/// `/ferry/drain/ID` exists while host ID is draining or drained: nothing is placed there.
pub const DRAIN: &str = "/ferry/drain/";
/// `/ferry/restore/NAME`: a snapshot directory (on the shared storage) the next start of VM
/// NAME resumes from instead of booting (a quick migration); deleted once started.
pub const RESTORE: &str = "/ferry/restore/";
/// The leader's latest balancing decision (JSON [`Decision`]), on its lease.
pub const BALANCE: &str = "/ferry/balance";

/// A VMM running on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct Local {
    pub name: String,
    /// The owner epoch it was started with (its fence's epoch).
    pub epoch: i64,
    /// Migrating in or out: left alone (not killed for another owner) until the hand-over
    /// settles.
    pub migrating: bool,
    /// CPU time its process has used so far, in seconds.
    pub cpu_seconds: f64,
}

/// A VMM that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    pub name: String,
    pub epoch: i64,
    /// Its exit code; None when a signal ended it.
    pub code: Option<i32>,
    /// It was migrating away (live or quick): whoever moves it settles its VM, not this exit.
    pub migrating: bool,
}

/// The VMM processes of one host.
pub trait Runner: Send {
    /// Starts VM `name` as its owner at `epoch`, fenced until `deadline`.
    fn start(
        &mut self,
        name: &str,
        spec: &serde_json::Value,
        epoch: i64,
        deadline: Instant,
    ) -> Result<(), String>;
    /// Shuts it down (bounded, then killed) and waits for it.
    fn stop(&mut self, name: &str);
    /// Kills it now and waits for it.
    fn kill(&mut self, name: &str);
    /// Moves every VMM's fence deadline on.
    fn renew(&mut self, deadline: Instant);
    fn running(&mut self) -> Vec<Local>;
    /// The VMMs that ended since the last call (not those stopped or killed by the agent).
    fn reap(&mut self) -> Vec<Exited>;
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// How long a host's membership must have been gone before its VMs are taken over
    /// (on top of its lease's TTL, which its VMMs' fences are already inside).
    pub grace: Duration,
    /// The first wait before restarting a crashed VM; it doubles up to 32 times this.
    pub restart_backoff: Duration,
    /// Automatic balancing by the leader (None: off).
    pub balance: Option<Policy>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grace: Duration::from_secs(2),
            restart_backoff: Duration::from_secs(1),
            balance: Some(Policy::default()),
        }
    }
}

/// What an agent counted (its `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub leader: bool,
    pub starts: u64,
    /// VMs this agent, as leader, took over from a failed host.
    pub failovers: u64,
    /// Local VMMs killed because another host owns their VM now.
    pub fenced_kills: u64,
    pub crashes: u64,
    /// Live migrations the balancer of this agent decided.
    pub balance_moves: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "host {0:?} lost its membership (lease gone or not renewed in time); its VMMs were killed"
    )]
    LeaseLost(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

pub struct Agent<R: Runner> {
    store: Arc<dyn Store>,
    member: Membership,
    runner: R,
    cfg: Config,
    /// Owner hosts seen without a membership record, since when.
    gone: HashMap<String, Instant>,
    /// VMs not to be restarted before a time, and the back-off that got them there.
    retry: HashMap<String, (Instant, Duration)>,
    /// The last CPU sample of each local VM.
    samples: HashMap<String, (Instant, f64)>,
    cpu: HashMap<String, f64>,
    last_load: Option<Instant>,
    stats: Arc<Mutex<Stats>>,
    balancer: Option<Balancer>,
    /// A move decided and not yet taken by the caller ([`Agent::take_move`]).
    pending: Option<(String, String, String)>,
    /// No balancing rounds while a move is in flight.
    moving: bool,
    published: Option<Decision>,
}

/// What the store holds, read once per round.
struct View {
    hosts: Vec<HostRecord>,
    vms: Vec<VmRecord>,
    owners: HashMap<String, Owner>,
}

fn memory_of(spec: &serde_json::Value) -> u64 {
    spec.get("memory_bytes")
        .and_then(|m| m.as_u64())
        .unwrap_or(0)
}

/// Each host's published VM loads.
pub fn loads(store: &dyn Store) -> Result<HashMap<String, f64>, StoreError> {
    let mut out = HashMap::new();
    for kv in store.list(LOADS)? {
        if let Ok(m) = serde_json::from_slice::<HashMap<String, f64>>(&kv.value) {
            out.extend(m);
        }
    }
    Ok(out)
}

/// The live hosts' records (a damaged one is skipped).
pub fn hosts(store: &dyn Store) -> Result<Vec<HostRecord>, StoreError> {
    Ok(store
        .list(HOSTS)?
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// Every VM's owner, by name.
pub fn owners(store: &dyn Store) -> Result<HashMap<String, Owner>, StoreError> {
    Ok(store
        .list(OWNERS)?
        .into_iter()
        .map(|kv| {
            let name = kv.key[OWNERS.len()..].to_string();
            let host = String::from_utf8_lossy(&kv.value).into_owned();
            (
                name,
                Owner {
                    host,
                    epoch: kv.mod_revision,
                },
            )
        })
        .collect())
}

/// The scores placement and balancing use: each live host and each owned VM's load.
pub fn scores(store: &dyn Store) -> Result<(Vec<HostLoad>, Vec<VmLoad>), RecordError> {
    let hosts = hosts(store)?;
    let drain: HashSet<String> = store
        .list(DRAIN)?
        .into_iter()
        .map(|kv| kv.key[DRAIN.len()..].to_string())
        .collect();
    let owners = owners(store)?;
    let cpu = loads(store)?;
    let hl = hosts
        .iter()
        .map(|h| HostLoad {
            id: h.id.clone(),
            cpus: f64::from(h.cpus),
            memory_bytes: h.memory_bytes,
            draining: drain.contains(&h.id),
        })
        .collect();
    let vl = records::vms(store)?
        .iter()
        .filter_map(|v| {
            let o = owners.get(&v.name)?;
            Some(VmLoad {
                name: v.name.clone(),
                host: o.host.clone(),
                cpu: cpu.get(&v.name).copied().unwrap_or(0.0),
                memory_bytes: memory_of(&v.spec),
            })
        })
        .collect();
    Ok((hl, vl))
}

impl<R: Runner> Agent<R> {
    pub fn new(store: Arc<dyn Store>, member: Membership, runner: R, cfg: Config) -> Agent<R> {
        Agent {
            store,
            member,
            runner,
            cfg,
            gone: HashMap::new(),
            retry: HashMap::new(),
            samples: HashMap::new(),
            cpu: HashMap::new(),
            last_load: None,
            stats: Arc::default(),
            balancer: cfg.balance.map(Balancer::new),
            pending: None,
            moving: false,
            published: None,
        }
    }

    pub fn id(&self) -> &str {
        self.member.id()
    }

    /// Until when this host may act as a member.
    pub fn deadline(&self) -> Instant {
        self.member.deadline()
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// The counters, shared with whoever serves them.
    pub fn stats(&self) -> Arc<Mutex<Stats>> {
        self.stats.clone()
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Kills every local VMM (the agent is going away without its membership).
    pub fn kill_all(&mut self) {
        for l in self.runner.running() {
            self.runner.kill(&l.name);
        }
    }

    /// Leaves the cluster: stops every local VMM gracefully, releases their VMs (so the
    /// leader places them elsewhere), then revokes the lease.
    pub fn leave(mut self) -> Result<(), AgentError> {
        let owners = owners(&*self.store)?;
        for l in self.runner.running() {
            self.runner.stop(&l.name);
            if owners.get(&l.name).map(|o| o.epoch) == Some(l.epoch) {
                let _ = records::release(&*self.store, &l.name, l.epoch);
            }
        }
        self.member.leave()?;
        Ok(())
    }

    fn view(&self) -> Result<View, AgentError> {
        Ok(View {
            hosts: hosts(&*self.store)?,
            vms: records::vms(&*self.store)?,
            owners: owners(&*self.store)?,
        })
    }

    /// One round (see the module's description).
    pub fn tick(&mut self) -> Result<(), AgentError> {
        if self.member.lost() {
            self.kill_all();
            return Err(AgentError::LeaseLost(self.id().into()));
        }
        let deadline = self.member.deadline();
        self.runner.renew(deadline);
        let mut v = self.view()?;
        if self.local(&v)? {
            v = self.view()?; // it changed records: act on what they say now
        }
        self.start_owned(&v, deadline);
        self.publish_load()?;
        let leader = self.lead()?;
        self.count(|s| s.leader = leader);
        if leader {
            self.assign(&v)?;
            self.balance()?;
        }
        Ok(())
    }

    /// The live migration the balancer decided, (VM, from, to), for the caller to run; it
    /// says when it ended with [`Agent::set_moving`].
    pub fn take_move(&mut self) -> Option<(String, String, String)> {
        self.pending.take()
    }

    /// While true no balancing round runs (a move is in flight).
    pub fn set_moving(&mut self, moving: bool) {
        self.moving = moving;
    }

    /// The leader's balancing round: at most one move, published with its reason.
    fn balance(&mut self) -> Result<(), AgentError> {
        if self.moving || self.pending.is_some() {
            return Ok(());
        }
        let Some(b) = self.balancer.as_mut() else {
            return Ok(());
        };
        let (hosts, vms) = scores(&*self.store)?;
        let now = Instant::now();
        let d = b.round(now, &hosts, &vms);
        if let Decision::Move { vm, from, to, why } = &d {
            tracing::warn!("balancer: moving VM {vm} from {from} to {to}: {why}");
            b.moved(vm, from, now);
            self.pending = Some((vm.clone(), from.clone(), to.clone()));
            self.count(|s| s.balance_moves += 1);
        }
        if self.published.as_ref() != Some(&d) {
            let op = Op::Put {
                key: BALANCE.into(),
                value: serde_json::to_vec(&d).unwrap_or_default(),
                lease: Some(self.member.lease()),
            };
            self.store.txn(&[], &[op])?;
            self.published = Some(d);
        }
        Ok(())
    }

    fn mine(&self, v: &View, name: &str, epoch: i64) -> bool {
        v.owners
            .get(name)
            .is_some_and(|o| o.host == self.id() && o.epoch == epoch)
    }

    /// Steps 3: exits, VMMs no longer ours, VMs to stop. True when it changed records.
    fn local(&mut self, v: &View) -> Result<bool, AgentError> {
        let mut changed = false;
        let now = Instant::now();
        for e in self.runner.reap() {
            self.samples.remove(&e.name);
            if e.migrating || !self.mine(v, &e.name, e.epoch) {
                continue;
            }
            if e.code == Some(0) {
                // The guest powered off (or was shut down): it stays off, as on any host.
                records::set_desired(&*self.store, &e.name, Desired::Stopped)?;
                let _ = records::release(&*self.store, &e.name, e.epoch);
                changed = true;
            } else {
                self.count(|s| s.crashes += 1);
                let b = self
                    .retry
                    .get(&e.name)
                    .map_or(self.cfg.restart_backoff, |(_, b)| {
                        (*b * 2).min(self.cfg.restart_backoff * 32)
                    });
                self.retry.insert(e.name.clone(), (now + b, b));
            }
        }
        for l in self.runner.running() {
            if l.migrating {
                continue;
            }
            if !self.mine(v, &l.name, l.epoch) {
                // Another host owns it now (or it was deleted): this copy must not run.
                self.runner.kill(&l.name);
                self.count(|s| s.fenced_kills += 1);
                continue;
            }
            let stopped = v
                .vms
                .iter()
                .any(|r| r.name == l.name && r.desired == Desired::Stopped);
            if stopped {
                self.runner.stop(&l.name);
                let _ = records::release(&*self.store, &l.name, l.epoch);
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Step 4: start what this host owns and should run.
    fn start_owned(&mut self, v: &View, deadline: Instant) {
        let now = Instant::now();
        let running: HashSet<String> = self.runner.running().into_iter().map(|l| l.name).collect();
        let mut todo: Vec<&VmRecord> = v.vms.iter().collect();
        todo.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        for r in todo {
            let Some(o) = v.owners.get(&r.name) else {
                continue;
            };
            if o.host != self.id() || running.contains(&r.name) {
                continue;
            }
            if r.desired == Desired::Stopped {
                let _ = records::release(&*self.store, &r.name, o.epoch);
                continue;
            }
            if self.retry.get(&r.name).is_some_and(|(t, _)| now < *t) {
                continue;
            }
            // A quick migration left its state to resume from.
            let key = format!("{RESTORE}{}", r.name);
            let from = self.store.get(&key).ok().flatten();
            let mut spec = r.spec.clone();
            if let Some(kv) = &from {
                spec["restore_from"] = String::from_utf8_lossy(&kv.value).into_owned().into();
            }
            match self.runner.start(&r.name, &spec, o.epoch, deadline) {
                Ok(()) => {
                    self.count(|s| s.starts += 1);
                    if let Some(kv) = from {
                        let when = [Compare::ModRevision(key.clone(), kv.mod_revision)];
                        let _ = self.store.txn(&when, &[Op::delete(key)]);
                    }
                }
                Err(why) => {
                    tracing::warn!("starting VM {}: {why}", r.name);
                    let b = self.cfg.restart_backoff * 4;
                    self.retry.insert(r.name.clone(), (now + b, b));
                }
            }
        }
    }

    /// Step 5: each local VM's CPU use since the last sample, published about once a second.
    fn publish_load(&mut self) -> Result<(), AgentError> {
        let now = Instant::now();
        for l in self.runner.running() {
            if let Some((t, s)) = self.samples.get(&l.name) {
                let dt = now.duration_since(*t).as_secs_f64();
                if dt >= 0.5 {
                    self.cpu
                        .insert(l.name.clone(), (l.cpu_seconds - s).max(0.0) / dt);
                    self.samples.insert(l.name.clone(), (now, l.cpu_seconds));
                }
            } else {
                self.samples.insert(l.name.clone(), (now, l.cpu_seconds));
            }
        }
        self.cpu.retain(|n, _| self.samples.contains_key(n));
        if self
            .last_load
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return Ok(());
        }
        self.last_load = Some(now);
        let b = serde_json::to_vec(&self.cpu).unwrap_or_default();
        let op = Op::Put {
            key: format!("{LOADS}{}", self.id()),
            value: b,
            lease: Some(self.member.lease()),
        };
        self.store.txn(&[], &[op])?;
        Ok(())
    }

    /// Holds the leader key, or takes it if no one does.
    fn lead(&self) -> Result<bool, AgentError> {
        let id = self.id();
        if let Some(kv) = self.store.get(LEADER)? {
            return Ok(kv.value == id.as_bytes() && kv.lease == Some(self.member.lease()));
        }
        let op = Op::Put {
            key: LEADER.into(),
            value: id.as_bytes().to_vec(),
            lease: Some(self.member.lease()),
        };
        let when = [
            Compare::Absent(LEADER.into()),
            Compare::Present(format!("{HOSTS}{id}")),
        ];
        Ok(self.store.txn(&when, &[op])?.succeeded)
    }

    /// Step 6 (the leader): place VMs without an owner; take over those of failed hosts.
    fn assign(&mut self, v: &View) -> Result<(), AgentError> {
        let now = Instant::now();
        let live: HashSet<&str> = v.hosts.iter().map(|h| h.id.as_str()).collect();
        self.gone
            .retain(|h, _| !live.contains(h.as_str()) && v.owners.values().any(|o| &o.host == h));
        let (hosts, mut vms) = scores(&*self.store)?;
        vms.retain(|l| live.contains(l.host.as_str()));
        let mut todo: Vec<&VmRecord> = v.vms.iter().collect();
        todo.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        for r in todo {
            let from = match v.owners.get(&r.name) {
                None if r.desired == Desired::Running => None,
                None => continue,
                Some(o) if live.contains(o.host.as_str()) => continue,
                Some(o) => {
                    let since = *self.gone.entry(o.host.clone()).or_insert(now);
                    if now.duration_since(since) < self.cfg.grace {
                        continue;
                    }
                    if r.desired == Desired::Stopped {
                        let _ = records::release(&*self.store, &r.name, o.epoch);
                        continue;
                    }
                    Some(o)
                }
            };
            let mem = memory_of(&r.spec);
            let Some(to) = balance::place(&hosts, &vms, mem) else {
                tracing::warn!("VM {}: no host has {mem} bytes free", r.name);
                continue;
            };
            match records::claim(&*self.store, &r.name, &to, from.map(|o| o.epoch)) {
                Ok(_) => {
                    if let Some(o) = from {
                        tracing::warn!("VM {}: host {} failed; restarting on {to}", r.name, o.host);
                        self.count(|s| s.failovers += 1);
                    }
                    vms.push(VmLoad {
                        name: r.name.clone(),
                        host: to,
                        cpu: 0.0,
                        memory_bytes: mem,
                    });
                }
                Err(RecordError::Conflict { .. } | RecordError::HostGone(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
