//! The host agent's reconcile loop against a fake runner on the embedded store: a VM is
//! placed and started with its owner's epoch; a failed host's VMs are taken over only after
//! the grace period, with a higher epoch, and the failed host, still running, kills its copy;
//! a guest that powers off stays off; a crash is restarted after a back-off; a host that
//! comes back does not start VMs owned elsewhere.
use ferry_cluster::agent::{Agent, Config, Exited, Local, Runner, Stats, BALANCE, LEADER};
use ferry_cluster::balance::Policy;
use ferry_cluster::membership::{HostRecord, Membership};
use ferry_cluster::records::{self, Desired, VmRecord};
use ferry_cluster::store::MemStore;
use ferry_cluster::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the fake runner's host runs: name → (epoch, started how many times).
#[derive(Default)]
struct Host {
    running: HashMap<String, i64>,
    /// CPUs each VM uses (its CPU time grows at this rate from when it started).
    busy: HashMap<String, (Instant, f64)>,
    exited: Vec<Exited>,
    starts: HashMap<String, u32>,
    killed: Vec<String>,
    deadline: Option<Instant>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Host>>);

impl Fake {
    fn get(&self) -> std::sync::MutexGuard<'_, Host> {
        self.0.lock().unwrap()
    }
    /// The VMM of `name` ends by itself with `code`.
    fn exit(&self, name: &str, code: i32) {
        let mut h = self.get();
        let epoch = h.running.remove(name).expect("running");
        h.exited.push(Exited {
            name: name.into(),
            epoch,
            code: Some(code),
            migrating: false,
        });
    }
}

impl Runner for Fake {
    fn start(
        &mut self,
        name: &str,
        _spec: &serde_json::Value,
        epoch: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut h = self.get();
        h.running.insert(name.into(), epoch);
        *h.starts.entry(name.into()).or_default() += 1;
        h.busy.insert(name.into(), (Instant::now(), 0.9));
        h.deadline = Some(deadline);
        Ok(())
    }
    fn stop(&mut self, name: &str) {
        self.get().running.remove(name);
    }
    fn kill(&mut self, name: &str) {
        let mut h = self.get();
        h.running.remove(name);
        h.killed.push(name.into());
    }
    fn renew(&mut self, deadline: Instant) {
        self.get().deadline = Some(deadline);
    }
    fn running(&mut self) -> Vec<Local> {
        let h = self.get();
        h.running
            .iter()
            .map(|(n, e)| Local {
                name: n.clone(),
                epoch: *e,
                migrating: false,
                cpu_seconds: h
                    .busy
                    .get(n)
                    .map_or(0.0, |(t, r)| t.elapsed().as_secs_f64() * r),
            })
            .collect()
    }
    fn reap(&mut self) -> Vec<Exited> {
        std::mem::take(&mut self.get().exited)
    }
}

const TTL: Duration = Duration::from_secs(1);

fn cfg() -> Config {
    Config {
        grace: Duration::from_millis(300),
        restart_backoff: Duration::from_millis(200),
        balance: None,
    }
}

fn join(store: &Arc<dyn Store>, id: &str) -> (Agent<Fake>, Fake) {
    let rec = HostRecord {
        version: 1,
        id: id.into(),
        addr: "127.0.0.1:1".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        pa: None,
    };
    let m = Membership::join(store.clone(), &rec, TTL).unwrap();
    let fake = Fake::default();
    (Agent::new(store.clone(), m, fake.clone(), cfg()), fake)
}

fn define(store: &Arc<dyn Store>, name: &str, priority: i32) {
    records::define(
        &**store,
        &VmRecord {
            version: 1,
            name: name.into(),
            spec: serde_json::json!({"memory_bytes": 64u64 << 20}),
            desired: Desired::Running,
            priority,
        },
    )
    .unwrap();
}

fn stats(a: &Agent<Fake>) -> Stats {
    a.stats().lock().unwrap().clone()
}

