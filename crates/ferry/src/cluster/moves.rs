//! Live migration inside the cluster, and drain (docs/cluster.md, "Live migration in the
//! cluster"). Any agent orchestrates: the target's agent starts a `ferry receive` for the VM
//! (`/cluster/local/receive`), the owner's agent has its VMM migrate there with a hand-over
//! (`/cluster/local/migrate`); at the switch-over the source asks its agent to move the
//! ownership (`/cluster/vms/NAME/handover`: a compare-and-swap from the source's epoch) before
//! it sends Commit, and after Commit the destination asks its own agent whether it now owns
//! the VM (`/cluster/local/handed/NAME`) and takes the new epoch before the VM runs.
use super::client::{call, call_long};
use super::host::Shared;
use crate::api::extract::{ApiJson, NoBody};
use crate::api::handlers::{blocking, ApiError};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use ferry_cluster::agent::{self, DRAIN, RESTORE};
use ferry_cluster::records::{self, RecordError};
use ferry_cluster::Op;
use hyper::Method;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn conflict(msg: String) -> ApiError {
    ApiError(StatusCode::CONFLICT, msg)
}

fn gateway(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::BAD_GATEWAY, format!("{e:#}"))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverReq {
    from: i64,
    to: String,
    /// When the VM was paused (CLOCK_MONOTONIC ns): frames for it since then are forwarded.
    #[serde(default)]
    paused_ns: Option<u64>,
}

