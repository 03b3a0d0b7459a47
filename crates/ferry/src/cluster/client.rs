//! `ferry cluster`: a client of any agent's cluster API (HTTP/1.1 over TCP, or over mutual
//! TLS: `secure`).
use super::api::{HostInfo, VmInfo};
use super::args::{ClusterAction, ClusterArgs, CreateArgs, NetAction};
use super::VmSpec;
use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::time::Duration;

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
type Sender = hyper::client::conn::http1::SendRequest<Body>;

async fn handshake(addr: &str) -> Result<Sender> {
    let stream = super::secure::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("cluster API handshake")?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    addr: &str,
    method: Method,
    uri: &str,
    body: Option<String>,
) -> Result<(u16, String)> {
    sender.ready().await.context("cluster API connection")?;
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(match body {
            Some(b) => Full::new(Bytes::from(b)).boxed(),
            None => Empty::<Bytes>::new().boxed(),
        })
        .context("building request")?;
    let resp = sender.send_request(req).await.with_context(|| {
        if super::secure::client_tls() {
            format!("cluster API request to {addr}")
        } else {
            format!(
                "cluster API request to {addr} (an agent started with --tls-cert talks only \
                 to clients with a certificate: give --tls-cert, --tls-key and --tls-ca)"
            )
        }
    })?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn request(
    addr: &str,
    method: Method,
    uri: &str,
    body: Option<String>,
) -> Result<(u16, String)> {
    let mut sender = handshake(addr).await?;
    send(&mut sender, addr, method, uri, body).await
}

/// A connection to an agent's API kept open for several calls: what must go quickly later
/// (a switch-over's forwarded frames) pays for the TCP and TLS handshakes ahead of time.
pub struct Conn {
    rt: tokio::runtime::Runtime,
    sender: Sender,
    addr: String,
}

impl Conn {
    pub fn open(addr: &str, limit: Duration) -> Result<Conn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sender = rt
            .block_on(async { tokio::time::timeout(limit, handshake(addr)).await })
            .map_err(|_| {
                anyhow::anyhow!("the agent at {addr} did not answer within {limit:?}")
            })??;
        Ok(Conn {
            rt,
            sender,
            addr: addr.to_string(),
        })
    }

    /// One call on the connection, bounded by `limit`: (status, body).
    pub fn call(
        &mut self,
        method: Method,
        uri: &str,
        body: Option<String>,
        limit: Duration,
    ) -> Result<(u16, String)> {
        let (sender, addr) = (&mut self.sender, self.addr.as_str());
        self.rt
            .block_on(async {
                tokio::time::timeout(limit, send(sender, addr, method, uri, body)).await
            })
            .map_err(|_| anyhow::anyhow!("the agent at {addr} did not answer within {limit:?}"))?
    }
}

/// One call bounded by `limit`: (status, body); Err when the agent cannot be reached or
/// does not answer in time.
pub fn call_status(
    addr: &str,
    method: Method,
    uri: &str,
    body: Option<String>,
    limit: Duration,
) -> Result<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async { tokio::time::timeout(limit, request(addr, method, uri, body)).await })
        .map_err(|_| anyhow::anyhow!("the agent at {addr} did not answer within {limit:?}"))?
}

/// The `error` text of an answer.
pub fn error_text(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}

/// One call (30 s); a non-2xx answer becomes its `error` text.
pub fn call(addr: &str, method: Method, uri: &str, body: Option<String>) -> Result<String> {
    call_long(addr, method, uri, body, Duration::from_secs(30))
}

/// As [`call`], bounded by `limit` (a migration or a drain takes as long as it takes).
pub fn call_long(
    addr: &str,
    method: Method,
    uri: &str,
    body: Option<String>,
    limit: Duration,
) -> Result<String> {
    let (status, text) = call_status(addr, method, uri, body, limit)?;
    if !(200..300).contains(&status) {
        bail!("{}", error_text(&text));
    }
    Ok(text)
}

fn gib(b: u64) -> String {
    format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
}

