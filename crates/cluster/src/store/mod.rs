//! The cluster store: keys (UTF-8 paths such as `/ferry/vms/NAME`) holding bytes, a revision
//! that every change increases, leases that delete their keys when they are not kept alive,
//! and transactions that apply their operations only when every comparison holds — all
//! changes to cluster state go through those, so two agents racing for the same record
//! cannot both win.
//!
//! Two backends behave alike (one test suite runs against both): [`EtcdStore`] (etcd v3,
//! linearizable reads and transactions) and [`MemStore`] (in the process, persisted to a
//! file, for a single host).
mod etcd;
mod mem;

pub use etcd::EtcdStore;
pub use mem::MemStore;

use std::time::Duration;

/// A lease's id (etcd's, or the embedded store's own).
pub type LeaseId = i64;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached, or did not answer in time: the outcome of a change is
    /// unknown (read again to settle it).
    #[error("cluster store {endpoint}: {why}")]
    Unavailable { endpoint: String, why: String },
    /// The lease is gone (expired or revoked): whatever it held is deleted.
    #[error("lease {0:x} has expired")]
    LeaseExpired(LeaseId),
    #[error("cluster store file {path}: {why}")]
    File { path: String, why: String },
}

/// A key and what the store knows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the change that last wrote it.
    pub mod_revision: i64,
    /// The lease it is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A transaction's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists (a host's leased record: the host is alive).
    Present(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, i64),
    /// The key exists and holds these bytes.
    Value(String, Vec<u8>),
}

/// A transaction's operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Every comparison held and the operations were applied.
    pub succeeded: bool,
    /// The store's revision after the transaction (the revision of its changes when it
    /// succeeded and changed anything): an owner record's epoch.
    pub revision: i64,
}

/// A cluster store. Every call is linearizable: it sees every change that completed before
/// it began.
pub trait Store: Send + Sync {
    /// Where it is (for messages).
    fn endpoint(&self) -> String;
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;
    /// Applies `then` atomically if every comparison in `when` holds.
    fn txn(&self, when: &[Compare], then: &[Op]) -> Result<TxnResult, StoreError>;
    /// A new lease that lives `ttl` unless kept alive.
    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews the lease for its whole TTL; [`StoreError::LeaseExpired`] when it is gone.
    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    /// Ends the lease now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// The store's current revision.
    fn revision(&self) -> Result<i64, StoreError>;
    /// Waits until a key starting with `prefix` is written or deleted after revision
    /// `after`, or `limit` has passed; true when something changed. (A watch: read the
    /// revision, read what you need, then wait from that revision, and no change is missed.)
    fn wait(&self, prefix: &str, after: i64, limit: Duration) -> Result<bool, StoreError>;
    /// Waits for a write or delete of `key` itself after revision `after`, at most `limit`:
    /// None when none came; `Some(None)` when it was deleted; `Some(Some(kv))` what a write
    /// left (etcd: as of that event; the embedded store: as it is now). A committed change
    /// learnt as soon as the store announces it, without a read's round trip.
    fn wait_key(
        &self,
        key: &str,
        after: i64,
        limit: Duration,
    ) -> Result<Option<Option<KeyValue>>, StoreError>;

    /// Writes `key` unconditionally.
    fn put(&self, key: &str, value: &[u8]) -> Result<i64, StoreError> {
        Ok(self.txn(&[], &[Op::put(key, value)])?.revision)
    }

    /// Writes `key` only if it does not exist; the revision of the write if it was made.
    fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<i64>, StoreError> {
        let op = Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        };
        let r = self.txn(&[Compare::Absent(key.into())], &[op])?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Replaces `key` only if it was last written at `rev`; the new revision if it was.
    fn replace(&self, key: &str, rev: i64, value: &[u8]) -> Result<Option<i64>, StoreError> {
        let r = self.txn(
            &[Compare::ModRevision(key.into(), rev)],
            &[Op::put(key, value)],
        )?;
        Ok(r.succeeded.then_some(r.revision))
    }
}