/// `PUT /cluster/vms/NAME/handover`: the source's switch-over moves the ownership. An
/// unknown outcome (the store did not answer) is settled by trying again: a claim that
/// had gone through shows as the VM already owned by the target.
pub async fn handover(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(h): ApiJson<HandoverReq>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let until = Instant::now() + Duration::from_secs(5);
        // The map writes read when the migration began (`local_migrate`): none of the
        // switch-over's time goes to reading them now.
        let (prepared, capture) = match s.prepared(&name, h.from, &h.to) {
            Some((m, c)) => (Some(m), c),
            None => (None, None),
        };
        loop {
            let map = match &prepared {
                Some(m) => m.clone(),
                None => match records::prepare_claim(&*s.store, &name, &h.to) {
                    Ok(m) => m,
                    Err(RecordError::Store(_)) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            match records::claim_prepared(&*s.store, &name, &h.to, Some(h.from), map) {
                Ok(o) => {
                    if let (Some(fw), Some(ns)) = (&capture, h.paused_ns) {
                        super::forward::forward(fw.clone(), ns, name.clone(), s.clone());
                    }
                    return Ok(Json(json!({"epoch": o.epoch})));
                }
                Err(RecordError::Conflict { now: Some(o), .. })
                    if o.host == h.to && o.epoch > h.from =>
                {
                    return Ok(Json(json!({"epoch": o.epoch})))
                }
                Err(RecordError::Store(_)) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await
}

#[derive(serde::Deserialize)]
pub struct HandedQuery {
    host: String,
}

/// `PUT /cluster/local/handed/NAME?host=ID`: this host's arriving VMM, after Commit, asks
/// whether the VM is now owned here; the answer carries the epoch and this host's deadline.
pub async fn handed(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(q): Query<HandedQuery>,
    _: NoBody,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let slot = s
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        let o = match slot {
            Some(slot) => owner_of_arrival(&s, &name, slot)?,
            None => records::owner(&*s.store, &name)?,
        };
        match o {
            Some(o) if o.host == s.id && q.host == s.id => {
                if !s.runner.lock().handed(&name, o.epoch) {
                    return Err(conflict(format!("no VMM of {name} is arriving here")));
                }
                Ok(Json(json!({
                    "epoch": o.epoch,
                    "deadline_ns": s.deadline_ns.load(Ordering::SeqCst),
                })))
            }
            o => Err(conflict(format!(
                "VM {name} is not owned by {} (owner: {o:?})",
                s.id
            ))),
        }
    })
    .await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveReq {
    vm: String,
    epoch: i64,
}

/// `POST /cluster/local/receive`: start a `ferry receive` for an arriving VM.
pub async fn receive(
    State(s): State<Arc<Shared>>,
    ApiJson(r): ApiJson<ReceiveReq>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let ip = s
            .addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let addr = s
            .runner
            .lock()
            .receive(&r.vm, r.epoch, ip, &s.addr, &s.id)
            .map_err(conflict)?;
        watch_arrival(&s, &r.vm, r.epoch);
        Ok(Json(json!({ "addr": addr })))
    })
    .await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalMigrateReq {
    vm: String,
    to_addr: String,
    to_host: String,
    epoch: i64,
    #[serde(default)]
    max_bandwidth: Option<u64>,
    /// Switch to post-copy after the first pass.
    #[serde(default)]
    postcopy: bool,
}

/// `POST /cluster/local/migrate`: this host's VMM of `vm` migrates to `to_addr`, handing
/// the ownership over to `to_host` at the switch-over. Answers with the migration report.
pub async fn local_migrate(
    State(s): State<Arc<Shared>>,
    ApiJson(r): ApiJson<LocalMigrateReq>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        ours(&s, &r.vm, r.epoch)?;
        let sock = s
            .runner
            .lock()
            .set_leaving(&r.vm, true)
            .ok_or_else(|| conflict(format!("VM {} has no VMM on this host", r.vm)))?;
        let tls = s.runner.lock().tls.clone();
        let mut body = json!({
            "to": r.to_addr,
            "max_bandwidth": r.max_bandwidth,
            "postcopy_after": r.postcopy.then_some(1),
            "handover": {"agent": s.addr, "vm": r.vm, "from": r.epoch, "to": r.to_host},
        });
        match records::prepare_claim(&*s.store, &r.vm, &r.to_host) {
            Ok(map) => {
                let capture = capture_for(&s, &r.vm, &r.to_host);
                let p = super::host::Prepared {
                    from: r.epoch,
                    to: r.to_host.clone(),
                    map,
                    capture,
                };
                s.prepare(&r.vm, p);
            }
            Err(e) => tracing::warn!("VM {}: reading its hand-over ahead: {e}", r.vm),
        }
        match tls {
            Some((cert, key, ca)) => {
                body["tls"] = json!({"cert": cert, "key": key, "ca": ca});
            }
            None => body["insecure"] = json!(true),
        }
        let out =
            crate::api::client::call(&sock, Method::PUT, "/vm/migrate", Some(body.to_string()));
        s.prepared_done(&r.vm);
        match out {
            Ok(report) => {
                let report = report.unwrap_or(Value::Null);
                s.record_migration(&report);
                Ok(Json(report))
            }
            Err(e) => {
                // The VM stays here, running (refused or failed before the hand-over),
                // or paused (the hand-over in doubt): the owner record settles which copy
                // may run, once the store answers (`settle`, on a thread of its own).
                let (s2, vm) = (s.clone(), r.vm.clone());
                let settling = std::thread::Builder::new()
                    .name("ferry-settle".into())
                    .spawn(move || settle(&s2, &vm, r.epoch, &sock));
                if let Err(te) = settling {
                    tracing::warn!("no thread to settle VM {}: {te}", r.vm);
                }
                Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e:#}"),
                ))
            }
        }
    })
    .await
}

/// Watches VM `vm`'s owner record from revision `epoch` on (the owner when its migration
/// here began): the hand-over's claim, once etcd announces it, answers `handed` without a
/// read across the network in the switch-over.
fn watch_arrival(s: &Arc<Shared>, vm: &str, epoch: i64) {
    let slot: super::host::Arrival = Arc::default();
    let mut all = s.arrivals.lock().unwrap_or_else(|e| e.into_inner());
    all.insert(vm.to_string(), slot.clone());
    drop(all);
    let (s, vm) = (s.clone(), vm.to_string());
    let key = format!("{}{vm}", records::OWNERS);
    let r = std::thread::Builder::new()
        .name("ferry-arrival".into())
        .spawn(move || {
            let until = Instant::now() + Duration::from_secs(3600);
            while Instant::now() < until {
                match s.store.wait_key(&key, epoch, Duration::from_secs(5)) {
                    Ok(Some(Some(kv))) => {
                        let o = records::Owner {
                            host: String::from_utf8_lossy(&kv.value).into_owned(),
                            epoch: kv.mod_revision,
                        };
                        if o.host == s.id {
                            s.runner.lock().pin(&vm); // before its frames come here
                        }
                        let mut got = slot.0.lock().unwrap_or_else(|e| e.into_inner());
                        got.get_or_insert(o);
                        slot.1.notify_all();
                        return;
                    }
                    Ok(Some(None)) => return,
                    Ok(None) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(500)),
                }
                let waiting = s.arrivals.lock().unwrap_or_else(|e| e.into_inner());
                if !waiting.get(&vm).is_some_and(|a| Arc::ptr_eq(a, &slot)) {
                    return; // handed, or another arrival of it began
                }
            }
        });
    if let Err(e) = r {
        tracing::warn!("no thread to watch an arrival's owner record: {e}");
    }
}