fn net(agent: &str, action: NetAction) -> Result<()> {
    match action {
        NetAction::Create { name, vni, mtu } => {
            let body = serde_json::json!({"name": name, "vni": vni, "mtu": mtu});
            call(agent, Method::POST, "/cluster/nets", Some(body.to_string()))?;
            println!("network {name}: VNI {vni}, MTU {mtu}");
        }
        NetAction::List => {
            let v: serde_json::Value =
                serde_json::from_str(&call(agent, Method::GET, "/cluster/nets", None)?)?;
            let nets: Vec<ferry_cluster::net::Network> =
                serde_json::from_value(v["networks"].clone())?;
            let map: Vec<ferry_cluster::net::MapEntry> = serde_json::from_value(v["map"].clone())?;
            println!("{:<16} {:>8} {:>6}", "NETWORK", "VNI", "MTU");
            for n in &nets {
                println!("{:<16} {:>8} {:>6}", n.name, n.vni, n.mtu);
            }
            println!();
            println!(
                "{:<16} {:<18} {:<16} {:<16} {:<16} PA",
                "NETWORK", "MAC", "CA", "VM", "HOST"
            );
            for m in &map {
                println!(
                    "{:<16} {:<18} {:<16} {:<16} {:<16} {}",
                    m.network,
                    m.mac,
                    m.ca.to_string(),
                    m.vm,
                    m.host,
                    m.pa.map_or("- (none)".into(), |p| p.to_string())
                );
            }
        }
    }
    Ok(())
}

