//! Host membership and VM ownership against both stores: a host stays while it keeps its
//! lease, knows it has lost it no later than the store drops it, and a VM changes owner only
//! by a compare-and-swap from the owner read, to a live host, with a rising epoch.
mod common;
use common::Etcd;
use ferry_cluster::membership::{HostRecord, MemberError, Membership, HOSTS};
use ferry_cluster::records::{self, Desired, RecordError, VmRecord};
use ferry_cluster::store::{EtcdStore, MemStore};
use ferry_cluster::{LeaseId, Op, Store, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn host(id: &str) -> HostRecord {
    HostRecord {
        version: 1,
        id: id.into(),
        addr: "127.0.0.1:1".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        pa: None,
    }
}

fn vm(name: &str) -> VmRecord {
    VmRecord {
        version: 1,
        name: name.into(),
        spec: serde_json::json!({"memory": "64M"}),
        desired: Desired::Running,
        priority: 0,
    }
}

/// A store whose lease renewals can be frozen: this host's keeper as if its process were
/// paused (SIGSTOP) or cut off from the store, while the store itself runs on.
struct Freezable {
    inner: Arc<dyn Store>,
    frozen: AtomicBool,
}

impl Store for Freezable {
    fn endpoint(&self) -> String {
        self.inner.endpoint()
    }
    fn get(&self, key: &str) -> Result<Option<ferry_cluster::KeyValue>, StoreError> {
        self.inner.get(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ferry_cluster::KeyValue>, StoreError> {
        self.inner.list(prefix)
    }
    fn txn(
        &self,
        when: &[ferry_cluster::Compare],
        then: &[Op],
    ) -> Result<ferry_cluster::TxnResult, StoreError> {
        self.inner.txn(when, then)
    }
    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant(ttl)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        if self.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(300));
            return Err(StoreError::Unavailable {
                endpoint: "frozen".into(),
                why: "paused".into(),
            });
        }
        self.inner.keep_alive(lease)
    }
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease)
    }
    fn revision(&self) -> Result<i64, StoreError> {
        self.inner.revision()
    }
    fn wait(&self, prefix: &str, after: i64, limit: Duration) -> Result<bool, StoreError> {
        self.inner.wait(prefix, after, limit)
    }
    fn wait_key(
        &self,
        key: &str,
        after: i64,
        limit: Duration,
    ) -> Result<Option<Option<ferry_cluster::KeyValue>>, StoreError> {
        self.inner.wait_key(key, after, limit)
    }
}