/// The owner of arriving VM `vm` after its hand-over: the watch's report or a linearizable
/// read, whichever comes first (both are committed facts; the read starts after Commit,
/// which follows the claim).
fn owner_of_arrival(
    s: &Arc<Shared>,
    vm: &str,
    slot: super::host::Arrival,
) -> Result<Option<records::Owner>, ApiError> {
    let (store, name, s2) = (s.store.clone(), vm.to_string(), slot.clone());
    let reader = std::thread::Builder::new()
        .name("ferry-owner-read".into())
        .spawn(move || {
            let r = records::owner(&*store, &name);
            let mut got = s2.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(Some(o)) = &r {
                got.get_or_insert(o.clone());
            }
            s2.1.notify_all();
            r
        });
    let got = slot.0.lock().unwrap_or_else(|e| e.into_inner());
    let (got, _) = slot
        .1
        .wait_timeout_while(got, Duration::from_secs(10), |g| g.is_none())
        .unwrap_or_else(|e| e.into_inner());
    if let Some(o) = got.clone() {
        return Ok(Some(o));
    }
    drop(got);
    // Neither said anything in time: what the read says, if it ended.
    match reader.map(|t| t.join()) {
        Ok(Ok(r)) => Ok(r?),
        _ => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the owner of {vm} could not be read"),
        )),
    }
}

/// Watches the VXLAN devices of VM `vm`'s networks for frames to its NICs (to forward what
/// arrives after the pause to host `to`'s agent); None when it has no NICs on networks.
fn capture_for(s: &Shared, vm: &str, to: &str) -> Option<Arc<super::forward::Forwarder>> {
    let overlay = s.runner.lock().overlay.clone()?;
    let nics = overlay.nics_of_vm(vm).ok()?;
    if nics.is_empty() {
        return None;
    }
    let nets = ferry_cluster::net::networks(&*s.store).ok()?;
    let to_agent = agent::hosts(&*s.store)
        .ok()?
        .into_iter()
        .find(|h| h.id == to)?
        .addr;
    let devs: Vec<(String, [u8; 6])> = nics
        .iter()
        .filter_map(|n| {
            let vni = nets.iter().find(|x| x.name == n.network)?.vni;
            let mac: ferry_net::overlay::Mac = n.mac.parse().ok()?;
            Some((format!("fvx{vni}"), mac.0))
        })
        .collect();
    match super::forward::Capture::start(&devs) {
        Ok(c) => Some(Arc::new(super::forward::Forwarder::new(c, to_agent))),
        Err(e) => {
            tracing::warn!("VM {vm}: no capture of its frames for the switch-over: {e}");
            None
        }
    }
}

/// `POST /cluster/local/inject/NAME {"frames": [[nic, "hex"], ...]}`: frames that reached
/// VM NAME's old host during its switch-over, written into its taps here.
pub async fn inject(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(v): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        if s.runner.lock().overlay.is_none() {
            return Err(conflict(
                "this host carries no virtual networks (no --provider-addr)".into(),
            ));
        }
        if s.runner.lock().socket(&name).is_none() {
            return Err(conflict(format!("VM {name} has no VMM on this host")));
        }
        // No store read: the taps' names follow from the VM's name (the same on every host).
        let frames = super::forward::parse(&v);
        let nics = frames.iter().map(|(i, _)| i + 1).max().unwrap_or(0).min(64);
        let taps: Vec<String> = (0..nics)
            .map(|i| super::overlay::tap_name(&name, i))
            .collect();
        let n = super::forward::inject(&taps, &frames);
        s.injected
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Json(json!({ "injected": n, "of": frames.len() })))
    })
    .await
}

