//! `ferry host` (the per-host agent: membership, the reconcile loop of
//! `ferry_cluster::agent`, one fenced `ferry run` per VM, the cluster API and metrics) and
//! `ferry cluster` (its client). docs/cluster.md.
pub mod api;
pub mod args;
pub mod client;
pub mod host;
pub mod runner;

/// How to run a VM: a cluster VM record's `spec`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    pub cpus: u8,
    /// As given (`512M`), for `ferry run --memory`.
    pub memory: String,
    /// The same in bytes, for placement.
    pub memory_bytes: u64,
    /// `ferry run --disk` specs; relative paths are on the shared storage.
    pub disks: Vec<String>,
    pub guest: Option<String>,
    pub kernel: Option<String>,
    pub cmdline: Option<String>,
}
