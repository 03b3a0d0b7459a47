//! Live migration through the API: `PUT /vm/migrate` runs it (the answer is the report),
//! `GET /vm/migration` shows its progress during and after, `PUT /vm/migration/cancel` stops
//! it (the VM keeps running here).
use super::extract::{ApiJson, NoBody};
use super::handlers::{blocking, the_vm, ApiError};
use super::host::Host;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_migration::engine::{migrate, EngineError, Monitor, Options, Report, Status};
use ferry_migration::engine::{CopyPriority, TimeoutPolicy};
use ferry_migration::protocol::Compression;
use ferry_migration::tls::{TlsClient, TlsFiles};
use ferry_migration::transport::Conn;
use ferry_vmm::{RunState, Vm};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `PUT /vm/migrate` body; every field but `to` has the CLI's default.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    to: String,
    #[serde(default = "default_downtime")]
    downtime_limit_ms: u64,
    #[serde(default = "default_passes")]
    max_passes: u32,
    #[serde(default = "default_compress")]
    compress: Compression,
    #[serde(default)]
    max_bandwidth: Option<u64>,
    #[serde(default = "default_connections")]
    connections: u32,
    #[serde(default)]
    auto_converge: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    on_timeout: TimeoutPolicy,
    #[serde(default)]
    postcopy_after: Option<u32>,
    #[serde(default)]
    auto_postcopy: bool,
    #[serde(default)]
    copy_priority: CopyPriority,
    /// TLS credentials (paths on this host); required unless `insecure`.
    #[serde(default)]
    tls: Option<TlsRequest>,
    /// Plain TCP: no authentication, no encryption.
    #[serde(default)]
    insecure: bool,
    /// The disks come too (shared-nothing migration).
    #[serde(default)]
    copy_storage: bool,
    /// The destination holds a seed of this VM: pass 1 sends only what differs from it.
    #[serde(default)]
    seeded: bool,
    /// Where the destination puts each disk: `[{"disk": ID, "path": P, "format": F}]`.
    #[serde(default)]
    disk_map: Vec<DiskMapEntry>,
    /// A cluster VM's ownership hand-over at the switch-over (set by its agent).
    #[serde(default)]
    handover: Option<Handover>,
}

/// `handover` of a migrate request: before Commit the source asks `agent` to move VM `vm`
/// from epoch `from` to host `to` (docs/cluster.md, "Live migration in the cluster").
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    pub agent: String,
    pub vm: String,
    pub from: i64,
    pub to: String,
}

/// One `disk_map` entry of a migrate request.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct DiskMapEntry {
    pub disk: String,
    pub path: String,
    #[serde(default)]
    pub format: Option<ferry_storage::Format>,
}

/// The `tls` member of a migrate request.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TlsRequest {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Names the destination's certificate must be valid for (one is enough); empty: the host
    /// of `to`.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// `PUT /vm/migration/resume-postcopy` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    #[serde(default)]
    to: Option<String>,
}

// The engine's defaults, so an API client gets what `ferry migrate` gives.
fn default_downtime() -> u64 {
    Options::default().downtime_limit.as_millis() as u64
}
fn default_passes() -> u32 {
    Options::default().max_passes
}
fn default_compress() -> Compression {
    Options::default().compression
}
fn default_connections() -> u32 {
    Options::default().connections
}

fn connect(to: &str, tls: Option<&TlsClient>) -> std::io::Result<Conn> {
    Conn::connect(to, tls, crate::run::MIGRATION_IO_TIMEOUT).map_err(std::io::Error::other)
}

