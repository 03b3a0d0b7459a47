//! The test topology (scripts/netlab.sh) on real kernel networking, root needed: namespaces,
//! veths, a router, the delaying wire (ferry-wire) and tc tbf on the WAN link. Checks the
//! round-trip times the sites see, that the WAN carries nothing without the wire, and the
//! bandwidth tbf gives it.
use std::process::{Command, Output};
use std::time::Duration;

const WIRE: &str = env!("CARGO_BIN_EXE_ferry-wire");

fn script() -> String {
    format!("{}/../../scripts/netlab.sh", env!("CARGO_MANIFEST_DIR"))
}

/// A topology for one test; torn down when dropped.
struct Lab(String);

impl Lab {
    fn up(tag: &str, args: &[&str]) -> Lab {
        let p = format!("{tag}{}", std::process::id() % 1000);
        let out = Command::new(script())
            .args(["up", &p])
            .args(args)
            .env("FERRY_WIRE", WIRE)
            .output()
            .expect("scripts/netlab.sh");
        assert!(
            out.status.success(),
            "netlab.sh up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Lab(p)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}-{ns}", self.0)])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Round trips from namespace `ns` to `ip` (milliseconds, every reply), `n` pings.
    fn rtts(&self, ns: &str, ip: &str, n: u32) -> Vec<f64> {
        let out = self.exec(
            ns,
            &["ping", "-c", &n.to_string(), "-i", "0.05", "-W", "1", ip],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.trim_end_matches(" ms").parse().ok())
            .collect()
    }

    fn pidfile(&self) -> String {
        let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        format!("{tmp}/netlab-{}.pid", self.0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["down", &self.0]).output();
    }
}

#[test]
fn the_wan_link_delays_each_way_and_carries_nothing_without_the_wire() {
    let lab = Lab::up("nd", &["--delay-ms", "20"]);
    // Client to site A: the router only. Client to site B: across the WAN, 20 ms each way.
    let near = lab.rtts("c", "10.61.1.2", 10);
    let far = lab.rtts("c", "10.61.2.2", 10);
    let site = lab.rtts("a", "10.61.2.2", 10);
    assert_eq!(
        (near.len(), far.len(), site.len()),
        (10, 10, 10),
        "lost pings"
    );
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let min = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
    assert!(max(&near) < 10.0, "client to site A: {near:?}");
    assert!(
        min(&far) >= 40.0 && max(&far) < 80.0,
        "client to site B: {far:?}"
    );
    assert!(
        min(&site) >= 40.0 && max(&site) < 80.0,
        "site A to site B: {site:?}"
    );
    // The wire is the only path: stopped, site B is out of reach; site A is not.
    let pid = std::fs::read_to_string(lab.pidfile()).unwrap();
    assert!(Command::new("kill")
        .arg(pid.trim())
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        lab.rtts("c", "10.61.2.2", 3).is_empty(),
        "site B reached without the wire"
    );
    assert_eq!(lab.rtts("c", "10.61.1.2", 3).len(), 3);
}