#[test]
fn a_vm_is_placed_and_started_with_its_owners_epoch() {
    let store: Arc<dyn Store> = Arc::new(MemStore::in_memory());
    let (mut a, fa) = join(&store, "a");
    let (mut b, fb) = join(&store, "b");
    define(&store, "x", 0);
    define(&store, "y", 0);
    for _ in 0..2 {
        a.tick().unwrap();
        b.tick().unwrap();
    }
    assert!(stats(&a).leader && !stats(&b).leader);
    let ox = records::owner(&*store, "x").unwrap().unwrap();
    let oy = records::owner(&*store, "y").unwrap().unwrap();
    assert_ne!(ox.host, oy.host, "idle VMs spread over the hosts");
    let (fx, fy) = if ox.host == "a" {
        (&fa, &fb)
    } else {
        (&fb, &fa)
    };
    assert_eq!(fx.get().running.get("x"), Some(&ox.epoch));
    assert_eq!(fy.get().running.get("y"), Some(&oy.epoch));
    // The fence deadline handed over is the membership's, ahead and within a TTL.
    let d = fa.get().deadline.unwrap();
    assert!(d > Instant::now() && d <= Instant::now() + TTL);
}

#[test]
fn a_failed_hosts_vms_move_after_the_grace_with_a_higher_epoch_and_its_copy_is_killed() {
    let store: Arc<dyn Store> = Arc::new(MemStore::in_memory());
    let (mut a, fa) = join(&store, "a");
    define(&store, "lo", 1);
    define(&store, "hi", 5);
    a.tick().unwrap(); // a, alone, places both on itself
    let (mut b, fb) = join(&store, "b");
    a.tick().unwrap();
    b.tick().unwrap();
    let before: HashMap<_, _> = fa.get().running.clone();
    assert_eq!(before.len(), 2, "{before:?}");
    // a's lease ends behind its back (as if it had been partitioned from the store).
    let lease = store.get("/ferry/hosts/a").unwrap().unwrap().lease.unwrap();
    store.revoke(lease).unwrap();
    let t0 = Instant::now();
    b.tick().unwrap(); // b notices a gone (and takes the leader key a's lease held)
    assert!(store.get(LEADER).unwrap().is_some());
    assert!(fb.get().running.is_empty(), "taken over before the grace");
    while t0.elapsed() < cfg().grace + Duration::from_millis(100) {
        std::thread::sleep(Duration::from_millis(50));
    }
    b.tick().unwrap(); // claims
    b.tick().unwrap(); // starts
    assert_eq!(stats(&b).failovers, 2);
    for (n, e) in &before {
        let o = records::owner(&*store, n).unwrap().unwrap();
        assert_eq!(o.host, "b");
        assert!(o.epoch > *e, "{n}: epoch {} not above {e}", o.epoch);
        assert_eq!(fb.get().running.get(n), Some(&o.epoch));
    }
    // The old host, still running its copies, kills them: at its next round it finds its
    // membership lost, or the VMs owned elsewhere.
    let r = a.tick();
    assert!(fa.get().running.is_empty(), "{r:?}");
    assert_eq!(fa.get().killed.len(), 2);
}

#[test]
fn a_guest_that_powers_off_stays_off_and_a_crash_is_restarted_after_a_back_off() {
    let store: Arc<dyn Store> = Arc::new(MemStore::in_memory());
    let (mut a, fa) = join(&store, "a");
    define(&store, "off", 0);
    define(&store, "crash", 0);
    a.tick().unwrap();
    a.tick().unwrap();
    assert_eq!(fa.get().running.len(), 2);
    fa.exit("off", 0);
    fa.exit("crash", 5);
    a.tick().unwrap();
    let (rec, _) = records::vm(&*store, "off").unwrap().unwrap();
    assert_eq!(rec.desired, Desired::Stopped);
    assert!(records::owner(&*store, "off").unwrap().is_none());
    assert!(!fa.get().running.contains_key("crash"), "restarted at once");
    std::thread::sleep(cfg().restart_backoff + Duration::from_millis(50));
    a.tick().unwrap();
    assert_eq!(fa.get().starts["crash"], 2);
    assert_eq!(fa.get().starts["off"], 1);
    assert_eq!(stats(&a).crashes, 1);
    // Stopping through the record stops it and releases it.
    records::set_desired(&*store, "crash", Desired::Stopped).unwrap();
    a.tick().unwrap();
    assert!(fa.get().running.is_empty());
    assert!(records::owner(&*store, "crash").unwrap().is_none());
}