/// After a live migration away from this host failed: reads the owner record (linearizable)
/// until the store answers, then hands VM `vm`'s VMM back to the reconcile loop. Still this
/// host's at `epoch` → the VMM runs on here (resumed if the failure left it paused: a
/// hand-over in doubt whose compare-and-swap did not go through; a fenced VMM stays paused,
/// its `resume` is refused); owned elsewhere → the loop kills this copy. Until then the VMM
/// stays marked leaving and paused: neither copy runs while the outcome is unknown.
fn settle(s: &Shared, vm: &str, epoch: i64, sock: &std::path::Path) {
    let owner = loop {
        match records::owner(&*s.store, vm) {
            Ok(o) => break o,
            Err(e) => {
                if s.runner.lock().socket(vm).is_none() {
                    return; // the VMM is gone: nothing to settle
                }
                tracing::info!("VM {vm}: waiting for the store to settle a failed move: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let ours = owner
        .as_ref()
        .is_some_and(|o| o.host == s.id && o.epoch == epoch);
    if ours {
        let paused = crate::api::client::call(sock, Method::GET, "/vm", None)
            .ok()
            .flatten()
            .is_some_and(|v| v["state"] == "paused");
        if paused {
            match crate::api::client::call(sock, Method::PUT, "/vm/resume", None) {
                Ok(_) => eprintln!(
                    "ferry host {}: VM {vm}: the hand-over did not happen (still this \
                     host's at epoch {epoch}): resumed here",
                    s.id
                ),
                Err(e) => eprintln!("ferry host {}: VM {vm}: resuming it: {e:#}", s.id),
            }
        }
    } else {
        eprintln!(
            "ferry host {}: VM {vm}: owned by {owner:?} after the failed move: this copy \
             stops",
            s.id
        );
    }
    s.runner.lock().set_leaving(vm, false);
}

/// VM `name`'s owner, its host's agent address, and where it goes: `to`, or the best host
/// other than its own; never a draining host.
fn source_and_target(
    s: &Shared,
    name: &str,
    to: Option<String>,
) -> Result<(records::Owner, String, String), ApiError> {
    let o = records::owner(&*s.store, name)?
        .ok_or_else(|| conflict(format!("VM {name} is not running (it has no owner)")))?;
    let (rec, _) =
        records::vm(&*s.store, name)?.ok_or_else(|| RecordError::NoSuchVm(name.into()))?;
    let hosts = agent::hosts(&*s.store)?;
    let src = hosts
        .iter()
        .find(|h| h.id == o.host)
        .ok_or_else(|| conflict(format!("VM {name}'s host {} is not a live member", o.host)))?
        .addr
        .clone();
    let target = match to {
        Some(t) if t == o.host => return Err(conflict(format!("VM {name} already runs on {t}"))),
        Some(t) => t,
        None => {
            let (hl, vl) = agent::scores(&*s.store)?;
            let hl: Vec<_> = hl.into_iter().filter(|h| h.id != o.host).collect();
            let mem = rec
                .spec
                .get("memory_bytes")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            ferry_cluster::balance::place(&hl, &vl, mem)
                .ok_or_else(|| conflict(format!("no other host can take VM {name}")))?
        }
    };
    if !hosts.iter().any(|h| h.id == target) {
        return Err(conflict(format!("host {target} is not a live member")));
    }
    if s.store.get(&format!("{DRAIN}{target}"))?.is_some() {
        return Err(conflict(format!(
            "host {target} is draining: nothing moves there until `ferry cluster undrain {target}`"
        )));
    }
    Ok((o, src, target))
}

/// Has the owner's agent at `src` move VM `name` (`path`: its local migrate or quick
/// route); its answer (the report).
fn order(src: &str, path: &str, body: &Value, name: &str) -> Result<Value, ApiError> {
    let r = call_long(
        src,
        Method::POST,
        path,
        Some(body.to_string()),
        Duration::from_secs(3600),
    )
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("VM {name}: {e:#}"),
        )
    })?;
    Ok(serde_json::from_str(&r).unwrap_or(Value::Null))
}

/// Refused unless VM `vm` is this host's at `epoch`.
fn ours(s: &Shared, vm: &str, epoch: i64) -> Result<(), ApiError> {
    match records::owner(&*s.store, vm)? {
        Some(o) if o.host == s.id && o.epoch == epoch => Ok(()),
        o => Err(conflict(format!(
            "VM {vm} is not this host's at epoch {epoch} (owner: {o:?})"
        ))),
    }
}

/// How a live move runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct MoveOpts {
    /// Bytes per second over all connections.
    pub max_bandwidth: Option<u64>,
    /// Post-copy after the first pass.
    pub postcopy: bool,
}

