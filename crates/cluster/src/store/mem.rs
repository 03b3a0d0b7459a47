//! The embedded store: one host's cluster state in the agent's process, the same semantics
//! as etcd (a revision per change, leases, transactions), persisted to a file after every
//! change (written to a temporary file, synced, renamed over the old one), so a single host
//! needs nothing but the `ferry` binary. Keys attached to a lease are not persisted: after a
//! restart their lease is gone, as an etcd lease is after its TTL. The file is locked while
//! open: one agent per file.
use super::{Compare, KeyValue, LeaseId, Op, Store, StoreError, TxnResult};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct MemStore {
    inner: Mutex<Inner>,
    /// Notified after every change (for [`Store::wait`]).
    changed: Condvar,
    path: Option<PathBuf>,
    /// Held for its lock.
    _lock: Option<std::fs::File>,
}

#[derive(Default)]
struct Inner {
    revision: i64,
    keys: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, (Duration, Instant)>,
    next_lease: LeaseId,
    /// The latest changes (revision, key), oldest first, at most [`CHANGES_KEPT`].
    changes: VecDeque<(i64, String)>,
    /// Changes at or below this revision are no longer in `changes`.
    changes_floor: i64,
}

/// How many changed keys the store remembers for [`Store::wait`]; a waiter further behind
/// is woken at once (it re-reads).
const CHANGES_KEPT: usize = 4096;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    #[serde(skip)]
    lease: Option<LeaseId>,
}

/// The file's contents.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    version: u32,
    revision: i64,
    keys: BTreeMap<String, Entry>,
}

impl MemStore {
    /// A store that lives as long as the process (tests, a throwaway host).
    pub fn in_memory() -> MemStore {
        MemStore {
            inner: Mutex::new(Inner {
                revision: 1,
                next_lease: 1,
                ..Inner::default()
            }),
            changed: Condvar::new(),
            path: None,
            _lock: None,
        }
    }

    /// The store kept in `path` (created if missing; locked while open).
    pub fn open(path: &Path) -> Result<MemStore, StoreError> {
        let err = |why: String| StoreError::File {
            path: path.display().to_string(),
            why,
        };
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err(e.to_string()))?;
        lock.try_lock()
            .map_err(|_| err("in use by another agent (its lock file is held)".into()))?;
        let mut inner = Inner {
            revision: 1,
            next_lease: 1,
            ..Inner::default()
        };
        match std::fs::read(path) {
            Ok(b) => {
                let s: Saved = serde_json::from_slice(&b)
                    .map_err(|e| err(format!("not a Ferry cluster store: {e}")))?;
                if s.version != 1 {
                    return Err(err(format!(
                        "store version {} (this Ferry reads 1)",
                        s.version
                    )));
                }
                inner.revision = s.revision;
                inner.keys = s.keys;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        inner.changes_floor = inner.revision;
        Ok(MemStore {
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            path: Some(path.to_owned()),
            _lock: Some(lock),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.expire(Instant::now());
        g
    }

    /// Writes the non-leased keys out (after a change).
    fn save(&self, g: &Inner) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |e: std::io::Error| StoreError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        let keys = g
            .keys
            .iter()
            .filter(|(_, e)| e.lease.is_none())
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let s = Saved {
            version: 1,
            revision: g.revision,
            keys,
        };
        let b = serde_json::to_vec(&s).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&b).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Ends every lease past its deadline, deleting its keys (one revision for all).
    fn expire(&mut self, now: Instant) {
        let gone: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end_lease(id);
        }
    }

    fn end_lease(&mut self, id: LeaseId) {
        self.leases.remove(&id);
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            self.revision += 1;
            for k in gone {
                self.keys.remove(&k);
                self.log(k);
            }
        }
    }

    /// Records that `key` changed at the current revision.
    fn log(&mut self, key: String) {
        if self.changes.len() == CHANGES_KEPT {
            if let Some((rev, _)) = self.changes.pop_front() {
                self.changes_floor = rev;
            }
        }
        self.changes.push_back((self.revision, key));
    }

