//! The demo's overlay act (root, iproute2 and etcd): two sites on different IP subnets
//! joined by a router, a client outside both — all network namespaces — a `ferry host` agent
//! on each site and a gateway agent at the client, a virtual network, and a VM at customer
//! address 10.99.0.5 that moves from site A to site B live and back by post-copy while the
//! client holds one TCP connection to it, sending a request every 5 ms.
use crate::cluster::client::call;
use anyhow::{bail, Context, Result};
use hyper::Method;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const P: &str = "fdemo";
const CA: &str = "10.99.0.5";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn inns(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    ip(&a)
}

/// The namespaces, deleted on drop (with every process in them: agents, VMMs, etcd).
struct Lab(Vec<Child>);

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: signalling a child's own process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
        for n in ["a", "b", "r", "c"] {
            let _ = ip(&["netns", "del", &format!("{P}-{n}")]);
        }
    }
}

fn build() -> Result<()> {
    for n in ["a", "b", "r", "c"] {
        let _ = ip(&["netns", "del", &format!("{P}-{n}")]);
    }
    for n in ["a", "b", "r", "c"] {
        let ns = format!("{P}-{n}");
        ip(&["netns", "add", &ns])?;
        inns(&ns, &["ip", "link", "set", "lo", "up"])?;
    }
    let r = format!("{P}-r");
    for (n, i) in [("a", 1), ("b", 2), ("c", 3)] {
        let ns = format!("{P}-{n}");
        let (host_if, router_if) = (format!("{P}{n}0"), format!("{P}r{n}"));
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &router_if,
        ])?;
        ip(&["link", "set", &host_if, "netns", &ns])?;
        ip(&["link", "set", &router_if, "netns", &r])?;
        inns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.63.{i}.2/24"),
                "dev",
                &host_if,
            ],
        )?;
        inns(&ns, &["ip", "link", "set", &host_if, "up"])?;
        inns(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("10.63.{i}.1"),
            ],
        )?;
        inns(
            &r,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.63.{i}.1/24"),
                "dev",
                &router_if,
            ],
        )?;
        inns(&r, &["ip", "link", "set", &router_if, "up"])?;
    }
    inns(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
}

