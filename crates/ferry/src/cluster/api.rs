//! The cluster API every agent serves over TCP (HTTP/JSON; errors as `{"error": ...}`), and
//! its metrics in the Prometheus text format. Every answer is read from, and every change
//! written to, the cluster store, so any agent answers for the whole cluster.
use super::host::Shared;
use super::moves;
use super::VmSpec;
use crate::api::extract::{ApiJson, NoBody};
use crate::api::handlers::{blocking, ApiError};
use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ferry_cluster::agent::{self, DRAIN, LEADER};
use ferry_cluster::net::NetError;
use ferry_cluster::records::{self, Desired, RecordError, VmRecord};
use std::fmt::Write as _;
use std::sync::Arc;

impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> Self {
        let code = match e {
            RecordError::Exists(_) | RecordError::Conflict { .. } | RecordError::HostGone(_) => {
                StatusCode::CONFLICT
            }
            RecordError::NoSuchVm(_) => StatusCode::NOT_FOUND,
            RecordError::Store(_) | RecordError::Net(NetError::Store(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RecordError::Net(NetError::Taken { .. }) => StatusCode::CONFLICT,
            RecordError::Net(NetError::Damaged(..)) => StatusCode::INTERNAL_SERVER_ERROR,
            RecordError::Net(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<ferry_cluster::StoreError> for ApiError {
    fn from(e: ferry_cluster::StoreError) -> Self {
        RecordError::Store(e).into()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct HostInfo {
    pub id: String,
    pub addr: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub leader: bool,
    pub draining: bool,
    pub vms: Vec<String>,
    /// CPUs its VMs used lately.
    pub cpu_used: f64,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub desired: Desired,
    pub priority: i32,
    pub owner: Option<String>,
    pub epoch: Option<i64>,
    pub spec: serde_json::Value,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Create {
    pub name: String,
    pub spec: VmSpec,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub stopped: bool,
}

async fn hosts(State(s): State<Arc<Shared>>) -> Result<Json<Vec<HostInfo>>, ApiError> {
    blocking(move || {
        let leader = s.store.get(LEADER)?.map(|kv| kv.value);
        let (loads, vms) = agent::scores(&*s.store)?;
        let recs = agent::hosts(&*s.store)?;
        Ok(Json(
            recs.into_iter()
                .map(|h| {
                    let mine: Vec<_> = vms.iter().filter(|v| v.host == h.id).collect();
                    HostInfo {
                        leader: leader.as_deref() == Some(h.id.as_bytes()),
                        draining: loads.iter().any(|l| l.id == h.id && l.draining),
                        vms: mine.iter().map(|v| v.name.clone()).collect(),
                        cpu_used: mine.iter().fold(0.0, |a, v| a + v.cpu),
                        id: h.id,
                        addr: h.addr,
                        cpus: h.cpus,
                        memory_bytes: h.memory_bytes,
                    }
                })
                .collect(),
        ))
    })
    .await
}

async fn vms(State(s): State<Arc<Shared>>) -> Result<Json<Vec<VmInfo>>, ApiError> {
    blocking(move || {
        let owners = agent::owners(&*s.store)?;
        Ok(Json(
            records::vms(&*s.store)?
                .into_iter()
                .map(|r| {
                    let o = owners.get(&r.name);
                    VmInfo {
                        owner: o.map(|o| o.host.clone()),
                        epoch: o.map(|o| o.epoch),
                        name: r.name,
                        desired: r.desired,
                        priority: r.priority,
                        spec: r.spec,
                    }
                })
                .collect(),
        ))
    })
    .await
}

fn valid_name(n: &str) -> bool {
    ferry_cluster::membership::valid_id(n)
}

async fn create(
    State(s): State<Arc<Shared>>,
    ApiJson(c): ApiJson<Create>,
) -> Result<StatusCode, ApiError> {
    if !valid_name(&c.name) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "VM name {:?}: 1-64 letters, digits, '-', '_' or '.'",
                c.name
            ),
        ));
    }
    if c.spec.guest.is_some() == c.spec.kernel.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a VM needs exactly one of guest or kernel".into(),
        ));
    }
    let spec = serde_json::to_value(&c.spec)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let rec = VmRecord {
        version: 1,
        name: c.name,
        spec,
        desired: if c.stopped {
            Desired::Stopped
        } else {
            Desired::Running
        },
        priority: c.priority,
    };
    blocking(move || {
        records::define(&*s.store, &rec)?;
        Ok(StatusCode::CREATED)
    })
    .await
}

async fn set(s: Arc<Shared>, name: String, d: Desired) -> Result<StatusCode, ApiError> {
    blocking(move || {
        records::set_desired(&*s.store, &name, d)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn start(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    _: NoBody,
) -> Result<StatusCode, ApiError> {
    set(s, name, Desired::Running).await
}

async fn stop(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    _: NoBody,
) -> Result<StatusCode, ApiError> {
    set(s, name, Desired::Stopped).await
}

async fn delete(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        let (rec, rev) =
            records::vm(&*s.store, &name)?.ok_or_else(|| RecordError::NoSuchVm(name.clone()))?;
        let owner = records::owner(&*s.store, &name)?;
        if rec.desired != Desired::Stopped || owner.is_some() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("VM {name:?} is not stopped: `ferry cluster stop {name}` first"),
            ));
        }
        use ferry_cluster::{Compare, Op};
        let key = format!("{}{name}", records::VMS);
        let owner_key = format!("{}{name}", records::OWNERS);
        let nics = ferry_cluster::net::nics_of(&rec.spec).map_err(RecordError::from)?;
        let mut then = vec![Op::delete(key.clone())];
        then.extend(ferry_cluster::net::unreserve(&nics));
        let r = s.store.txn(
            &[
                Compare::ModRevision(key.clone(), rev),
                Compare::Absent(owner_key),
            ],
            &then,
        )?;
        if !r.succeeded {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("VM {name:?} changed meanwhile; try again"),
            ));
        }
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateNet {
    name: String,
    vni: u32,
    #[serde(default = "default_mtu")]
    mtu: u32,
}

