//! The demo's last act: a two-host cluster (`ferry host` agents over a throwaway etcd), a VM
//! writing its disk on their shared storage moved live between them with its ownership, then
//! its host killed (`kill -9` of agent and VMM) and the VM restarted on the other from its disk.
use crate::cluster::client::call;
use anyhow::{bail, Context, Result};
use hyper::Method;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Children killed (their whole process group) when dropped.
struct Group(Vec<Child>);

impl Drop for Group {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: signalling a child's own process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

fn port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?)
}

fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > limit {
            bail!("cluster demo: no {what} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn owner(agent: &str) -> Option<(String, i64)> {
    let v: serde_json::Value =
        serde_json::from_str(&call(agent, Method::GET, "/cluster/vms", None).ok()?).ok()?;
    let r = v.as_array()?.iter().find(|r| r["name"] == "web")?;
    Some((r["owner"].as_str()?.to_string(), r["epoch"].as_i64()?))
}

fn console(dir: &Path, host: &str) -> String {
    std::fs::read_to_string(dir.join(host).join("web.console")).unwrap_or_default()
}

pub fn act(dir: &Path) -> Result<()> {
    if Command::new("etcd").arg("--version").output().is_err() {
        println!("\ncluster: skipped (no etcd here; scripts/setup.sh installs it)");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let dir = dir.join("cluster");
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage)?;
    std::fs::File::create(storage.join("web.raw"))?.set_len(8 << 20)?;
    let (cp, pp) = (port()?, port()?);
    let client = format!("http://127.0.0.1:{cp}");
    let mut group = Group(Vec::new());
    group.0.push(spawn(
        Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pp}")])
            .arg("--unsafe-no-fsync"),
        &dir.join("etcd.log"),
    )?);
    // Mutual TLS for the cluster API and the moves: a CA of the demo's own, one certificate
    // for the agents' address (they all listen on 127.0.0.1); this process calls the
    // agents with it too.
    let pki = dir.join("pki");
    ferry_migration::certs::init_ca(&pki, 1)?;
    let (cert, key) = ferry_migration::certs::issue(&pki, "127.0.0.1", 1)?;
    let ca = ferry_migration::certs::ca_paths(&pki).0;
    crate::cluster::secure::use_tls(&ferry_migration::tls::TlsFiles::any_peer(
        cert.clone(),
        key.clone(),
        ca.clone(),
    ))?;
    let mut agents = Vec::new();
    for h in ["h1", "h2"] {
        let addr = format!("127.0.0.1:{}", port()?);
        let run_dir: PathBuf = dir.join(h);
        group.0.push(spawn(
            Command::new(&exe)
                .args([
                    "host", "--id", h, "--listen", &addr, "--ttl", "3", "--grace", "2",
                ])
                .args(["--store", &format!("etcd://127.0.0.1:{cp}"), "--no-balance"])
                .arg("--storage")
                .arg(&storage)
                .arg("--run-dir")
                .arg(&run_dir)
                .arg("--tls-cert")
                .arg(&cert)
                .arg("--tls-key")
                .arg(&key)
                .arg("--tls-ca")
                .arg(&ca),
            &dir.join(format!("{h}.log")),
        )?);
        agents.push(addr);
    }
    for a in &agents {
        until("agent", Duration::from_secs(30), || {
            call(a, Method::GET, "/cluster/hosts", None).ok()
        })?;
    }
    println!(
        "\ncluster: two `ferry host` agents over etcd, sharing a storage directory; their API \
         and the moves between them over mutual TLS 1.3 (a CA of the demo's own);"
    );
    let spec = serde_json::json!({"name": "web", "priority": 1, "spec": {
        "cpus": 1, "memory": "64M", "memory_bytes": 64u64 << 20, "disks": ["path=web.raw"],
        "guest": "disk span=1M passes=0 hb=1000", "kernel": null, "cmdline": null}});
    call(
        &agents[0],
        Method::POST,
        "/cluster/vms",
        Some(spec.to_string()),
    )
    .context("creating the cluster VM")?;
    let (first, e1) = until("owner", Duration::from_secs(20), || owner(&agents[0]))?;
    until("disk pass", Duration::from_secs(30), || {
        console(&dir, &first).contains("K0 2 ok").then_some(())
    })?;
    println!("VM web (writing its disk, reading each pass back) placed on {first}, epoch {e1}");
    let m = call(
        &agents[0],
        Method::POST,
        "/cluster/vms/web/migrate",
        Some("{}".into()),
    )?;
    let m: serde_json::Value = serde_json::from_str(&m)?;
    let (second, e2) = owner(&agents[0]).context("no owner after the move")?;
    println!(
        "ferry cluster migrate web: {first} -> {second} live in {:.2} s, paused {:.1} ms; \
         ownership handed over in the switch-over (epoch {e1} -> {e2})",
        m["took_ms"].as_f64().unwrap_or(0.0) / 1e3,
        m["downtime_ms"].as_f64().unwrap_or(0.0)
    );
    until("disk pass after the move", Duration::from_secs(30), || {
        console(&dir, &second).contains(" ok").then_some(())
    })?;
    // Host `second` fails: its agent and its VMM die at once.
    let i = if second == "h1" { 1 } else { 2 };
    let victim = group.0.remove(i);
    drop(Group(vec![victim]));
    let _ = std::fs::remove_file(dir.join(&first).join("web.console"));
    let t0 = Instant::now();
    let survivor = &agents[i % 2];
    let (third, e3) = until("failover", Duration::from_secs(20), || {
        owner(survivor).filter(|(h, _)| *h != second)
    })?;
    until("guest on the survivor", Duration::from_secs(20), || {
        console(&dir, &third).contains("K0 1 ok").then_some(())
    })?;
    println!(
        "kill -9 of {second} (agent and VMM): web restarted on {third} from its disk and \
         wrote and checked a pass {:.1} s later (epoch {e2} -> {e3}; the lease TTL is 3 s, \
         the grace 2 s)",
        t0.elapsed().as_secs_f64()
    );
    for h in ["h1", "h2"] {
        if console(&dir, h).contains("BAD") {
            bail!("cluster demo: the guest read its disk back wrong on {h}");
        }
    }
    Ok(())
}