fn create(agent: &str, c: CreateArgs) -> Result<()> {
    let memory_bytes = ferry_vmm::memory::parse_size(&c.memory)?;
    let nics = c
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| super::overlay::parse_nic(n, &c.name, i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let spec = VmSpec {
        cpus: c.cpus,
        memory: c.memory,
        memory_bytes,
        disks: c.disks,
        guest: c.guest,
        kernel: c.kernel,
        cmdline: c.cmdline,
        nics,
        restore_from: None,
    };
    let body = serde_json::json!({
        "name": c.name, "spec": spec, "priority": c.priority, "stopped": c.stopped,
    });
    call(agent, Method::POST, "/cluster/vms", Some(body.to_string()))?;
    println!(
        "VM {} defined{}",
        c.name,
        if c.stopped {
            " (stopped)"
        } else {
            "; the leader places and starts it"
        }
    );
    Ok(())
}

fn print_move(m: &serde_json::Value) {
    let vm = m["vm"].as_str().unwrap_or("?");
    match m.get("error").and_then(|e| e.as_str()) {
        Some(e) => println!("VM {vm}: not moved: {e}"),
        None if m["quick"] == true => println!(
            "VM {vm}: {} -> {} by quick migration: saved to the shared storage and handed over in \
             {:.2} s (it resumes there at that host's next round; stopped meanwhile)",
            m["from"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            m["took_ms"].as_f64().unwrap_or(0.0) / 1e3,
        ),
        None => println!(
            "VM {vm}: {} -> {} live in {:.2} s, paused {:.1} ms",
            m["from"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            m["took_ms"].as_f64().unwrap_or(0.0) / 1e3,
            m["downtime_ms"].as_f64().unwrap_or(0.0)
        ),
    }
}

pub fn main(args: ClusterArgs) -> Result<()> {
    if let Some(files) = args.tls.files() {
        super::secure::use_tls(&files)?;
    }
    let a = &args.agent;
    match args.action {
        ClusterAction::Hosts => {
            let hosts: Vec<HostInfo> =
                serde_json::from_str(&call(a, Method::GET, "/cluster/hosts", None)?)?;
            println!(
                "{:<16} {:<22} {:>4} {:>8} {:>8}  {:<8} VMS",
                "HOST", "AGENT", "CPUS", "MEMORY", "CPU USED", "ROLE"
            );
            for h in hosts {
                let role = match (h.leader, h.draining) {
                    (true, _) => "leader",
                    (_, true) => "draining",
                    _ => "",
                };
                println!(
                    "{:<16} {:<22} {:>4} {:>8} {:>8.2}  {:<8} {}",
                    h.id,
                    h.addr,
                    h.cpus,
                    gib(h.memory_bytes),
                    h.cpu_used,
                    role,
                    h.vms.join(",")
                );
            }
        }
        ClusterAction::Vms => {
            let vms: Vec<VmInfo> =
                serde_json::from_str(&call(a, Method::GET, "/cluster/vms", None)?)?;
            println!(
                "{:<16} {:<8} {:>8} {:<16} {:>8}",
                "VM", "DESIRED", "PRIORITY", "HOST", "EPOCH"
            );
            for v in vms {
                println!(
                    "{:<16} {:<8} {:>8} {:<16} {:>8}",
                    v.name,
                    serde_json::to_value(v.desired)?.as_str().unwrap_or("?"),
                    v.priority,
                    v.owner.as_deref().unwrap_or("-"),
                    v.epoch.map_or("-".to_string(), |e| e.to_string())
                );
            }
        }
        ClusterAction::Create(c) => create(a, c)?,
        ClusterAction::Net { action } => net(a, action)?,
        ClusterAction::Start { name } => {
            call(a, Method::PUT, &format!("/cluster/vms/{name}/start"), None)?;
            println!("VM {name}: should run");
        }
        ClusterAction::Stop { name } => {
            call(a, Method::PUT, &format!("/cluster/vms/{name}/stop"), None)?;
            println!("VM {name}: should stop; its host shuts it down");
        }
        ClusterAction::Migrate {
            name,
            to,
            max_bandwidth,
            quick,
            postcopy,
        } => {
            let max_bandwidth = max_bandwidth
                .map(|b| ferry_vmm::memory::parse_size(&b))
                .transpose()?;
            // The source's agent shows the migration's progress while it runs.
            let vms: Vec<VmInfo> =
                serde_json::from_str(&call(a, Method::GET, "/cluster/vms", None)?)?;
            let hosts: Vec<HostInfo> =
                serde_json::from_str(&call(a, Method::GET, "/cluster/hosts", None)?)?;
            let src = vms
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.owner.as_ref())
                .and_then(|o| hosts.iter().find(|h| &h.id == o))
                .map(|h| h.addr.clone());
            let body = serde_json::json!({
                "to": to, "max_bandwidth": max_bandwidth, "quick": quick, "postcopy": postcopy,
            })
            .to_string();
            let uri = format!("/cluster/vms/{name}/migrate");
            let agent = a.clone();
            let run = std::thread::spawn(move || {
                call_long(
                    &agent,
                    Method::POST,
                    &uri,
                    Some(body),
                    Duration::from_secs(3600),
                )
            });
            if let Some(src) = src {
                let status = format!("/cluster/local/migration/{name}");
                crate::api::progress::follow_with(
                    || {
                        let t = call(&src, Method::GET, &status, None).ok()?;
                        serde_json::from_str(&t).ok()
                    },
                    &run,
                );
            }
            let r = run
                .join()
                .map_err(|_| anyhow::anyhow!("migration request thread panicked"))??;
            let m: serde_json::Value = serde_json::from_str(&r)?;
            if !quick {
                crate::api::client::print_report(m["to"].as_str().unwrap_or("?"), &m["report"]);
            }
            print_move(&m);
        }
        ClusterAction::Drain { host, allow_quick } => {
            eprintln!("draining {host}: its VMs move live, one at a time ...");
            let uri = format!("/cluster/hosts/{host}/drain?allow_quick={allow_quick}");
            let r = call_long(a, Method::POST, &uri, None, Duration::from_secs(24 * 3600))?;
            let moves: Vec<serde_json::Value> = serde_json::from_str(&r)?;
            let failed = moves.iter().filter(|m| m.get("error").is_some()).count();
            for m in &moves {
                print_move(m);
            }
            println!(
                "{host} drained: {} VM(s) moved, {failed} not; nothing is placed there until `ferry cluster undrain {host}`",
                moves.len() - failed
            );
            if failed > 0 {
                bail!("{failed} VM(s) could not move off {host}");
            }
        }
        ClusterAction::Undrain { host } => {
            call(
                a,
                Method::DELETE,
                &format!("/cluster/hosts/{host}/drain"),
                None,
            )?;
            println!("{host}: VMs may be placed there again");
        }
        ClusterAction::Balance { dry_run } => {
            if !dry_run {
                bail!("the balancer runs in the leader by itself; `ferry cluster balance --dry-run` shows what it decided and why");
            }
            let v: serde_json::Value =
                serde_json::from_str(&call(a, Method::GET, "/cluster/balance", None)?)?;
            for h in v["hosts"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:>6.2} of {} CPUs ({:>3.0} %){}",
                    h["host"].as_str().unwrap_or("?"),
                    h["cpu_used"].as_f64().unwrap_or(0.0),
                    h["cpus"],
                    h["share"].as_f64().unwrap_or(0.0) * 100.0,
                    if h["draining"] == true {
                        "  draining"
                    } else {
                        ""
                    }
                );
            }
            let leader = v["leader"].as_str().unwrap_or("none");
            match v["last"].get("decision").and_then(|d| d.as_str()) {
                Some("move") => println!(
                    "leader {leader}, last round: moved {} from {} to {} (live): {}",
                    v["last"]["vm"].as_str().unwrap_or("?"),
                    v["last"]["from"].as_str().unwrap_or("?"),
                    v["last"]["to"].as_str().unwrap_or("?"),
                    v["last"]["why"].as_str().unwrap_or("")
                ),
                Some(_) => println!(
                    "leader {leader}, last round: nothing to move: {}",
                    v["last"]["why"].as_str().unwrap_or("")
                ),
                None => println!("leader {leader}: no balancing round yet (or balancing is off)"),
            }
        }
        ClusterAction::Delete { name } => {
            call(a, Method::DELETE, &format!("/cluster/vms/{name}"), None)?;
            println!("VM {name} deleted");
        }
    }
    Ok(())
}
