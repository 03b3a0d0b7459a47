//! The VMM's fence (issue #13; `ferry run --fence-epoch`): `GET /vm/fence` shows it,
//! `PUT /vm/fence {"deadline_ns": N}` moves its deadline (the agent renewed its lease).
//! Past the deadline the VMM refuses disk writes (ferry_storage::fence) and the watchdog
//! ([`watch`]) stops the vCPUs.
use super::extract::ApiJson;
use super::handlers::ApiError;
use super::host::Host;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_storage::fence::{self, monotonic_ns, Fence};
use ferry_vmm::{RunState, Vm};
use std::sync::Arc;
use std::time::Duration;

#[derive(serde::Serialize)]
pub struct FenceInfo {
    epoch: i64,
    /// On the host's CLOCK_MONOTONIC, nanoseconds.
    deadline_ns: Option<u64>,
    now_ns: u64,
    expired: bool,
    /// Disk writes and flushes refused since the VMM started.
    refused_writes: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renew {
    deadline_ns: u64,
}

fn the_fence() -> Result<Arc<Fence>, ApiError> {
    fence::installed().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this VMM is not fenced (it was started without --fence-epoch)".into(),
        )
    })
}

pub async fn info(State(_): State<Arc<Host>>) -> Result<Json<FenceInfo>, ApiError> {
    let f = the_fence()?;
    Ok(Json(FenceInfo {
        epoch: f.epoch(),
        deadline_ns: f.deadline_ns(),
        now_ns: monotonic_ns(),
        expired: f.expired(),
        refused_writes: f.refused(),
    }))
}

pub async fn renew(
    State(_): State<Arc<Host>>,
    ApiJson(r): ApiJson<Renew>,
) -> Result<StatusCode, ApiError> {
    let f = the_fence()?;
    if f.expired() {
        // Once fenced, always fenced: another host may own the VM by now.
        return Err(ApiError(
            StatusCode::CONFLICT,
            "the fence's deadline has passed: this VMM stopped for good".into(),
        ));
    }
    f.set_deadline(r.deadline_ns);
    Ok(StatusCode::NO_CONTENT)
}

/// Stops the vCPUs once the fence's deadline passes (checked every 10 ms), and keeps them
/// stopped; ends with the VM.
pub fn watch(vm: Arc<Vm>, f: Arc<Fence>) {
    std::thread::Builder::new()
        .name("fence".into())
        .spawn(move || loop {
            match vm.state() {
                RunState::Shutdown => return,
                RunState::Running if f.expired() && vm.pause().is_ok() => eprintln!(
                    "ferry: fenced: the lease deadline passed (epoch {}); vCPUs stopped, disk \
                     writes refused",
                    f.epoch()
                ),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        })
        .map(|_| ())
        .unwrap_or_else(|e| eprintln!("ferry: error: no fence watchdog: {e}"));
}