fn default_mtu() -> u32 {
    ferry_cluster::net::DEFAULT_MTU
}

/// `POST /cluster/nets {"name", "vni", "mtu"?}`: defines a virtual network.
async fn create_net(
    State(s): State<Arc<Shared>>,
    ApiJson(c): ApiJson<CreateNet>,
) -> Result<StatusCode, ApiError> {
    use ferry_cluster::net::{self, NetError};
    blocking(move || {
        let n = net::Network {
            version: 1,
            name: c.name,
            vni: c.vni,
            mtu: c.mtu,
        };
        match net::create(&*s.store, &n) {
            Ok(()) => Ok(StatusCode::CREATED),
            Err(e @ (NetError::Exists(_) | NetError::VniTaken(..))) => {
                Err(ApiError(StatusCode::CONFLICT, e.to_string()))
            }
            Err(NetError::Store(e)) => Err(e.into()),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        }
    })
    .await
}

/// `GET /cluster/nets`: every network and the CA→PA map.
async fn nets(State(s): State<Arc<Shared>>) -> Result<Json<serde_json::Value>, ApiError> {
    use ferry_cluster::net;
    blocking(move || {
        let e = |e: net::NetError| RecordError::from(e);
        Ok(Json(serde_json::json!({
            "networks": net::networks(&*s.store).map_err(e)?,
            "map": net::map(&*s.store).map_err(e)?,
        })))
    })
    .await
}

/// `GET /cluster/balance`: the leader's latest decision and each host's load.
async fn balance(State(s): State<Arc<Shared>>) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let leader = s
            .store
            .get(LEADER)?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        let decision = s
            .store
            .get(agent::BALANCE)?
            .and_then(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok());
        let (hosts, vms) = agent::scores(&*s.store)?;
        let loads: Vec<_> = hosts
            .iter()
            .map(|h| {
                let cpu = vms
                    .iter()
                    .filter(|v| v.host == h.id)
                    .fold(0.0, |a, v| a + v.cpu);
                serde_json::json!({"host": h.id, "cpus": h.cpus, "cpu_used": cpu,
                    "share": if h.cpus > 0.0 { cpu / h.cpus } else { 0.0 }, "draining": h.draining})
            })
            .collect();
        Ok(Json(
            serde_json::json!({"leader": leader, "last": decision, "hosts": loads}),
        ))
    })
    .await
}