/// Moves VM `name` live to `to` (or the best host other than its own): the orchestration.
fn move_vm(s: &Shared, name: &str, to: Option<String>, opts: MoveOpts) -> Result<Value, ApiError> {
    let (o, src, target) = source_and_target(s, name, to)?;
    let dst_addr = agent::hosts(&*s.store)?
        .into_iter()
        .find(|h| h.id == target)
        .map(|h| h.addr)
        .ok_or_else(|| conflict(format!("host {target} is not a live member")))?;
    let t0 = Instant::now();
    let r = call(
        &dst_addr,
        Method::POST,
        "/cluster/local/receive",
        Some(json!({"vm": name, "epoch": o.epoch}).to_string()),
    )
    .map_err(gateway)?;
    let at: Value = serde_json::from_str(&r).map_err(|e| gateway(e.into()))?;
    let at = at["addr"].as_str().unwrap_or_default().to_string();
    let body = json!({
        "vm": name, "to_addr": at, "to_host": target, "epoch": o.epoch,
        "max_bandwidth": opts.max_bandwidth, "postcopy": opts.postcopy,
    });
    let report = order(&src, "/cluster/local/migrate", &body, name)?;
    Ok(json!({
        "vm": name, "from": o.host, "to": target, "took_ms": t0.elapsed().as_millis() as u64,
        "downtime_ms": report["downtime_ms"], "report": report,
    }))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MigrateReq {
    #[serde(default)]
    to: Option<String>,
    /// Bytes per second over all connections.
    #[serde(default)]
    max_bandwidth: Option<u64>,
    /// Quick migration (pause, save to the shared storage, resume there) instead of live.
    #[serde(default)]
    quick: bool,
    /// Post-copy after the first pass.
    #[serde(default)]
    postcopy: bool,
}

/// `POST /cluster/vms/NAME/migrate {"to": HOST?}`.
pub async fn migrate(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(r): ApiJson<MigrateReq>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        if r.quick {
            quick_vm(&s, &name, r.to).map(Json)
        } else {
            let opts = MoveOpts {
                max_bandwidth: r.max_bandwidth,
                postcopy: r.postcopy,
            };
            move_vm(&s, &name, r.to, opts).map(Json)
        }
    })
    .await
}

/// `POST /cluster/hosts/ID/drain[?allow_quick=true]`: marks the host (nothing is placed on
/// it) and moves its VMs live, one at a time, highest priority first (with `allow_quick`, a
/// VM whose live move fails goes by quick migration); `DELETE` of the same path (undrain)
/// stops it before the next VM. Answers with each VM's outcome.
#[derive(serde::Deserialize, Default)]
pub struct DrainQuery {
    /// A VM that cannot move live moves by quick migration instead.
    #[serde(default)]
    allow_quick: bool,
}