    /// A key under `prefix` changed after revision `after` (or the log no longer reaches
    /// back that far).
    fn changed_since(&self, prefix: &str, after: i64) -> bool {
        after < self.changes_floor
            || self
                .changes
                .iter()
                .rev()
                .take_while(|(rev, _)| *rev > after)
                .any(|(_, k)| k.starts_with(prefix))
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::Absent(k) => !self.keys.contains_key(k),
            Compare::Present(k) => self.keys.contains_key(k),
            Compare::ModRevision(k, r) => self.keys.get(k).is_some_and(|e| e.mod_revision == *r),
            Compare::Value(k, v) => self.keys.get(k).is_some_and(|e| e.value == *v),
        }
    }
}

fn kv(k: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: k.to_owned(),
        value: e.value.clone(),
        mod_revision: e.mod_revision,
        lease: e.lease,
    }
}

impl Store for MemStore {
    fn endpoint(&self) -> String {
        match &self.path {
            Some(p) => format!("embedded store {}", p.display()),
            None => "embedded store (in memory)".into(),
        }
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().keys.get(key).map(|e| kv(key, e)))
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let g = self.lock();
        Ok(g.keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| kv(k, e))
            .collect())
    }

    fn txn(&self, when: &[Compare], then: &[Op]) -> Result<TxnResult, StoreError> {
        let mut g = self.lock();
        if !when.iter().all(|c| g.holds(c)) {
            return Ok(TxnResult {
                succeeded: false,
                revision: g.revision,
            });
        }
        for op in then {
            if let Op::Put { lease: Some(l), .. } = op {
                if !g.leases.contains_key(l) {
                    return Err(StoreError::LeaseExpired(*l));
                }
            }
        }
        if then.is_empty() {
            return Ok(TxnResult {
                succeeded: true,
                revision: g.revision,
            });
        }
        let rev = g.revision + 1;
        let before = (g.revision, g.keys.clone());
        for op in then {
            match op {
                Op::Put { key, value, lease } => {
                    g.keys.insert(
                        key.clone(),
                        Entry {
                            value: value.clone(),
                            mod_revision: rev,
                            lease: *lease,
                        },
                    );
                }
                Op::Delete { key } => {
                    g.keys.remove(key);
                }
            }
        }
        g.revision = rev;
        if let Err(e) = self.save(&g) {
            // Not durable: not done.
            (g.revision, g.keys) = before;
            return Err(e);
        }
        for op in then {
            let key = match op {
                Op::Put { key, .. } | Op::Delete { key } => key.clone(),
            };
            g.log(key);
        }
        self.changed.notify_all();
        Ok(TxnResult {
            succeeded: true,
            revision: rev,
        })
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut g = self.lock();
        let id = g.next_lease;
        g.next_lease += 1;
        g.leases.insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut g = self.lock();
        match g.leases.get_mut(&lease) {
            Some((ttl, until)) => {
                *until = Instant::now() + *ttl;
                Ok(*ttl)
            }
            None => Err(StoreError::LeaseExpired(lease)),
        }
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.end_lease(lease);
        self.changed.notify_all();
        Ok(())
    }

    fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.lock().revision)
    }

    fn wait_key(
        &self,
        key: &str,
        after: i64,
        limit: Duration,
    ) -> Result<Option<Option<KeyValue>>, StoreError> {
        let until = Instant::now() + limit;
        let mut g = self.lock();
        loop {
            let changed = g
                .changes
                .iter()
                .rev()
                .take_while(|(rev, _)| *rev > after)
                .any(|(_, k)| k == key);
            if changed || after < g.changes_floor {
                return Ok(Some(g.keys.get(key).map(|e| kv(key, e))));
            }
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            let step = (until - now).min(Duration::from_millis(100));
            g = self
                .changed
                .wait_timeout(g, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            g.expire(Instant::now());
        }
    }

    fn wait(&self, prefix: &str, after: i64, limit: Duration) -> Result<bool, StoreError> {
        let until = Instant::now() + limit;
        let mut g = self.lock();
        loop {
            if g.changed_since(prefix, after) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(false);
            }
            // Wakes at least every 100 ms: leases expire when the store is looked at.
            let step = (until - now).min(Duration::from_millis(100));
            g = self
                .changed
                .wait_timeout(g, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            g.expire(Instant::now());
        }
    }
}
