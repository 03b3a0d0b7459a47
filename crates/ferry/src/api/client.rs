//! `ferry vm|snapshot|migrate`: a small HTTP/1.1 client over the API's Unix socket (hyper).
use crate::cli::{
    Compress, MigrateArgs, OnTimeout, Priority, SnapshotArgs, Then, VmAction, VmArgs,
};
use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::path::Path;

/// Sends one request; returns the status code and body.
pub async fn request(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<String>,
) -> Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to API socket {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("API handshake")?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(match body {
            Some(b) => Full::new(Bytes::from(b)).boxed(),
            None => Empty::<Bytes>::new().boxed(),
        })
        .context("building request")?;
    let resp = sender.send_request(req).await.context("API request")?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("API response")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends one request and returns the answer's JSON; a non-2xx answer becomes its error text.
pub fn call(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<String>,
) -> Result<Option<serde_json::Value>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, text) = rt.block_on(request(socket, method, uri, body))?;
    if !(200..300).contains(&status) {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        bail!("{msg}");
    }
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&text).context("API answer")?))
}

pub fn main(args: VmArgs) -> Result<()> {
    if !matches!(args.action, VmAction::Restore) && (args.from.is_some() || args.lazy_check) {
        bail!("--from and --lazy-check are for 'ferry vm restore'");
    }
    if let (VmAction::Restore, Some(from)) = (args.action, &args.from) {
        let from = std::path::absolute(from).with_context(|| format!("{}", from.display()))?;
        let body = serde_json::json!({ "from": from, "lazy_check": args.lazy_check }).to_string();
        let v = call(&args.api_socket, Method::PUT, "/vm/restore", Some(body))?
            .context("empty restore answer")?;
        println!(
            "restored {} (chain of {}, {} MiB mapped), running; ready in {:.1} ms",
            from.display(),
            v["chain"],
            v["bytes_mapped"].as_u64().unwrap_or(0) >> 20,
            v["ready_ms"].as_f64().unwrap_or(0.0)
        );
        return Ok(());
    }
    let (method, uri) = match args.action {
        VmAction::Restore => bail!("restore needs --from DIR"),
        VmAction::Info => (Method::GET, "/vm"),
        VmAction::Pause => (Method::PUT, "/vm/pause"),
        VmAction::Resume => (Method::PUT, "/vm/resume"),
        VmAction::Shutdown => (Method::PUT, "/vm/shutdown"),
        VmAction::Migration => (Method::GET, "/vm/migration"),
        VmAction::CancelMigration => (Method::PUT, "/vm/migration/cancel"),
    };
    if let Some(v) = call(&args.api_socket, method, uri, None)? {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

fn snapshot_call(socket: &Path, to: &Path, diff: bool, then: Then) -> Result<serde_json::Value> {
    let to = std::path::absolute(to).with_context(|| format!("{}", to.display()))?;
    let body = serde_json::json!({ "to": to, "diff": diff, "then": then }).to_string();
    call(socket, Method::PUT, "/vm/snapshot", Some(body))?.context("empty snapshot answer")
}

fn describe(v: &serde_json::Value) -> String {
    let mib = v["bytes_stored"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    let zeroed = match v["zero_pages"].as_u64() {
        Some(z) if z > 0 => format!(", {z} zeroed"),
        _ => String::new(),
    };
    format!(
        "{} snapshot {:#x}: {mib:.1} MiB of memory ({} pages{zeroed}), written, fsynced and \
         verified in {:.1} ms (scan+write {:.0}, fsync {:.0}, verify {:.0}); guest stopped {:.1} ms",
        if v["diff"].as_bool() == Some(true) {
            "diff"
        } else {
            "full"
        },
        v["id"].as_u64().unwrap_or(0),
        v["pages_stored"],
        v["elapsed_ms"].as_f64().unwrap_or(0.0),
        v["scan_write_ms"].as_f64().unwrap_or(0.0),
        v["sync_ms"].as_f64().unwrap_or(0.0),
        v["verify_ms"].as_f64().unwrap_or(0.0),
        v["paused_ms"].as_f64().unwrap_or(0.0),
    )
}

/// `ferry snapshot`.
pub fn snapshot(args: SnapshotArgs) -> Result<()> {
    let v = snapshot_call(&args.api_socket, &args.to, args.diff, args.then)?;
    println!("{} -> {}", describe(&v), args.to.display());
    Ok(())
}

/// `ferry seed create`.
pub fn seed(args: crate::cli::SeedArgs) -> Result<()> {
    let (api_socket, to, update) = match args.action {
        crate::cli::SeedAction::Create { api_socket, to } => (api_socket, to, false),
        crate::cli::SeedAction::Update { api_socket, to } => (api_socket, to, true),
    };
    let dir = std::path::absolute(&to).with_context(|| format!("{}", to.display()))?;
    let body = serde_json::json!({ "to": dir, "update": update }).to_string();
    let v = call(&api_socket, Method::PUT, "/vm/seed", Some(body))?.context("empty answer")?;
    let rounds = v["rounds"].as_array().cloned().unwrap_or_default();
    let copied: u64 = rounds
        .iter()
        .map(|r| r["pages_stored"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "{} {:#x} of the VM in {}: {} round(s) copied {copied} pages ({:.1} MiB) while the \
         guest ran, then it paused {:.1} ms for {} pages and its state; {:.1} ms in all",
        if update { "seed update" } else { "seed" },
        v["id"].as_u64().unwrap_or(0),
        to.display(),
        rounds.len(),
        copied as f64 * 4096.0 / 1048576.0,
        v["paused_ms"].as_f64().unwrap_or(0.0),
        v["paused_pages"],
        v["elapsed_ms"].as_f64().unwrap_or(0.0),
    );
    Ok(())
}

/// `ferry migrate`: live (`--to`) or quick (`--quick --via`).
pub fn migrate(args: MigrateArgs) -> Result<()> {
    if args.resume_postcopy {
        let body = serde_json::json!({ "to": args.to });
        call(
            &args.api_socket,
            Method::PUT,
            "/vm/migration/resume-postcopy",
            Some(body.to_string()),
        )?;
        println!(
            "asked the post-copy to reconnect{}",
            args.to.map(|t| format!(" to {t}")).unwrap_or_default()
        );
        return Ok(());
    }
    let Some(to) = &args.to else {
        return quick(&args);
    };
    let max_bandwidth = match &args.max_bandwidth {
        Some(b) => Some(ferry_vmm::parse_size(b).with_context(|| format!("--max-bandwidth {b}"))?),
        None => None,
    };
    let body = serde_json::json!({
        "to": to,
        "downtime_limit_ms": args.downtime_limit,
        "max_passes": args.max_passes,
        "compress": match args.compress {
            Compress::None => "none",
            Compress::Lz4 => "lz4",
            Compress::Zstd => "zstd",
        },
        "max_bandwidth": max_bandwidth,
        "connections": args.connections,
        "auto_converge": args.auto_converge,
        "timeout_ms": args.timeout.map(|t| (t * 1e3) as u64),
        "on_timeout": match args.on_timeout {
            OnTimeout::Cancel => "cancel",
            OnTimeout::SwitchOver => "switch_over",
        },
        "postcopy_after": if args.postcopy { Some(1) } else { args.postcopy_after },
        "auto_postcopy": args.auto_postcopy,
        "seeded": args.seeded,
        "copy_priority": match args.copy_priority {
            Priority::Low => "low",
            Priority::Normal => "normal",
        },
        "tls": crate::run::tls_files(&args.tls)?.map(|f| serde_json::json!({
            "cert": f.cert, "key": f.key, "ca": f.ca, "peers": f.peers,
        })),
        "insecure": args.tls.insecure,
        "copy_storage": args.copy_storage,
        "disk_map": disk_map(&args.disk_map)?,
    });
    if args.timeout.is_some_and(|t| !(t > 0.0 && t < 1e9)) {
        bail!("--timeout must be a positive number of seconds");
    }
    let socket = args.api_socket.clone();
    let run = std::thread::spawn(move || {
        call(&socket, Method::PUT, "/vm/migrate", Some(body.to_string()))
    });
    if !args.quiet {
        super::progress::follow(&args.api_socket, &run);
    }
    let v = run
        .join()
        .map_err(|_| anyhow::anyhow!("migration request thread panicked"))??
        .context("empty migration answer")?;
    print_report(to, &v);
    Ok(())
}

/// `--disk-map ID=PATH[,format=F]` entries as the API's `disk_map`.
fn disk_map(specs: &[String]) -> Result<Vec<serde_json::Value>> {
    specs
        .iter()
        .map(|s| {
            let (id, rest) = s.split_once('=').with_context(|| {
                format!("--disk-map {s}: expected ID=PATH[,format=raw|qcow2|vhdx]")
            })?;
            let (path, format) = match rest.split_once(",format=") {
                Some((p, f)) => (p, Some(f)),
                None => (rest, None),
            };
            if id.is_empty() || path.is_empty() {
                bail!("--disk-map {s}: expected ID=PATH[,format=raw|qcow2|vhdx]");
            }
            if let Some(f) = format {
                f.parse::<ferry_storage::Format>()
                    .map_err(|e| anyhow::anyhow!("--disk-map {s}: {e}"))?;
            }
            Ok(serde_json::json!({ "disk": id, "path": path, "format": format }))
        })
        .collect()
}

/// Prints a live migration's report: one line per pass, then the totals.
pub fn print_report(to: &str, v: &serde_json::Value) {
    let mib = |b: &serde_json::Value| b.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    if let Some(passes) = v["passes"].as_array() {
        for (i, p) in passes.iter().enumerate() {
            let last = i + 1 == passes.len();
            let throttle = match p["throttle_percent"].as_u64() {
                Some(t) if t > 0 => format!(", vCPUs throttled {t} %"),
                _ => String::new(),
            };
            println!(
                "pass {:>2}{} {:>8} pages ({} zero) {:>9.1} MiB in {:>8.1} ms{}{throttle}",
                i + 1,
                if last { " (paused)" } else { "         " },
                p["pages"],
                p["zero_pages"],
                mib(&p["wire_bytes"]),
                p["ms"].as_f64().unwrap_or(0.0),
                if last {
                    String::new()
                } else {
                    format!(
                        ", guest dirtied {:.0} pages/s",
                        p["dirty_pages_per_s"].as_f64().unwrap_or(0.0)
                    )
                }
            );
        }
    }
    println!(
        "migrated to {to}: total {:.1} ms, downtime {:.2} ms (predicted {:.2}), {:.1} MiB sent, \
         {:.1} MiB saved by zero pages and compression, link {:.0} MiB/s over {} connection(s), \
         switched over: {}",
        v["total_ms"].as_f64().unwrap_or(0.0),
        v["downtime_ms"].as_f64().unwrap_or(0.0),
        v["predicted_downtime_ms"].as_f64().unwrap_or(0.0),
        mib(&v["wire_bytes"]),
        mib(&v["saved_bytes"]),
        mib(&v["bandwidth_bytes_per_s"]),
        v["connections"],
        v["switch_reason"].as_str().unwrap_or("?"),
    );
    if v["seed_by_dirty_log"].as_bool() == Some(true) {
        println!(
            "seeded: the destination holds this VM's last seed, and this host's dirty log named \
             what changed since: pass 1 sent only that (no hashes)"
        );
    } else if v["seed_offered_pages"].as_u64().unwrap_or(0) > 0 {
        println!(
            "seeded: the destination's seed held {} pages, {} of them as they are here (not \
             sent)",
            v["seed_offered_pages"], v["seeded_pages"]
        );
    }
    let pc = &v["postcopy"];
    if pc.is_object() {
        let d = &pc["destination"];
        println!(
            "post-copy: {} pages fetched after the switch ({} pushed, {} pulled on demand), \
             {} demand faults (latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms), {} zero-filled \
             faults, {} link recoveries; source released {:.1} ms after the pause",
            pc["pages"],
            d["pushed"],
            d["pulled"],
            d["faults"],
            d["latency_p50_us"].as_f64().unwrap_or(0.0) / 1e3,
            d["latency_p99_us"].as_f64().unwrap_or(0.0) / 1e3,
            d["latency_max_us"].as_f64().unwrap_or(0.0) / 1e3,
            d["zero_faults"],
            pc["recoveries"],
            pc["released_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let st = &v["storage"];
    if st.is_object() {
        println!(
            "storage: {} disk(s), {:.1} MiB of data copied of {:.1} MiB ({:.1} MiB on the wire with \
             the guest's writes mirrored) in {:.2} s before the memory passes; last sync {:.2} ms \
             in the downtime",
            st["disks"],
            mib(&st["copied_bytes"]),
            mib(&st["size_bytes"]),
            mib(&st["wire_bytes"]),
            st["bulk_ms"].as_f64().unwrap_or(0.0) / 1e3,
            st["final_sync_ms"].as_f64().unwrap_or(0.0),
        );
    }
}

fn quick(args: &MigrateArgs) -> Result<()> {
    let via = args.via.clone().context("--quick needs --via DIR")?;
    let v = snapshot_call(&args.api_socket, &via, false, Then::Stop)?;
    let via = std::path::absolute(&via).unwrap_or(via);
    println!("{}", describe(&v));
    println!(
        "VM saved to {} and stopped here. Continue it on the destination host with:\n  \
         ferry restore --from {}",
        via.display(),
        via.display()
    );
    Ok(())
}