#[test]
fn tbf_caps_the_wan_link_and_tcp_runs_through_the_wire() {
    let lab = Lab::up("nr", &["--delay-ms", "5", "--rate", "40mbit"]);
    let mut server = Command::new("ip")
        .args(["netns", "exec", &format!("{}-b", lab.0)])
        .args(["iperf3", "-s", "-1", "-B", "10.61.2.2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec("c", &["iperf3", "-c", "10.61.2.2", "-t", "3", "-J"]);
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3: {}", String::from_utf8_lossy(&out.stderr)));
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    eprintln!(
        "TCP across the WAN link (tbf 40 Mbit/s, 5 ms each way): {:.1} Mbit/s",
        bps / 1e6
    );
    assert!(
        (20e6..=42e6).contains(&bps),
        "{:.1} Mbit/s through a 40 Mbit/s link",
        bps / 1e6
    );
}

/// A stand-in for a VM's NIC: a namespace `ns` whose `eth0` (MAC, CA) is a veth whose other
/// end joins `bridge` in host namespace `host` (as a VM's tap would).
fn vm_nic(ns: &str, host: &str, bridge: &str, mac: &str, ca: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = Command::new("ip").args(["netns", "add", ns]).output();
    let _ = Command::new("ip")
        .args(["-n", ns, "link", "del", "eth0"])
        .output();
    let peer = format!("t{}", &ns[ns.len().saturating_sub(8)..]);
    run(&[
        "link", "add", "eth0", "netns", ns, "address", mac, "type", "veth", "peer", "name", &peer,
        "netns", host,
    ]);
    run(&["-n", ns, "addr", "add", &format!("{ca}/24"), "dev", "eth0"]);
    run(&["-n", ns, "link", "set", "eth0", "up"]);
    run(&["-n", host, "link", "set", &peer, "master", bridge]);
    run(&["-n", host, "link", "set", &peer, "up"]);
}

#[test]
fn the_overlay_joins_nics_across_sites_and_follows_a_nic_that_moves() {
    use ferry_net::overlay::{plan, Host, Mac, Nic};
    use std::net::Ipv4Addr;
    let lab = Lab::up("no", &["--delay-ms", "1"]);
    let (pa_a, pa_b): (Ipv4Addr, Ipv4Addr) =
        ("10.61.1.2".parse().unwrap(), "10.61.2.2".parse().unwrap());
    let ns = |n: &str| format!("{}-{n}", lab.0);
    let vms = [ns("v1"), ns("v2"), ns("v3")];
    struct Gone(Vec<String>);
    impl Drop for Gone {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
    let _gone = Gone(vms.to_vec());
    let ha = Host::create(Some(&ns("a")), 100, pa_a).unwrap();
    let hb = Host::create(Some(&ns("b")), 100, pa_b).unwrap();
    let macs = [
        "52:54:00:00:00:01",
        "52:54:00:00:00:02",
        "52:54:00:00:00:03",
    ];
    let cas = ["192.168.50.1", "192.168.50.2", "192.168.50.3"];
    // v1 on site A; v2 and v3 on site B.
    vm_nic(&vms[0], &ns("a"), &ha.bridge(), macs[0], cas[0]);
    vm_nic(&vms[1], &ns("b"), &hb.bridge(), macs[1], cas[1]);
    vm_nic(&vms[2], &ns("b"), &hb.bridge(), macs[2], cas[2]);
    let nic = |i: usize, pa: Ipv4Addr| Nic {
        mac: macs[i].parse::<Mac>().unwrap(),
        ca: cas[i].parse().unwrap(),
        pa,
    };
    let program = |nics: &[Nic]| {
        ha.program(&plan(pa_a, nics, &[pa_a, pa_b])).unwrap();
        hb.program(&plan(pa_b, nics, &[pa_a, pa_b])).unwrap();
    };
    let ping = |from: &str, to: &str| {
        Command::new("ip")
            .args([
                "netns", "exec", from, "ping", "-c", "2", "-i", "0.1", "-W", "1", to,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    program(&[nic(0, pa_a), nic(1, pa_b), nic(2, pa_b)]);
    assert!(
        ping(&vms[0], cas[1]),
        "v1 (site A) cannot reach v2 (site B) over the overlay"
    );
    assert!(
        ping(&vms[2], cas[0]),
        "v3 (site B) cannot reach v1 (site A)"
    );
    // v2 moves to site A (same MAC and address, its "tap" now on A's bridge), and the map
    // says so: B's static entry for v2 must now point at A, and A must no longer send v2's
    // frames to B (reachability alone would not show it: flooding finds v2 either way).
    vm_nic(&vms[1], &ns("a"), &ha.bridge(), macs[1], cas[1]);
    program(&[nic(0, pa_a), nic(1, pa_a), nic(2, pa_b)]);
    let at_b = hb.fdb().unwrap();
    assert!(
        at_b.iter()
            .any(|e| e.mac == macs[1].parse().unwrap() && e.dst == pa_a),
        "site B's entry for v2 was not rewritten: {at_b:?}"
    );
    assert!(
        ping(&vms[2], cas[1]),
        "v3 (site B) cannot reach v2 after its move to site A"
    );
    assert!(
        ping(&vms[0], cas[1]),
        "v1 cannot reach v2 beside it on site A"
    );
    let at_a = ha.fdb().unwrap();
    assert!(
        !at_a.iter().any(|e| e.mac == macs[1].parse().unwrap()),
        "site A still forwards v2 to a VTEP: {at_a:?}"
    );
}
