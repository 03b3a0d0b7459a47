//! Ferry's cluster, built up in issue #13. Today: a host agent's reconcile loop ([`agent`]:
//! starting what the host owns, failover by the elected leader); the balancing policy
//! ([`balance`]); the cluster store ([`store`]) — etcd for
//! several hosts, or an embedded store for one host, so a single host needs nothing but the
//! `ferry` binary — behind one trait, with leases and compare-and-swap transactions; host
//! membership by lease with a deadline on the monotonic clock ([`membership`]); VM records and
//! owners with epochs ([`records`]); virtual networks and the CA→PA map ([`net`]). docs/cluster.md states what each guarantees.
pub mod agent;
pub mod balance;
pub mod membership;
pub mod net;
pub mod records;
pub mod store;

pub use store::{Compare, KeyValue, LeaseId, Op, Store, StoreError, TxnResult};
