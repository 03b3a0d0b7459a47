//! Disk moves through the API (`ferry disk move`): `PUT /vm/disk/move` runs one (the answer
//! is the report), `GET /vm/disk/move` shows its progress during and after, and
//! `PUT /vm/disk/move/cancel` stops it (the VM stays on its old file).
use super::extract::{ApiJson, NoBody};
use super::handlers::{blocking, the_vm, ApiError};
use super::host::Host;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_storage::Format;
use ferry_vmm::disk_move::{MoveError, MoveReport, MoveStatus};
use std::path::PathBuf;
use std::sync::Arc;

/// `PUT /vm/disk/move` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The disk's id (`--disk ...,id=`; `disk0`, `disk1`... by default).
    disk: String,
    /// A new file, or an existing directory (the disk keeps its file name there).
    to: PathBuf,
    /// The new file's format; default: the disk's own.
    #[serde(default)]
    format: Option<Format>,
}

pub async fn start(
    State(host): State<Arc<Host>>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveReport>, ApiError> {
    super::handlers::not_arriving(&host)?;
    let vm = the_vm(&host)?;
    let mon = host
        .begin_disk_move()
        .map_err(|why| ApiError(StatusCode::CONFLICT, why.into()))?;
    let h = host.clone();
    let r = blocking(move || {
        vm.move_disk(&req.disk, &req.to, req.format, &mon)
            .map_err(|e| {
                let code = match e {
                    MoveError::NoDisk { .. } => StatusCode::NOT_FOUND,
                    MoveError::Target(_) | MoveError::Create(_) => StatusCode::BAD_REQUEST,
                    MoveError::Cancelled { .. } | MoveError::Device { .. } => StatusCode::CONFLICT,
                    MoveError::Copy { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError(code, e.to_string())
            })
    })
    .await;
    h.end_disk_move();
    Ok(Json(r?))
}

pub async fn status(State(host): State<Arc<Host>>) -> Result<Json<MoveStatus>, ApiError> {
    host.disk_move()
        .0
        .and_then(|m| m.status())
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no disk move has run here".into()))
}

pub async fn cancel(State(host): State<Arc<Host>>, _: NoBody) -> Result<StatusCode, ApiError> {
    match host.disk_move() {
        (Some(m), true) => {
            m.cancel();
            Ok(StatusCode::ACCEPTED)
        }
        _ => Err(ApiError(
            StatusCode::CONFLICT,
            "no disk move is running".into(),
        )),
    }
}