fn live_migrate(vm: &Vm, req: MigrateRequest, mon: &Monitor) -> Result<Report, ApiError> {
    if vm.state() != RunState::Running && vm.state() != RunState::Paused {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("cannot migrate: the VM is {}", vm.state()),
        ));
    }
    if req.handover.is_none() && ferry_storage::fence::installed().is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this VM belongs to a cluster (its VMM is fenced): move it with `ferry cluster \
             migrate`, which hands its ownership over at the switch-over"
                .into(),
        ));
    }
    if !(1..=ferry_migration::protocol::MAX_CONNECTIONS).contains(&req.connections) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "connections must be 1..={}",
                ferry_migration::protocol::MAX_CONNECTIONS
            ),
        ));
    }
    if !req.disk_map.is_empty() && !req.copy_storage {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "disk_map is for a migration with copy_storage".into(),
        ));
    }
    let tls =
        match (&req.tls, req.insecure) {
            (Some(_), true) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "give either tls or insecure, not both".into(),
                ))
            }
            (None, false) => return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "a migration needs TLS credentials (tls: cert, key, ca; see `ferry certs`) or an \
                 explicit insecure: true for plain TCP"
                    .into(),
            )),
            (Some(t), false) => Some(
                TlsClient::new(&TlsFiles {
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    ca: t.ca.clone(),
                    peers: t.peers.clone(),
                })
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?,
            ),
            (None, true) => None,
        };
    if let (Some(_), Some(t)) = (&req.handover, &req.tls) {
        // The hand-over asks this VMM's agent, whose API takes the same credentials.
        crate::cluster::secure::use_tls(&TlsFiles::any_peer(
            t.cert.clone(),
            t.key.clone(),
            t.ca.clone(),
        ))
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    }
    let ctl = connect(&req.to, tls.as_ref()).map_err(|e| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot connect to {}: {e}; the VM keeps running here",
                req.to
            ),
        )
    })?;
    let opts = Options {
        downtime_limit: Duration::from_millis(req.downtime_limit_ms),
        max_passes: req.max_passes,
        compression: req.compress,
        max_bandwidth: req.max_bandwidth,
        connections: req.connections,
        auto_converge: req.auto_converge,
        timeout: req.timeout_ms.map(Duration::from_millis),
        on_timeout: req.on_timeout,
        postcopy_after: req.postcopy_after,
        auto_postcopy: req.auto_postcopy,
        copy_priority: req.copy_priority,
        io_timeout: crate::run::MIGRATION_IO_TIMEOUT,
        copy_storage: req.copy_storage,
        seeded: req.seeded,
        disk_map: req
            .disk_map
            .iter()
            .map(|m| {
                (
                    m.disk.clone(),
                    m.path.clone(),
                    m.format.map(|f| f.to_string()),
                )
            })
            .collect(),
    };
    let to = req.to.clone();
    let handover = req.handover.clone();
    let source =
        ferry_vmm::live::LiveSource::new(vm).before_commit(move |paused| match &handover {
            Some(h) => crate::cluster::hand_over(&h.agent, &h.vm, h.from, &h.to, paused),
            None => Ok(()),
        });
    // A post-copy that reconnects goes where `--resume-postcopy --to` last said, if it did.
    let connect_now = || connect(&mon.target().unwrap_or_else(|| to.clone()), tls.as_ref());
    match migrate(&source, ctl, &connect_now, &opts, mon) {
        Ok(report) => {
            vm.shutdown_after_handoff()?;
            Ok(report)
        }
        Err(e) if e.committed() => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(ApiError(
            match e {
                EngineError::Cancelled => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            format!(
                "migration to {} failed: {e}; the VM keeps running here",
                req.to
            ),
        )),
    }
}

/// Live-migrates the VM; on success this VMM's VM stops (its process exits).
pub async fn start(
    State(host): State<Arc<Host>>,
    ApiJson(req): ApiJson<MigrateRequest>,
) -> Result<Json<Report>, ApiError> {
    super::handlers::not_arriving(&host)?;
    let vm = the_vm(&host)?;
    let mon = host
        .begin_migration()
        .map_err(|why| ApiError(StatusCode::CONFLICT, why.into()))?;
    let h = host.clone();
    let r = blocking(move || live_migrate(&vm, req, &mon)).await;
    h.end_migration();
    Ok(Json(r?))
}

/// The running (or last) migration's progress.
pub async fn status(State(host): State<Arc<Host>>) -> Result<Json<Status>, ApiError> {
    host.migration()
        .map(|m| Json(m.status()))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no migration has run here".into()))
}

/// Asks a post-copy whose link broke to reconnect now (to a new address if given).
pub async fn resume_postcopy(
    State(host): State<Arc<Host>>,
    ApiJson(req): ApiJson<ResumeRequest>,
) -> Result<StatusCode, ApiError> {
    match host.migration() {
        Some(m) if host.migrating() && m.status().phase.is_postcopy() => {
            m.resume_postcopy(req.to);
            Ok(StatusCode::ACCEPTED)
        }
        _ => Err(ApiError(
            StatusCode::CONFLICT,
            "no post-copy migration is running here".into(),
        )),
    }
}

/// Cancels the running migration; it rolls back unless it has already committed.
pub async fn cancel(State(host): State<Arc<Host>>, _: NoBody) -> Result<StatusCode, ApiError> {
    if let Some(m) = host.migration() {
        if m.status().phase.is_postcopy() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                "the VM already runs on the destination (post-copy): a migration cannot be \
                 cancelled after its switch-over"
                    .into(),
            ));
        }
    }
    match host.migration() {
        Some(m) if host.migrating() => {
            m.cancel();
            Ok(StatusCode::ACCEPTED)
        }
        _ => Err(ApiError(
            StatusCode::CONFLICT,
            "no migration is running".into(),
        )),
    }
}
