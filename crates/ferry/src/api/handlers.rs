//! API request handlers. Blocking VM operations run in `spawn_blocking`.
use super::extract::{ApiJson, NoBody};
use super::host::Host;
use crate::cli::Then;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_vmm::snapshot::{MemoryCheck, SnapshotError, SnapshotReport};
use ferry_vmm::{RunState, Vm, VmError};
use std::path::PathBuf;
use std::sync::Arc;

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let code = match e {
            VmError::State { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

pub fn the_vm(host: &Host) -> Result<Arc<Vm>, ApiError> {
    host.vm().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no VM here yet: create one with PUT /vm/restore".into(),
        )
    })
}

pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

pub async fn info(State(host): State<Arc<Host>>) -> Result<Json<ferry_vmm::VmInfo>, ApiError> {
    Ok(Json(the_vm(&host)?.info()))
}

/// Refuses what would change the VM's run state under a running migration: a resume while
/// it is paused for the switch-over, or during post-copy (where the destination runs it),
/// would leave two running copies; a shutdown in post-copy would lose the pages the
/// destination still needs.
pub fn not_migrating(host: &Host) -> Result<(), ApiError> {
    match host.migration() {
        Some(m) if host.migrating() => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "a live migration of this VM is running (phase {:?}): wait for it, or cancel it \
                 before its switch-over (ferry vm cancel-migration)",
                m.status().phase
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses what reads all of the VM's memory while part of it is still at the source.
pub fn not_arriving(host: &Host) -> Result<(), ApiError> {
    if host.vm().is_some_and(|vm| vm.memory_loading()) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            ferry_vmm::snapshot::SnapshotError::Loading.to_string(),
        ));
    }
    if host.arriving_now() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "the VM is still arriving by post-copy (part of its memory is at the source): \
             try again once it has all arrived"
                .into(),
        ));
    }
    Ok(())
}

async fn vm_op(host: Arc<Host>, f: fn(&Vm) -> Result<(), VmError>) -> Result<StatusCode, ApiError> {
    not_migrating(&host)?;
    let vm = the_vm(&host)?;
    blocking(move || Ok(f(&vm)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn pause(State(host): State<Arc<Host>>, _: NoBody) -> Result<StatusCode, ApiError> {
    vm_op(host, Vm::pause).await
}

pub async fn resume(State(host): State<Arc<Host>>, _: NoBody) -> Result<StatusCode, ApiError> {
    if ferry_storage::fence::installed().is_some_and(|f| f.expired()) {
        // Once fenced, always fenced: another host may own the VM by now.
        return Err(ApiError(
            StatusCode::CONFLICT,
            "the fence's deadline has passed: this VMM stays stopped".into(),
        ));
    }
    vm_op(host, Vm::resume).await
}

pub async fn shutdown(State(host): State<Arc<Host>>, _: NoBody) -> Result<StatusCode, ApiError> {
    vm_op(host, Vm::shutdown).await
}

/// `PUT /vm/snapshot` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    to: PathBuf,
    #[serde(default)]
    diff: bool,
    #[serde(default = "then_default")]
    then: Then,
}

fn then_default() -> Then {
    Then::Resume
}

/// `PUT /vm/snapshot` answer: the snapshot report and how long the guest was stopped.
#[derive(serde::Serialize)]
pub struct SnapshotAnswer {
    #[serde(flatten)]
    report: SnapshotReport,
    paused_ms: f64,
    then: Then,
}

fn snapshot_error(e: SnapshotError) -> ApiError {
    let code = match e {
        SnapshotError::NotPaused(_) | SnapshotError::NoParent | SnapshotError::SameDir(_) => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, e.to_string())
}

/// Pauses a running VM, snapshots it, then resumes, leaves it paused or stops it. On any
/// failure a VM that was running is resumed: a failed snapshot never costs the VM.
fn take_snapshot(vm: &Vm, req: SnapshotRequest) -> Result<SnapshotAnswer, ApiError> {
    let was_running = vm.state() == RunState::Running;
    let t = std::time::Instant::now();
    if was_running {
        vm.pause()?;
    }
    let report = match vm.snapshot(&req.to, req.diff) {
        Ok(r) => r,
        Err(e) => {
            if was_running {
                vm.resume()?;
            }
            return Err(snapshot_error(e));
        }
    };
    match req.then {
        Then::Resume if was_running => vm.resume()?,
        Then::Resume | Then::Pause => {}
        Then::Stop => vm.shutdown_after_handoff()?,
    }
    Ok(SnapshotAnswer {
        report,
        paused_ms: t.elapsed().as_secs_f64() * 1e3,
        then: req.then,
    })
}

pub async fn snapshot(
    State(host): State<Arc<Host>>,
    ApiJson(req): ApiJson<SnapshotRequest>,
) -> Result<Json<SnapshotAnswer>, ApiError> {
    not_migrating(&host)?;
    not_arriving(&host)?;
    let vm = the_vm(&host)?;
    Ok(Json(blocking(move || take_snapshot(&vm, req)).await?))
}

/// `PUT /vm/seed` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    to: PathBuf,
    /// Only what changed since the VM's last seed or snapshot (a seed update).
    #[serde(default)]
    update: bool,
}

/// Writes a seed of the running VM (a live snapshot; the VM keeps running).
pub async fn seed(
    State(host): State<Arc<Host>>,
    ApiJson(req): ApiJson<SeedRequest>,
) -> Result<Json<ferry_vmm::live_snapshot::LiveSnapshotReport>, ApiError> {
    not_migrating(&host)?;
    not_arriving(&host)?;
    let vm = the_vm(&host)?;
    let r = blocking(move || {
        vm.snapshot_live(&req.to, req.update).map_err(|e| match e {
            SnapshotError::NoParent => ApiError(
                StatusCode::CONFLICT,
                "a seed update needs a seed (or snapshot) of this VM taken or restored by this \
                 VMM first, and no failed one since: ferry seed create"
                    .into(),
            ),
            SnapshotError::NotRunning(_) | SnapshotError::Loading => {
                ApiError(StatusCode::CONFLICT, e.to_string())
            }
            e => snapshot_error(e),
        })
    })
    .await?;
    Ok(Json(r))
}

/// `PUT /vm/restore` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    from: PathBuf,
    #[serde(default)]
    lazy_check: bool,
}

/// Restores a VM into this (empty) VMM and starts it.
pub async fn restore(
    State(host): State<Arc<Host>>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<Json<ferry_vmm::snapshot::RestoreReport>, ApiError> {
    if host.vm().is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this VMM already has a VM".into(),
        ));
    }
    blocking(move || {
        let check = if req.lazy_check {
            MemoryCheck::Background
        } else {
            MemoryCheck::BeforeStart
        };
        let console = crate::run::console(&host.console_log)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        let (vm, report) =
            ferry_vmm::snapshot::restore(&req.from, console, check).map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("restoring from {}: {e}", req.from.display()),
                )
            })?;
        let vm = Arc::new(vm);
        // Started before it is handed over: the host's main thread waits for the VM in the
        // slot to end, and a VM that has not started yet has no vCPU left to wait for.
        vm.start()?;
        if !host.fill(vm.clone()) {
            let _ = vm.shutdown();
            vm.wait();
            return Err(ApiError(
                StatusCode::CONFLICT,
                "this VMM already has a VM".into(),
            ));
        }
        Ok(Json(report))
    })
    .await
}
