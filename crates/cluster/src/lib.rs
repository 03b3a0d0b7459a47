//! Ferry's cluster. For now its foundation: the cluster store ([`store`]) — etcd for several
//! hosts, or an embedded store for one host, so a single host needs nothing but the `ferry`
//! binary — behind one trait, with leases and compare-and-swap transactions.
//! docs/cluster.md states what it guarantees.
pub mod store;

pub use store::{Compare, KeyValue, LeaseId, Op, Store, StoreError, TxnResult};