pub async fn drain(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<DrainQuery>,
    _: NoBody,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        if !agent::hosts(&*s.store)?.iter().any(|h| h.id == id) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no live host {id}"),
            ));
        }
        let key = format!("{DRAIN}{id}");
        s.store.put(&key, b"")?;
        let owners = agent::owners(&*s.store)?;
        let mut vms: Vec<_> = records::vms(&*s.store)?
            .into_iter()
            .filter(|v| owners.get(&v.name).is_some_and(|o| o.host == id))
            .collect();
        vms.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        let mut out = Vec::new();
        for v in vms {
            if s.store.get(&key)?.is_none() {
                out.push(json!({"vm": v.name, "error": "drain cancelled (undrain)"}));
                continue;
            }
            match move_vm(&s, &v.name, None, MoveOpts::default()) {
                Ok(m) => out.push(m),
                Err(ApiError(_, e)) if q.allow_quick => {
                    tracing::warn!(
                        "drain: VM {} could not move live ({e}); quick migration",
                        v.name
                    );
                    match quick_vm(&s, &v.name, None) {
                        Ok(mut m) => {
                            m["live_error"] = e.into();
                            out.push(m)
                        }
                        Err(ApiError(_, e2)) => out.push(
                            json!({"vm": v.name, "error": format!("live: {e}; quick: {e2}")}),
                        ),
                    }
                }
                Err(ApiError(_, e)) => out.push(json!({"vm": v.name, "error": e})),
            }
        }
        Ok(Json(Value::Array(out)))
    })
    .await
}

/// `DELETE /cluster/hosts/ID/drain`: VMs may be placed there again; a drain in progress
/// stops before its next VM.
pub async fn undrain(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        s.store.txn(&[], &[Op::delete(format!("{DRAIN}{id}"))])?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// `GET /cluster/local/migration/NAME`: the progress of this host's VMM of NAME migrating
/// away (its `GET /vm/migration`).
pub async fn progress(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let sock = s
            .runner
            .lock()
            .socket(&name)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no VMM of {name} here")))?;
        let v = crate::api::client::call(&sock, Method::GET, "/vm/migration", None)
            .map_err(|e| ApiError(StatusCode::NOT_FOUND, format!("{e:#}")))?;
        Ok(Json(v.unwrap_or(Value::Null)))
    })
    .await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickReq {
    vm: String,
    to_host: String,
    epoch: i64,
}

/// `POST /cluster/local/quick`: a quick migration through the shared storage. This host's
/// VMM of `vm` saves the VM (state and memory) to `STORAGE/.ferry-quick/NAME` and stops once
/// it is durable; only then does the ownership move to `to_host` (a compare-and-swap from
/// `epoch`), whose agent resumes the VM from there (`/ferry/restore/NAME`).
pub async fn local_quick(
    State(s): State<Arc<Shared>>,
    ApiJson(r): ApiJson<QuickReq>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        ours(&s, &r.vm, r.epoch)?;
        let dir = s.storage.join(".ferry-quick").join(&r.vm);
        let sock = s
            .runner
            .lock()
            .set_leaving(&r.vm, true)
            .ok_or_else(|| conflict(format!("VM {} has no VMM on this host", r.vm)))?;
        let body = json!({"to": dir, "then": "stop"});
        let t0 = Instant::now();
        let saved =
            crate::api::client::call(&sock, Method::PUT, "/vm/snapshot", Some(body.to_string()));
        let saved = match saved {
            Ok(v) => v.unwrap_or(Value::Null),
            Err(e) => {
                s.runner.lock().set_leaving(&r.vm, false);
                return Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("saving VM {}: {e:#}", r.vm),
                ));
            }
        };
        // Stopped and durable: the state goes to the target with the ownership.
        let key = format!("{RESTORE}{}", r.vm);
        s.store.put(&key, dir.to_string_lossy().as_bytes())?;
        match records::claim(&*s.store, &r.vm, &r.to_host, Some(r.epoch)) {
            Ok(o) => Ok(Json(json!({"epoch": o.epoch, "saved": saved,
                "took_ms": t0.elapsed().as_millis() as u64}))),
            // Not handed over: the VM, still this host's, starts again here from what was
            // saved (the restore key stays).
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// Moves VM `name` by quick migration (pause, save to the shared storage, resume there).
fn quick_vm(s: &Shared, name: &str, to: Option<String>) -> Result<Value, ApiError> {
    let (o, src, target) = source_and_target(s, name, to)?;
    let t0 = Instant::now();
    let body = json!({"vm": name, "to_host": target, "epoch": o.epoch});
    let r = order(&src, "/cluster/local/quick", &body, name)?;
    let paused = r["saved"]["paused_ms"].clone();
    Ok(json!({
        "vm": name, "from": o.host, "to": target, "quick": true,
        "took_ms": t0.elapsed().as_millis() as u64, "downtime_ms": paused, "report": r,
    }))
}