fn membership(store: Arc<dyn Store>) {
    let ttl = Duration::from_secs(2);
    let m = Membership::join(store.clone(), &host("h1"), ttl).unwrap();
    let kv = store
        .get(&format!("{HOSTS}h1"))
        .unwrap()
        .expect("registered");
    assert_eq!(kv.lease, Some(m.lease()));
    assert!(matches!(
        Membership::join(store.clone(), &host("h1"), ttl),
        Err(MemberError::IdTaken(_))
    ));
    assert!(matches!(
        Membership::join(store.clone(), &host("a b"), ttl),
        Err(MemberError::BadId(_))
    ));
    // Kept alive across three TTLs; the deadline stays ahead and never beyond a TTL.
    let t = Instant::now();
    while t.elapsed() < 3 * ttl {
        assert!(!m.lost());
        let left = m.deadline().saturating_duration_since(Instant::now());
        assert!(left > Duration::ZERO && left <= ttl, "{left:?}");
        assert!(store.get(&format!("{HOSTS}h1")).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(200));
    }
    m.leave().unwrap();
    assert!(store.get(&format!("{HOSTS}h1")).unwrap().is_none());
    // The lease ended behind its back (as when it expired): the keeper notices.
    let m = Membership::join(store.clone(), &host("h2"), ttl).unwrap();
    store.revoke(m.lease()).unwrap();
    let t = Instant::now();
    while !m.lost() {
        assert!(t.elapsed() < ttl, "a lost lease went unnoticed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The safety property fencing needs: a host whose renewals stop considers itself lost no
/// later than the store deletes its record (so no other host can have taken over yet).
fn lost_before_the_store_drops_it(store: Arc<dyn Store>) {
    let f = Arc::new(Freezable {
        inner: store.clone(),
        frozen: AtomicBool::new(false),
    });
    let m = Membership::join(f.clone(), &host("h3"), Duration::from_secs(2)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    f.frozen.store(true, Ordering::SeqCst);
    let (mut lost_at, mut gone_at) = (None, None);
    let t = Instant::now();
    while gone_at.is_none() && t.elapsed() < Duration::from_secs(10) {
        if lost_at.is_none() && m.lost() {
            lost_at = Some(Instant::now());
        }
        if store.get(&format!("{HOSTS}h3")).unwrap().is_none() {
            gone_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (lost_at, gone_at) = (
        lost_at.expect("never lost"),
        gone_at.expect("never expired"),
    );
    assert!(
        lost_at <= gone_at,
        "the store dropped the host {:?} before it knew",
        lost_at - gone_at
    );
}

fn ownership(store: Arc<dyn Store>) {
    let s = &*store;
    let (a, b) = (
        Membership::join(store.clone(), &host("ha"), Duration::from_secs(5)).unwrap(),
        Membership::join(store.clone(), &host("hb"), Duration::from_secs(5)).unwrap(),
    );
    records::define(s, &vm("v1")).unwrap();
    assert!(matches!(
        records::define(s, &vm("v1")),
        Err(RecordError::Exists(_))
    ));
    assert!(matches!(
        records::claim(s, "nope", "ha", None),
        Err(RecordError::NoSuchVm(_))
    ));
    // Two hosts race to take an unowned VM: exactly one wins.
    let wins: Vec<bool> = std::thread::scope(|sc| {
        let h: Vec<_> = ["ha", "hb"]
            .map(|h| sc.spawn(move || records::claim(s, "v1", h, None).is_ok()))
            .into_iter()
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
    let o = records::owner(s, "v1").unwrap().unwrap();
    // A hand-over from the owner read; a stale epoch loses and is told the owner.
    let other = if o.host == "ha" { "hb" } else { "ha" };
    let o2 = records::claim(s, "v1", other, Some(o.epoch)).unwrap();
    assert!(o2.epoch > o.epoch, "epochs rise");
    match records::claim(s, "v1", &o.host, Some(o.epoch)) {
        Err(RecordError::Conflict { now: Some(now), .. }) => assert_eq!(now, o2),
        r => panic!("{r:?}"),
    }
    // Other changes to the VM leave the epoch alone.
    records::set_desired(s, "v1", Desired::Stopped).unwrap();
    assert_eq!(records::owner(s, "v1").unwrap().unwrap(), o2);
    assert_eq!(
        records::vm(s, "v1").unwrap().unwrap().0.desired,
        Desired::Stopped
    );
    // A host that left cannot take anything.
    b.leave().unwrap();
    records::define(s, &vm("v2")).unwrap();
    assert!(matches!(
        records::claim(s, "v2", "hb", None),
        Err(RecordError::HostGone(_))
    ));
    records::release(s, "v1", o2.epoch).unwrap();
    assert_eq!(records::owner(s, "v1").unwrap(), None);
    assert_eq!(records::vms(s).unwrap().len(), 2);
    drop(a);
}

#[test]
fn membership_and_ownership_on_the_embedded_store() {
    let s: Arc<dyn Store> = Arc::new(MemStore::in_memory());
    membership(s.clone());
    lost_before_the_store_drops_it(s.clone());
    ownership(s);
}

#[test]
fn membership_and_ownership_on_etcd() {
    let e = Etcd::start(1);
    let s: Arc<dyn Store> = Arc::new(EtcdStore::connect(&e.clients).unwrap());
    membership(s.clone());
    lost_before_the_store_drops_it(s.clone());
    ownership(s);
}
