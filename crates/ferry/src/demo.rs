//! `ferry demo`: Ferry's main job on one machine. Two local "hosts" are `ferry` processes: a
//! VM runs the test guest (rewriting memory, heartbeat every 2 ms) on host A, is live-migrated
//! to a `ferry receive` (host B) over storage both see, then back to a new receiver on A with
//! its disk (shared-nothing: A's receiver keeps disks in a directory of its own, and the disk
//! arrives converted from raw to VHDX). Each move prints its report and the downtime the guest itself saw (the largest heartbeat gap, timestamped by the
//! host); at the end the guest's whole heartbeat sequence is checked for gaps and repeats.
use crate::api::client::{call, print_report};
use crate::cli::DemoArgs;
use anyhow::{bail, Context, Result};
use ferry_guest::console::{read_lines, wait_for, TimedLine};
use ferry_guest::heartbeat::{parse_line, GuestLine, HeartbeatLog};
use hyper::Method;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// One `ferry` process playing a host.
struct Host {
    name: &'static str,
    child: Child,
    lines: Receiver<TimedLine>,
    seen: Vec<TimedLine>,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, args: &[&str]) -> Result<Host> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if name == "A" && args_is_run(args) {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .spawn()
        .with_context(|| format!("starting host {name}"))?;
    let lines = read_lines(child.stdout.take().context("stdout")?);
    Ok(Host {
        name,
        child,
        lines,
        seen: Vec::new(),
    })
}

/// How the demo's hosts secure their migrations: TLS with a CA made for the demo (each host
/// allows only the other's name), or plain TCP with --insecure.
struct Security {
    /// The CA's directory; None: plain TCP.
    pki: Option<PathBuf>,
}

fn host_name(h: &str) -> String {
    format!("host-{}.demo", h.to_lowercase())
}

impl Security {
    fn new(args: &DemoArgs, dir: &Path) -> Result<Self> {
        if args.insecure {
            println!("migrations: plain TCP (--insecure): not authenticated, not encrypted");
            return Ok(Security { pki: None });
        }
        let pki = dir.join("pki");
        ferry_migration::certs::init_ca(&pki, 1)?;
        for h in ["A", "B"] {
            ferry_migration::certs::issue(&pki, &host_name(h), 1)?;
        }
        println!(
            "migrations: TLS 1.3, mutual certificates from a CA made for the demo ({} <-> {}; \
             --insecure for plain TCP)",
            host_name("A"),
            host_name("B")
        );
        Ok(Security { pki: Some(pki) })
    }

    /// `ferry receive` arguments for host `me` accepting only `peer`.
    fn receive_args(&self, me: &str, peer: &str) -> Vec<String> {
        let Some(pki) = &self.pki else {
            return vec!["--insecure".into()];
        };
        let (cert, key) = ferry_migration::certs::host_paths(pki, &host_name(me));
        let ca = ferry_migration::certs::ca_paths(pki).0;
        [
            "--tls-cert".into(),
            cert.to_string_lossy().into_owned(),
            "--tls-key".into(),
            key.to_string_lossy().into_owned(),
            "--tls-ca".into(),
            ca.to_string_lossy().into_owned(),
            "--tls-peer".into(),
            host_name(peer),
        ]
        .to_vec()
    }

    /// The migrate request's security members for host `me` sending to `peer`.
    fn request(&self, me: &str, peer: &str) -> serde_json::Value {
        let Some(pki) = &self.pki else {
            return serde_json::json!({ "insecure": true });
        };
        let (cert, key) = ferry_migration::certs::host_paths(pki, &host_name(me));
        let ca = ferry_migration::certs::ca_paths(pki).0;
        serde_json::json!({ "tls": {
            "cert": cert, "key": key, "ca": ca, "peers": [host_name(peer)],
        }})
    }
}

