//! Host membership: a host is in the cluster while its record `/ferry/hosts/ID` exists, and
//! that record is attached to a lease the host keeps alive. A keeper thread renews it every
//! sixth of its TTL and keeps the host's **deadline**: the time until which the host may
//! assume its lease still holds, counted on the monotonic clock from when the last
//! acknowledged renewal was *sent* (etcd restarts the TTL when it receives it, later), minus
//! a margin for clock-rate differences. Past the deadline — renewals failing, the store
//! unreachable, or this process paused — the host must act as if it had lost the lease
//! (issue #13's fencing builds on this; docs/cluster.md).
use crate::store::{LeaseId, Store, StoreError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The prefix of host records.
pub const HOSTS: &str = "/ferry/hosts/";

/// What a host says of itself in its record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostRecord {
    pub version: u32,
    pub id: String,
    /// Where its agent listens.
    pub addr: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Its provider address: where the overlay's VXLAN traffic for its VMs goes (None: it
    /// carries no virtual network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pa: Option<std::net::Ipv4Addr>,
}

/// Why joining or staying failed.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("host id {0:?} is taken by a host that is still alive (its lease holds)")]
    IdTaken(String),
    #[error("host id {0:?}: ids are 1-64 letters, digits, '-', '_' or '.'")]
    BadId(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    deadline: Instant,
    /// The store said the lease is gone, or the deadline passed without a renewal.
    lost: bool,
    stop: bool,
}

/// This host's membership; leaving (or dropping) revokes the lease.
/// See [`Membership::watch`].
#[derive(Clone)]
pub struct DeadlineWatch(Arc<(Mutex<State>, Condvar)>);

impl DeadlineWatch {
    /// The membership's deadline; None once it is lost or left.
    pub fn current(&self) -> Option<Instant> {
        let s = *self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        (!s.lost && !s.stop && Instant::now() < s.deadline).then_some(s.deadline)
    }
}

pub struct Membership {
    store: Arc<dyn Store>,
    lease: LeaseId,
    id: String,
    state: Arc<(Mutex<State>, Condvar)>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

/// Part of the TTL not counted on, for clock-rate differences and scheduling.
fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(200))
}

pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Membership {
    /// Registers `rec` under a new lease of `ttl` (whole seconds, at least 1: etcd counts
    /// leases in seconds, so a fraction is dropped rather than counted on) and starts
    /// keeping it alive.
    pub fn join(
        store: Arc<dyn Store>,
        rec: &HostRecord,
        ttl: Duration,
    ) -> Result<Membership, MemberError> {
        if !valid_id(&rec.id) {
            return Err(MemberError::BadId(rec.id.clone()));
        }
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        let sent = Instant::now();
        let lease = store.grant(ttl)?;
        let key = format!("{HOSTS}{}", rec.id);
        let value = serde_json::to_vec(rec).map_err(|e| StoreError::File {
            path: key.clone(),
            why: e.to_string(),
        })?;
        if store.create(&key, &value, Some(lease))?.is_none() {
            let _ = store.revoke(lease);
            return Err(MemberError::IdTaken(rec.id.clone()));
        }
        Self::keep_from(store, lease, &rec.id, ttl, sent + ttl - margin(ttl))
    }

    /// Takes over the membership an earlier process of this host left (its lease `lease`,
    /// e.g. read from the run directory), if that lease still holds and still carries the
    /// host's record: a restarted agent goes on as the same member, before its VMMs' fences
    /// run out. None when it is gone (join anew).
    pub fn resume(
        store: Arc<dyn Store>,
        rec: &HostRecord,
        ttl: Duration,
        lease: LeaseId,
    ) -> Result<Option<Membership>, MemberError> {
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        let sent = Instant::now();
        let granted = match store.keep_alive(lease) {
            Ok(g) => g.min(ttl),
            Err(StoreError::LeaseExpired(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let key = format!("{HOSTS}{}", rec.id);
        match store.get(&key)? {
            Some(kv) if kv.lease == Some(lease) => {}
            _ => return Ok(None),
        }
        let value = serde_json::to_vec(rec).map_err(|e| StoreError::File {
            path: key.clone(),
            why: e.to_string(),
        })?;
        // The record as this process sees the host (its address may have changed).
        let put = crate::store::Op::Put {
            key,
            value,
            lease: Some(lease),
        };
        store.txn(&[], &[put])?;
        let deadline = sent + granted - margin(ttl).min(granted);
        Self::keep_from(store, lease, &rec.id, ttl, deadline).map(Some)
    }

    fn keep_from(
        store: Arc<dyn Store>,
        lease: LeaseId,
        id: &str,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Membership, MemberError> {
        let state = Arc::new((
            Mutex::new(State {
                deadline,
                lost: false,
                stop: false,
            }),
            Condvar::new(),
        ));
        let keeper = {
            let (store, state) = (store.clone(), state.clone());
            std::thread::Builder::new()
                .name("ferry-lease".into())
                .spawn(move || keep(&*store, lease, ttl, &state))
                .map_err(|e| StoreError::Unavailable {
                    endpoint: "lease keeper".into(),
                    why: e.to_string(),
                })?
        };
        Ok(Membership {
            store,
            lease,
            id: id.to_string(),
            state,
            keeper: Some(keeper),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    fn now_state(&self) -> State {
        let mut s = *self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        if Instant::now() >= s.deadline {
            s.lost = true;
        }
        s
    }

    /// Until when this host may act as a member (monotonic clock).
    pub fn deadline(&self) -> Instant {
        self.now_state().deadline
    }

    /// A handle other threads read the deadline through (the fence renewer, which must not
    /// wait for a reconcile round stuck in store calls).
    pub fn watch(&self) -> DeadlineWatch {
        DeadlineWatch(self.state.clone())
    }

    /// The lease is gone, or may be: the deadline passed.
    pub fn lost(&self) -> bool {
        self.now_state().lost
    }

    /// Leaves the cluster: the lease is revoked, the record deleted.
    pub fn leave(mut self) -> Result<(), StoreError> {
        self.stop();
        self.store.revoke(self.lease)
    }

    fn stop(&mut self) {
        {
            let mut s = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
            s.stop = true;
        }
        self.state.1.notify_all();
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if self.keeper.is_some() {
            self.stop();
            let _ = self.store.revoke(self.lease);
        }
    }
}

/// The keeper: renews every sixth of the TTL (at once after a failure), moves the deadline on
/// each acknowledged renewal, and marks the membership lost when the store says the lease is
/// gone or the deadline passes.
fn keep(store: &dyn Store, lease: LeaseId, ttl: Duration, state: &(Mutex<State>, Condvar)) {
    // A sixth of the TTL: a renewal acknowledged just before etcd loses its leader leaves
    // ~5/6 of the TTL to ride out the election (1.3-1.7 s here with etcd's defaults).
    let every = ttl / 6;
    // After a failed renewal (a member died under it, say), the next try comes at once: two
    // misses a sixth of the TTL apart would otherwise eat the whole deadline.
    let again = (ttl / 20).max(Duration::from_millis(50));
    let mut pause = every;
    loop {
        let wait = {
            let g = state.0.lock().unwrap_or_else(|e| e.into_inner());
            let (g, _) = state
                .1
                .wait_timeout_while(g, pause, |s| !s.stop)
                .unwrap_or_else(|e| e.into_inner());
            if g.stop || g.lost {
                return;
            }
            g.deadline
        };
        let sent = Instant::now();
        let r = store.keep_alive(lease);
        let mut g = state.0.lock().unwrap_or_else(|e| e.into_inner());
        pause = again;
        match r {
            Ok(granted) => {
                let granted = granted.min(ttl);
                g.deadline = g.deadline.max(sent + granted - margin(ttl).min(granted));
                pause = every;
            }
            Err(StoreError::LeaseExpired(_)) => g.lost = true,
            Err(_) if Instant::now() >= wait => g.lost = true,
            Err(e) => tracing::debug!("lease renewal failed (retrying): {e}"),
        }
        if g.lost {
            return;
        }
    }
}
