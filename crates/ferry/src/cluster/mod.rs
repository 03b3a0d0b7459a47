//! `ferry host` (the per-host agent: membership, the reconcile loop of
//! `ferry_cluster::agent`, one fenced `ferry run` per VM, the cluster API and metrics) and
//! `ferry cluster` (its client). docs/cluster.md.
pub mod api;
pub mod args;
pub mod client;
pub mod forward;
pub mod host;
pub mod moves;
pub mod overlay;
pub mod runner;
pub mod secure;

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
    /// NICs on virtual networks (`ferry cluster create --nic`; docs/network.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<ferry_cluster::net::Nic>,
    /// Set by the agent for one start: resume from this snapshot directory (a quick
    /// migration's) instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
}

use ferry_migration::engine::CommitHold;
use hyper::Method;
use std::time::{Duration, Instant};

/// The cluster half of a live migration's switch-over on the destination (after Commit,
/// before the VM first runs): this host's agent must say the VM is now owned here; its epoch
/// goes to every disk and the fence, with the agent's current deadline. Any other answer
/// keeps the VM from running here.
pub fn handed_over(
    fence: &ferry_storage::fence::Fence,
    agent: &str,
    vm: &str,
    me: &str,
) -> Result<(), String> {
    let uri = format!("/cluster/local/handed/{vm}?host={me}");
    let until = Instant::now() + Duration::from_secs(5);
    let (status, text) = loop {
        match client::call_status(agent, Method::PUT, &uri, None, Duration::from_secs(5)) {
            Ok(r) => break r,
            Err(e) if Instant::now() >= until => return Err(format!("hand-over: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    if status != 200 {
        return Err(format!("hand-over refused: {}", client::error_text(&text)));
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("hand-over answer: {e}"))?;
    let (Some(epoch), Some(deadline)) = (v["epoch"].as_i64(), v["deadline_ns"].as_u64()) else {
        return Err(format!(
            "hand-over answer without epoch and deadline: {text}"
        ));
    };
    fence.set_deadline(deadline);
    fence.hand_over(epoch).map_err(|e| e.to_string())
}

/// What the source's switch-over asks its agent (`Handover` of a migrate request): move
/// the VM's ownership from `from` to `to`. Refused (the VM stays here, running) when the
/// agent says no; in doubt (the VM stays paused) when no answer settles it within 10 s.
/// `paused`: when the VM stopped taking frames from its NICs (the agent forwards those
/// that came since to the target, docs/network.md).
pub fn hand_over(
    agent: &str,
    vm: &str,
    from: i64,
    to: &str,
    paused: Instant,
) -> Result<(), CommitHold> {
    let uri = format!("/cluster/vms/{vm}/handover");
    let paused_ns = runner::monotonic_ns(paused);
    let body = serde_json::json!({"from": from, "to": to, "paused_ns": paused_ns}).to_string();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client::call_status(
            agent,
            Method::PUT,
            &uri,
            Some(body.clone()),
            Duration::from_secs(5),
        );
        match r {
            Ok((200, _)) => return Ok(()),
            Ok((409, t)) => return Err(CommitHold::Refused(client::error_text(&t))),
            Ok((_, t)) if Instant::now() >= until => {
                return Err(CommitHold::InDoubt(client::error_text(&t)))
            }
            Err(e) if Instant::now() >= until => return Err(CommitHold::InDoubt(e.to_string())),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