/// Starts `ferry receive` and waits until it listens.
fn receiver(
    name: &'static str,
    port: u16,
    sock: &Path,
    sec: &Security,
    peer: &str,
    extra: &[&str],
) -> Result<Host> {
    let listen = format!("127.0.0.1:{port}");
    let mut argv: Vec<String> = ["receive", "--listen", &listen, "--api-socket"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(sock.to_string_lossy().into_owned());
    argv.extend(sec.receive_args(name, peer));
    argv.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut h = spawn(name, &argv)?;
    let mut err = BufReader::new(h.child.stderr.take().context("stderr")?);
    let mut first = String::new();
    err.read_line(&mut first)?;
    if !first.contains("waiting for a migration") {
        bail!("host {name} did not start listening: {first}");
    }
    // Keep draining its messages (a closed pipe would break the receiver's error reporting).
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            println!("host {name}: {}", line.trim_start_matches("ferry: "));
        }
    });
    Ok(h)
}

fn args_is_run(args: &[&str]) -> bool {
    args.first() == Some(&"run")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn beats(lines: &[TimedLine]) -> Vec<(std::time::Instant, u64, u64)> {
    lines
        .iter()
        .filter_map(|(at, l)| match parse_line(l) {
            GuestLine::Heartbeat { cpu: 0, seq, tsc } => Some((*at, seq, tsc)),
            _ => None,
        })
        .collect()
}

/// Moves the VM from `from` (API socket `sock`) to the receiver on `port`, with its disk if
/// `copy_storage`; returns the gap between the last heartbeat on the source and the first on
/// the destination.
#[allow(clippy::too_many_arguments)]
fn migrate(
    from: &mut Host,
    to: &mut Host,
    sock: &Path,
    port: u16,
    args: &DemoArgs,
    sec: &Security,
    copy_storage: bool,
) -> Result<Duration> {
    println!(
        "\n== live migration{}{}: host {} -> host {} ==",
        if args.postcopy {
            " (post-copy after one pass unless pre-copy converges first)"
        } else {
            ""
        },
        if copy_storage {
            " with its disk, to a host that does not share it, raw -> VHDX on the way"
        } else {
            ""
        },
        from.name,
        to.name
    );
    let mut body = serde_json::json!({
        "to": format!("127.0.0.1:{port}"),
        "downtime_limit_ms": args.downtime_limit,
        "connections": args.connections,
        "postcopy_after": if args.postcopy { Some(1) } else { None },
        "copy_storage": copy_storage,
    });
    if copy_storage {
        body["disk_map"] =
            serde_json::json!([{"disk": "demo-disk", "path": "disk.vhdx", "format": "vhdx"}]);
    }
    if let (Some(b), serde_json::Value::Object(extra)) =
        (body.as_object_mut(), sec.request(from.name, to.name))
    {
        b.extend(extra);
    }
    let v = call(sock, Method::PUT, "/vm/migrate", Some(body.to_string()))?.context("no report")?;
    print_report(&format!("host {}", to.name), &v);
    from.child.wait()?;
    from.seen.extend(from.lines.try_iter());
    let first = wait_for(&to.lines, &mut to.seen, WAIT, |l| l.starts_with("H0 "))
        .map_err(anyhow::Error::msg)?;
    let last = beats(&from.seen)
        .last()
        .map(|b| b.0)
        .context("no heartbeat on the source")?;
    let gap = first.0.duration_since(last);
    println!(
        "guest-observed downtime (heartbeat gap across the move): {:.1} ms",
        gap.as_secs_f64() * 1e3
    );
    Ok(gap)
}

pub fn main(args: DemoArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run(args: &DemoArgs, dir: &Path) -> Result<()> {
    let sock = |n: &str| -> PathBuf { dir.join(n) };
    let workload = format!(
        "dirty size={} rate={} hb=2000; disk span=16M rate=8M",
        args.dirty, args.rate
    );
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let disk_arg = format!("path={},id=demo-disk", disk.display());
    println!("ferry demo: host A runs the test guest ('{workload}', 2 vCPUs, 1 GiB,");
    println!("a 64 MiB virtio-blk disk on storage A and B both see);");
    println!(
        "it moves to host B, then back to A with its disk copied to A's own storage, while vCPU 0\n\
         writes memory and beats every 2 ms and vCPU 1 writes its disk and reads each pass back."
    );
    let sec = Security::new(args, dir)?;
    let mut a = spawn(
        "A",
        &[
            "run",
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--disk",
            &disk_arg,
            "--api-socket",
            &sock("a.sock").to_string_lossy(),
            "--guest",
            &workload,
        ],
    )?;
    wait_for(&a.lines, &mut a.seen, WAIT, |l| l == "D0 1").map_err(anyhow::Error::msg)?;
    println!(
        "host A: the guest has written its {} once; heartbeat {} so far",
        args.dirty,
        beats(&a.seen).len()
    );

    let pb = free_port()?;
    let mut b = receiver("B", pb, &sock("b.sock"), &sec, "A", &[])?;
    let gap1 = migrate(&mut a, &mut b, &sock("a.sock"), pb, args, &sec, false)?;
    wait_for(&b.lines, &mut b.seen, WAIT, |l| l.starts_with("D0 ")).map_err(anyhow::Error::msg)?;

    let pa = free_port()?;
    // Back to A with the disk: A's receiver keeps disks in a directory of its own, which B
    // does not see (shared-nothing migration).
    let a_disks = dir.join("host-a-disks");
    std::fs::create_dir_all(&a_disks)?;
    let a_disks_arg = a_disks.to_string_lossy().into_owned();
    let mut a2 = receiver(
        "A",
        pa,
        &sock("a2.sock"),
        &sec,
        "B",
        &["--storage-dir", &a_disks_arg],
    )?;
    let gap2 = migrate(&mut b, &mut a2, &sock("b.sock"), pa, args, &sec, true)?;
    let info = call(&sock("a2.sock"), Method::GET, "/vm", None)?.context("no VM info")?;
    println!(
        "host A: the VM's disk is now {} (the shared {} is no longer used)",
        info["config"]["disks"][0]["path"].as_str().unwrap_or("?"),
        disk.display()
    );
    wait_for(&a2.lines, &mut a2.seen, WAIT, |l| l.starts_with("D0 "))
        .map_err(anyhow::Error::msg)?;
    // A whole disk pass written and read back on A after both moves.
    let bad = |l: &str| l.starts_with("K1 ") && !l.ends_with(" ok");
    let disk_line = wait_for(&a2.lines, &mut a2.seen, WAIT, |l| l.starts_with("K1 "))
        .map_err(anyhow::Error::msg)?;
    call(&sock("a2.sock"), Method::PUT, "/vm/shutdown", None)?;
    a2.child.wait()?;
    a2.seen.extend(a2.lines.try_iter());

    let mut log = HeartbeatLog::default();
    for h in [&a, &b, &a2] {
        for (at, seq, tsc) in beats(&h.seen) {
            log.push(at, seq, tsc);
        }
    }
    log.check_continuous()
        .context("heartbeat sequence across the moves")?;
    let seen_all = [&a, &b, &a2].map(|h| h.seen.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>());
    if let Some(l) = seen_all
        .iter()
        .flatten()
        .find(|l| bad(l) || l.starts_with("!1"))
    {
        anyhow::bail!("the guest found its disk wrong: {l}");
    }
    let passes = seen_all
        .iter()
        .flatten()
        .filter(|l| l.starts_with("K1 ") && l.ends_with(" ok"))
        .count();
    println!(
        "disk: {passes} passes of 16 MiB written and read back correct by the guest across \
         the moves (last: {})",
        disk_line.1
    );
    println!(
        "\ndone: {} heartbeats across three processes, none lost or repeated; guest-observed \
         downtime {:.1} ms (A->B) and {:.1} ms (B->A), heartbeat period 2 ms included",
        log.beats.len(),
        gap1.as_secs_f64() * 1e3,
        gap2.as_secs_f64() * 1e3
    );
    if !args.no_overlay {
        crate::demo_overlay::act(dir)?;
    }
    if !args.no_cluster {
        crate::demo_cluster::act(dir)?;
    }
    Ok(())
}