/// `GET /metrics`: the cluster as this agent sees it, and this agent's own counters.
async fn metrics(State(s): State<Arc<Shared>>) -> Result<String, ApiError> {
    blocking(move || {
        let hosts = agent::hosts(&*s.store)?;
        let draining = s.store.list(DRAIN)?.len();
        let vms = records::vms(&*s.store)?;
        let owners = agent::owners(&*s.store)?;
        let stats = s
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut o = String::new();
        let mut g = |name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g("ferry_hosts", "Live member hosts.", "gauge", hosts.len().to_string());
        g("ferry_hosts_draining", "Hosts marked draining.", "gauge", draining.to_string());
        g("ferry_vms", "Defined VMs.", "gauge", vms.len().to_string());
        let running = vms
            .iter()
            .filter(|v| v.desired == Desired::Running && owners.contains_key(&v.name))
            .count();
        g("ferry_vms_owned_running", "VMs that should run and have an owner.", "gauge", running.to_string());
        g("ferry_agent_leader", "1 while this agent leads.", "gauge", u8::from(stats.leader).to_string());
        g("ferry_agent_vm_starts_total", "VMMs this agent started.", "counter", stats.starts.to_string());
        g("ferry_agent_failovers_total", "VMs this agent, as leader, moved off a failed host.", "counter", stats.failovers.to_string());
        g("ferry_agent_fenced_kills_total", "Local VMMs killed because another host owns their VM.", "counter", stats.fenced_kills.to_string());
        g("ferry_agent_balance_moves_total", "Live migrations this agent's balancer decided.", "counter", stats.balance_moves.to_string());
        g("ferry_agent_vm_crashes_total", "Local VMMs that exited with an error.", "counter", stats.crashes.to_string());
        let rejoins = *s.rejoins.lock().unwrap_or_else(|e| e.into_inner());
        g("ferry_agent_rejoins_total", "Times this agent lost its membership and joined again.", "counter", rejoins.to_string());
        let refused = *s.refused.lock().unwrap_or_else(|e| e.into_inner());
        g("ferry_fenced_writes_refused_total", "Disk writes and flushes the fences of this agent's VMMs refused (counted when a fenced VMM is killed).", "counter", refused.to_string());
        let in_flight = s.runner.lock().migrating();
        g("ferry_migrations_in_flight", "VMMs of this host migrating in or out now.", "gauge", in_flight.to_string());
        let (done, last) = s.migrations.lock().unwrap_or_else(|e| e.into_inner()).clone();
        g("ferry_migrations_total", "Live migrations away from this host that completed.", "counter", done.to_string());
        use std::sync::atomic::Ordering::Relaxed;
        g("ferry_frames_forwarded_total", "Frames for a migrating VM that reached this host after its pause, sent to its new host.", "counter", s.forwarded.load(Relaxed).to_string());
        g("ferry_frames_injected_total", "Frames forwarded from a VM's old host, written into its taps here.", "counter", s.injected.load(Relaxed).to_string());
        let num = |k: &str| last[k].as_f64().unwrap_or(0.0).to_string();
        g("ferry_migration_last_downtime_ms", "The last completed migration's pause, ms.", "gauge", num("downtime_ms"));
        g("ferry_migration_last_total_ms", "The last completed migration's duration, ms.", "gauge", num("total_ms"));
        g("ferry_migration_last_wire_bytes", "The last completed migration's bytes on the wire.", "gauge", num("wire_bytes"));
        let _ = writeln!(o, "# HELP ferry_vm_resident_bytes Memory a local VMM has touched.\n# TYPE ferry_vm_resident_bytes gauge");
        for (vm, b) in s.resident.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "ferry_vm_resident_bytes{{host=\"{}\",vm=\"{vm}\"}} {b}", s.id);
        }
        Ok(o)
    })
    .await
}

pub struct Api {
    _rt: tokio::runtime::Runtime,
}

/// Serves the cluster API on `listener`: over mutual TLS with `tls`, else plain HTTP.
pub fn spawn(
    listener: std::net::TcpListener,
    tls: Option<Arc<ferry_migration::tls::TlsServer>>,
    shared: Arc<Shared>,
) -> Result<Api> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cluster-api")
        .enable_all()
        .build()
        .context("starting the cluster API runtime")?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _g = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let app = Router::new()
        .route("/cluster/hosts", get(hosts))
        .route("/cluster/vms", get(vms).post(create))
        .route("/cluster/vms/{name}", axum::routing::delete(delete))
        .route("/cluster/vms/{name}/start", put(start))
        .route("/cluster/vms/{name}/stop", put(stop))
        .route("/cluster/vms/{name}/migrate", post(moves::migrate))
        .route("/cluster/vms/{name}/handover", put(moves::handover))
        .route(
            "/cluster/hosts/{id}/drain",
            post(moves::drain).delete(moves::undrain),
        )
        .route("/cluster/local/receive", post(moves::receive))
        .route("/cluster/local/migrate", post(moves::local_migrate))
        .route("/cluster/local/quick", post(moves::local_quick))
        .route("/cluster/local/handed/{name}", put(moves::handed))
        .route("/cluster/local/inject/{name}", post(moves::inject))
        .route("/cluster/local/migration/{name}", get(moves::progress))
        .route("/cluster/balance", get(balance))
        .route("/cluster/nets", get(nets).post(create_net))
        .route("/metrics", get(metrics))
        .fallback(crate::api::extract::not_found)
        .method_not_allowed_fallback(crate::api::extract::wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::api::extract::MAX_BODY,
        ))
        .with_state(shared);
    match tls {
        Some(t) => {
            let listener = {
                let _g = rt.enter();
                super::secure::Listener::new(listener, &t)?
            };
            rt.spawn(serve(listener, app));
        }
        None => {
            rt.spawn(serve(listener, app));
        }
    }
    Ok(Api { _rt: rt })
}

async fn serve<L: axum::serve::Listener>(listener: L, app: Router)
where
    L::Addr: std::fmt::Debug,
{
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("cluster API stopped: {e}");
    }
}
