//! API server (axum on a tokio runtime of its own, beside the vCPU threads).
use crate::cli::Then;
use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use ferry_vmm::snapshot::{SnapshotError, SnapshotReport};
use ferry_vmm::{Vm, VmError};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A bound, not yet served, API socket.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds `path`. A live socket there (another VMM) is an error; a stale one is replaced.
pub fn bind(path: &Path) -> Result<Bound> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "API socket {}: the path exists and is not a socket",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!("API socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale API socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind API socket {}", path.display()))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
    })
}

/// A running API server; dropping it stops serving and removes the socket.
pub struct Server {
    rt: tokio::runtime::Runtime,
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Stops accepting, lets requests in flight (e.g. the shutdown that ended the VM) send
    /// their answers, bounded by a second, then removes the socket.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let wait =
                async { tokio::time::timeout(std::time::Duration::from_secs(1), task).await };
            let _ = self.rt.block_on(wait);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn spawn(bound: Bound, vm: Arc<Vm>) -> Result<Server> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("api")
        .enable_all()
        .build()
        .context("starting the API runtime")?;
    bound.listener.set_nonblocking(true).context("API socket")?;
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::from_std(bound.listener).context("API socket")?
    };
    let app = Router::new()
        .route("/vm", get(info))
        .route("/vm/pause", put(pause))
        .route("/vm/resume", put(resume))
        .route("/vm/shutdown", put(shutdown))
        .route("/vm/snapshot", put(snapshot))
        .with_state(vm);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::error!("API server stopped: {e}");
        }
    });
    Ok(Server {
        rt,
        path: bound.path,
        stop: Some(stop),
        task: Some(task),
    })
}

struct ApiError(StatusCode, String);

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

async fn info(State(vm): State<Arc<Vm>>) -> Json<ferry_vmm::VmInfo> {
    Json(vm.info())
}

async fn blocking(vm: Arc<Vm>, f: fn(&Vm) -> Result<(), VmError>) -> Result<StatusCode, ApiError> {
    tokio::task::spawn_blocking(move || f(&vm))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(State(vm): State<Arc<Vm>>) -> Result<StatusCode, ApiError> {
    blocking(vm, Vm::pause).await
}

async fn resume(State(vm): State<Arc<Vm>>) -> Result<StatusCode, ApiError> {
    blocking(vm, Vm::resume).await
}

/// `PUT /vm/snapshot` body.
#[derive(serde::Deserialize)]
struct SnapshotRequest {
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
struct SnapshotAnswer {
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
    let was_running = vm.state() == ferry_vmm::RunState::Running;
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

async fn snapshot(
    State(vm): State<Arc<Vm>>,
    Json(req): Json<SnapshotRequest>,
) -> Result<Json<SnapshotAnswer>, ApiError> {
    let ans = tokio::task::spawn_blocking(move || take_snapshot(&vm, req))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(ans))
}

async fn shutdown(State(vm): State<Arc<Vm>>) -> Result<StatusCode, ApiError> {
    blocking(vm, Vm::shutdown).await
}