fn spawn_in(ns: &str, exe: &Path, args: &[&str], log: &Path) -> Result<Child> {
    Ok(Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
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
            bail!("overlay demo: no {what} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// VM web's owner and its NIC's provider address in the map, through the gateway agent.
fn located(gw: &str) -> Option<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&call(gw, Method::GET, "/cluster/nets", None).ok()?).ok()?;
    let e = v["map"].as_array()?.iter().find(|e| e["vm"] == "web")?;
    Some((e["host"].as_str()?.into(), e["pa"].as_str()?.into()))
}

pub fn act(dir: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || Command::new("etcd").arg("--version").output().is_err() {
        println!("\noverlay: skipped (needs root for network namespaces, and etcd)");
        return Ok(());
    }
    let dir = dir.join("overlay");
    std::fs::create_dir_all(dir.join("storage"))?;
    build()?;
    let mut lab = Lab(Vec::new());
    let exe = std::env::current_exe()?;
    let url = "http://10.63.1.1:2379";
    lab.0.push(
        Command::new("ip")
            .args(["netns", "exec", &format!("{P}-r"), "etcd", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log"))?)
            .process_group(0)
            .spawn()
            .context("etcd")?,
    );
    for (id, n, i) in [("site-a", "a", 1), ("site-b", "b", 2), ("gateway", "c", 3)] {
        let pa = format!("10.63.{i}.2");
        let listen = format!("{pa}:7000");
        let run = dir.join(id);
        let mut args = vec![
            "host",
            "--id",
            id,
            "--listen",
            &listen,
            "--store",
            "etcd://10.63.1.1:2379",
            "--provider-addr",
            &pa,
            "--insecure",
            "--no-balance",
        ];
        if id == "gateway" {
            args.extend(["--cpus", "0", "--memory", "0"]);
        }
        let (storage, run_s) = (dir.join("storage"), run.display().to_string());
        let storage_s = storage.display().to_string();
        args.extend(["--storage", &storage_s, "--run-dir", &run_s]);
        lab.0.push(spawn_in(
            &format!("{P}-{n}"),
            &exe,
            &args,
            &dir.join(format!("{id}.log")),
        )?);
    }
    // Everything from here runs as the client does: in its namespace, on a thread.
    let dir2 = dir.clone();
    let r = std::thread::spawn(move || client(&dir2))
        .join()
        .map_err(|_| anyhow::anyhow!("overlay demo thread panicked"))?;
    drop(lab);
    r
}

/// How many times the guest whose console is at `path` has announced itself (its last
/// `A0 <n> ok` line); 0 when none or no console.
fn announcements(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("A0 ")?.strip_suffix(" ok")?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn client(dir: &Path) -> Result<()> {
    ferry_guest::tcp::enter_netns(&format!("{P}-c")).context("the client's namespace")?;
    let gw = "10.63.3.2:7000";
    for a in ["10.63.1.2:7000", "10.63.2.2:7000", gw] {
        until("agent", Duration::from_secs(30), || {
            call(a, Method::GET, "/cluster/hosts", None).ok()
        })?;
    }
    println!(
        "\noverlay: sites A (10.63.1.0/24) and B (10.63.2.0/24) joined by a router, a client \
         outside both (10.63.3.0/24); an agent per site and a gateway agent at the client \
         (`ferry host --provider-addr`), over etcd in the router (plain TCP in this demo)"
    );
    let body = serde_json::json!({"name": "blue", "vni": 42});
    call(gw, Method::POST, "/cluster/nets", Some(body.to_string()))?;
    let spec = serde_json::json!({"name": "web", "spec": {
        "cpus": 1, "memory": "64M", "memory_bytes": 64u64 << 20, "disks": [],
        "guest": format!("tcp ip={CA} mtu=1450"), "kernel": null, "cmdline": null,
        "nics": [{"network": "blue", "mac": "52:54:00:99:00:05", "ca": CA}]}});
    call(gw, Method::POST, "/cluster/vms", Some(spec.to_string()))?;
    let br = "fbr42";
    until("the gateway's bridge", Duration::from_secs(20), || {
        Command::new("ip")
            .args(["link", "show", br])
            .output()
            .ok()?
            .status
            .success()
            .then_some(())
    })?;
    ip(&["addr", "add", "10.99.0.100/24", "dev", br])?;
    let (first, pa) = until("the VM placed", Duration::from_secs(30), || located(gw))?;
    until("the guest's TCP stack", Duration::from_secs(30), || {
        let c = std::fs::read_to_string(dir.join(&first).join("web.console")).ok()?;
        c.contains("T0 up").then_some(())
    })?;
    println!(
        "network blue (VXLAN 42); VM web at CA {CA} runs on {first} (PA {pa}); the client \
         (10.99.0.100, on the gateway's bridge) opens one TCP connection to it and sends a \
         request every 5 ms"
    );
    let probe = ferry_guest::tcp::TcpProbe::start(
        format!("{CA}:8").parse()?,
        None,
        Duration::from_millis(5),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mut host = first;
    for postcopy in [false, true] {
        let to = if host == "site-a" { "site-b" } else { "site-a" };
        let body = serde_json::json!({"to": to, "postcopy": postcopy});
        let before = probe.stats().max_gap;
        let m = call(
            gw,
            Method::POST,
            "/cluster/vms/web/migrate",
            Some(body.to_string()),
        )?;
        let m: serde_json::Value = serde_json::from_str(&m)?;
        std::thread::sleep(Duration::from_millis(500));
        let st = probe.stats();
        if let Some(e) = &st.error {
            bail!("overlay demo: the connection broke: {e}");
        }
        let (now, pa) = located(gw).context("no map entry")?;
        // The guest's own announcements (the test guest's `A0 <n> ok` lines, on
        // GUEST_ANNOUNCE): up to five per move, the last round 800 ms after the VM resumed.
        std::thread::sleep(Duration::from_millis(500));
        let announced = announcements(&dir.join(&now).join("web.console"))
            .saturating_sub(announcements(&dir.join(&host).join("web.console")));
        println!(
            "ferry cluster migrate web --to {to}{}: {host} -> {now} in {:.2} s, paused {:.1} ms; \
             the map now says PA {pa}, CA {CA} unchanged; the connection carried on \
             (largest reply gap so far {:.1} ms); the guest announced its address with \
             {announced} gratuitous ARPs after the move (virtio-net GUEST_ANNOUNCE, beside \
             Ferry's RARPs)",
            if postcopy { " --postcopy" } else { "" },
            m["took_ms"].as_f64().unwrap_or(0.0) / 1e3,
            m["downtime_ms"].as_f64().unwrap_or(0.0),
            st.max_gap.max(before).as_secs_f64() * 1e3,
        );
        host = now;
    }
    let st = probe.stop(Duration::from_secs(3));
    st.check()
        .map_err(|e| anyhow::anyhow!("overlay demo: {e}"))?;
    println!(
        "one TCP connection across both moves: {} requests, {} replies in order, the guest's \
         reply counter continuous, none lost",
        st.sent, st.received
    );
    Ok(())
}