#[test]
fn a_host_that_comes_back_does_not_start_vms_owned_elsewhere() {
    let store: Arc<dyn Store> = Arc::new(MemStore::in_memory());
    let (mut b, fb) = join(&store, "b");
    define(&store, "x", 0);
    b.tick().unwrap();
    b.tick().unwrap();
    assert!(fb.get().running.contains_key("x"));
    let (mut a, fa) = join(&store, "a");
    for _ in 0..3 {
        a.tick().unwrap();
        b.tick().unwrap();
    }
    assert!(fa.get().running.is_empty());
    assert_eq!(fb.get().starts["x"], 1);
}

#[test]
fn the_leader_moves_one_vm_off_an_overloaded_host_and_then_stays_still() {
    let store: Arc<dyn Store> = Arc::new(MemStore::in_memory());
    let rec = |id: &str| HostRecord {
        version: 1,
        id: id.into(),
        addr: "127.0.0.1:1".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        pa: None,
    };
    let policy = Policy {
        sustain: Duration::from_millis(600),
        ..Policy::default()
    };
    let c = Config {
        balance: Some(policy),
        ..cfg()
    };
    let fa = Fake::default();
    let m = Membership::join(store.clone(), &rec("a"), Duration::from_secs(2)).unwrap();
    let mut a = Agent::new(store.clone(), m, fa.clone(), c);
    define(&store, "x", 0);
    define(&store, "y", 0);
    a.tick().unwrap(); // a alone: both VMs on a, each using 0.9 of its 2 CPUs
    let fb = Fake::default();
    let m = Membership::join(store.clone(), &rec("b"), Duration::from_secs(2)).unwrap();
    let mut b = Agent::new(store.clone(), m, fb.clone(), c);
    let t0 = Instant::now();
    let mut moved = None;
    while t0.elapsed() < Duration::from_secs(5) && moved.is_none() {
        a.tick().unwrap();
        b.tick().unwrap();
        moved = a.take_move();
        std::thread::sleep(Duration::from_millis(100));
    }
    let (vm, from, to) = moved.expect("no move off a host at 90 %");
    assert!(
        t0.elapsed() >= policy.sustain,
        "moved before the overload was sustained"
    );
    assert_eq!((from.as_str(), to.as_str()), ("a", "b"));
    let d = store.get(BALANCE).unwrap().unwrap();
    assert!(String::from_utf8_lossy(&d.value).contains("\"move\""));
    // The move (as a live migration would leave it): b owns and runs it.
    a.set_moving(true);
    let o = records::owner(&*store, &vm).unwrap().unwrap();
    let e = records::claim(&*store, &vm, "b", Some(o.epoch))
        .unwrap()
        .epoch;
    fa.get().running.remove(&vm);
    fb.get().running.insert(vm.clone(), e);
    fb.get().busy.insert(vm.clone(), (Instant::now(), 0.9));
    a.set_moving(false);
    // Both hosts at 45 %: nothing moves again.
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(2) {
        a.tick().unwrap();
        b.tick().unwrap();
        assert_eq!(a.take_move(), None, "a second move");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stats(&a).balance_moves, 1);
    let d = store.get(BALANCE).unwrap().unwrap();
    assert!(String::from_utf8_lossy(&d.value).contains("\"stay\""));
}
