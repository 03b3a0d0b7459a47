//! A VM keeps its address and its open TCP connections across hosts on different subnets
//! (issue #14), on real kernel networking: scripts/netlab.sh's sites A and B (10.61.1.0/24,
//! 10.61.2.0/24) joined by a router, site B behind the delayed WAN link, a client outside
//! both (10.61.3.0/24) on the overlay through its gateway agent; etcd in the router; the VM
//! on virtual network "blue" at CA 10.99.0.5 (the test guest's smoltcp stack). The client
//! holds one TCP connection and sends a request every 5 ms while the VM moves.
mod common;
mod overlay_common;
use common::{ferry, http, metric_at};
use ferry_guest::tcp::TcpProbe;
use overlay_common::*;
use std::time::Duration;

const MAC: &str = "52:54:00:99:00:05";

fn other(h: &str) -> &'static str {
    if h == "ha" {
        "hb"
    } else {
        "ha"
    }
}

fn pa_of(h: &str) -> &'static str {
    if h == "ha" {
        PA_A
    } else {
        PA_B
    }
}

/// After VM "v" moved to `host`: the map says so (the CA unchanged), and every other host's
/// VXLAN device sends the NIC's frames to that host's PA (the kernel never moves a static
/// entry by itself: this is the agents' rewrite).
/// How many times the guest has announced itself since it booted, by its console on `host`
/// (the test guest's `A0 <n> ok` lines).
fn announcements(o: &Overlay, host: &str) -> u64 {
    let console = o.console(host, "v");
    assert!(
        !console
            .lines()
            .any(|l| l.starts_with("A0 ") && !l.ends_with(" ok")),
        "an acknowledgement refused: {console}"
    );
    console
        .lines()
        .filter_map(|l| l.strip_prefix("A0 ")?.strip_suffix(" ok")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The guest, now on `host`, announced itself by gratuitous ARP (GUEST_ANNOUNCE) after the
/// move: more often than the `before` it had when the move began; at most five rounds.
fn check_announced(o: &Overlay, host: &str, before: u64) {
    std::thread::sleep(Duration::from_millis(900)); // the five rounds: 800 ms
    let n = announcements(o, host) - before;
    assert!((1..=5).contains(&n), "{n} announcements after the move");
    eprintln!("the guest announced itself {n} times after the move to {host}");
}

fn check_located(o: &Overlay, host: &str) {
    let (h, pa, ca) = o.map_entry(MAC).expect("a map entry");
    assert_eq!(
        (h.as_str(), pa.as_str(), ca.as_str()),
        (host, pa_of(host), CA)
    );
    for ns in ["a", "b", "c"] {
        let here = (ns == "a" && host == "ha") || (ns == "b" && host == "hb");
        let want = (!here).then(|| pa_of(host).to_string());
        let got = wait("forwarding updated", Duration::from_secs(5), || {
            let d = o.fdb_dst(ns, MAC);
            (d == want).then_some(d)
        });
        assert_eq!(got, want, "host namespace {ns}");
    }
}

/// Live migration A → B (pre-copy), then B → A (post-copy), across the WAN link (10 ms each
/// way): one TCP connection carries on through both, every reply in order with the guest's
/// counter continuous; the CA stays, the PA follows the VM, every host's forwarding too.
#[test]
fn an_open_tcp_connection_survives_live_and_post_copy_moves_across_sites() {
    let o = Overlay::up("om", 10, None);
    let first = o.create_vm(&format!("tcp ip={CA} mtu=1450 hb=2000"), MAC, 1);
    check_located(&o, &first);
    let probe = TcpProbe::start(
        format!("{CA}:8").parse().unwrap(),
        None,
        Duration::from_millis(5),
    )
    .expect("a connection to the VM's CA from the client");
    std::thread::sleep(Duration::from_millis(500));
    let mut host = first.clone();
    for postcopy in [false, true] {
        let to = other(&host);
        let mut args = vec!["migrate", "v", "--to", to];
        if postcopy {
            args.push("--postcopy");
        }
        let before = announcements(&o, &host);
        let out = o.cli(&args);
        eprintln!("{out}");
        assert_eq!(o.owner("v").unwrap().0, to);
        check_located(&o, to);
        check_announced(&o, to, before);
        std::thread::sleep(Duration::from_millis(700));
        let st = probe.stats();
        assert!(st.error.is_none(), "after the move to {to}: {st:?}");
        host = to.to_string();
    }
    let st = probe.stop(Duration::from_secs(3));
    st.check().expect("one connection, every reply, in order");
    assert!(st.received > 200, "{st:?}");
    eprintln!(
        "{} replies over one connection; largest reply gap {:?} (at {:?})",
        st.received, st.max_gap, st.max_gap_at
    );
    let console = o.console(&host, "v");
    assert!(
        !console.contains("T0 closed 8"),
        "the guest saw the connection end: {console}"
    );
}

/// A live migration whose switch-over finds the store stopped (SIGSTOP of etcd for 1.5 s,
/// from shortly before the first pass ends): the hand-over waits for the store, the VM then
/// runs on the target, the map and every host's forwarding follow, and the open connection
/// carries on.
#[test]
fn a_move_while_the_store_is_briefly_unreachable_keeps_the_connection() {
    let o = Overlay::up("os", 2, None);
    // vCPU 1 fills 24 MiB once, then only reads it: the copy, capped at 8 MB/s, takes about
    // three seconds and then converges.
    let guest = format!("tcp ip={CA} mtu=1450 hb=2000; verify size=24M");
    let first = o.create_vm(&guest, MAC, 2);
    wait("the filled region", Duration::from_secs(30), || {
        o.console(&first, "v").contains("V1 0 ok").then_some(())
    });
    let probe = TcpProbe::start(
        format!("{CA}:8").parse().unwrap(),
        None,
        Duration::from_millis(5),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let to = other(&first);
    let agent = o.agent("gw").to_string();
    let mover = std::thread::spawn(move || {
        ferry(&[
            "cluster",
            "--agent",
            &agent,
            "migrate",
            "v",
            "--to",
            to,
            "--max-bandwidth",
            "8M",
        ])
    });
    let src = o.agent(&first).to_string();
    wait(
        "the first pass near its end",
        Duration::from_secs(30),
        || {
            let (_, b) = http(&src, "GET", "/cluster/local/migration/v", "");
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            let left = v["pass_pages"].as_u64()? - v["pass_sent"].as_u64()?;
            (v["pass"] == 1 && v["pass_pages"].as_u64()? > 1000 && left < 600).then_some(())
        },
    );
    o.etcd_signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    o.etcd_signal(libc::SIGCONT);
    let out = mover.join().unwrap();
    assert!(
        out.status.success(),
        "migrate: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{report}");
    assert_eq!(o.owner("v").unwrap().0, to);
    check_located(&o, to);
    std::thread::sleep(Duration::from_millis(500));
    let st = probe.stop(Duration::from_secs(3));
    st.check().expect("the connection carried on");
    eprintln!(
        "largest reply gap {:?} (at {:?})",
        st.max_gap, st.max_gap_at
    );
    // The switch-over waited for the store: the VM was paused for most of the stop.
    assert!(st.max_gap > Duration::from_millis(500), "{st:?}");
}

/// Host A killed (`kill -9` of its agent and VMM): the VM restarts on B by failover (a fresh
/// boot from its spec) and answers at the same CA, its NIC's map entry at B's PA, every
/// surviving host's forwarding too.
#[test]
fn a_vm_restarted_by_failover_is_reachable_at_its_ca_on_the_new_host() {
    let mut o = Overlay::up("of", 2, None);
    let first = o.create_vm(&format!("tcp ip={CA} mtu=1450"), MAC, 1);
    let ca: std::net::IpAddr = CA.parse().unwrap();
    ferry_guest::tcp::echo_once((ca, 7).into(), None, b"before").expect("echo before");
    let (_, e1) = o.owner("v").unwrap();
    o.kill_host(&first);
    let to = other(&first);
    let (h, e2) = wait("the failover", Duration::from_secs(30), || {
        o.owner("v").filter(|(h, _)| h == to)
    });
    assert!(e2 > e1, "the epoch rose: {e1} -> {e2}");
    wait(
        "the guest's stack on the new host",
        Duration::from_secs(30),
        || o.console(&h, "v").contains("T0 up ").then_some(()),
    );
    let (host, pa, ca_now) = o.map_entry(MAC).unwrap();
    assert_eq!(
        (host.as_str(), pa.as_str(), ca_now.as_str()),
        (to, pa_of(to), CA)
    );
    // The gateway's forwarding points at the new host (the dead one's is not checked).
    wait("the gateway's forwarding", Duration::from_secs(5), || {
        (o.fdb_dst("c", MAC).as_deref() == Some(pa_of(to))).then_some(())
    });
    let rtt = wait("an echo at the CA", Duration::from_secs(10), || {
        ferry_guest::tcp::echo_once((ca, 7).into(), None, b"after").ok()
    });
    eprintln!("reachable at {CA} on {to} again; echo {rtt:?}");
}

/// `ferry cluster drain` of the VM's host: the drain's live move takes the map entry with
/// it (the same claim), and the open connection carries on.
#[test]
fn a_drain_moves_the_vm_and_its_open_connection_carries_on() {
    let o = Overlay::up("od", 5, None);
    let first = o.create_vm(&format!("tcp ip={CA} mtu=1450"), MAC, 1);
    let probe = TcpProbe::start(
        format!("{CA}:8").parse().unwrap(),
        None,
        Duration::from_millis(5),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = announcements(&o, &first);
    let out = o.cli(&["drain", &first]);
    eprintln!("{out}");
    let to = other(&first);
    assert_eq!(o.owner("v").unwrap().0, to, "{out}");
    check_located(&o, to);
    check_announced(&o, to, before);
    std::thread::sleep(Duration::from_millis(500));
    let st = probe.stop(Duration::from_secs(3));
    st.check().expect("the connection carried on");
    eprintln!("largest reply gap across the drain {:?}", st.max_gap);
}

/// The balancer's move: the VM (whose TCP loop keeps a vCPU busy) is alone on `ha`, a host
/// of one CPU, over the 50 % threshold; the leader moves it live to `hb` (two CPUs, 45 %
/// after), the map entry with it, and the open connection carries on.
#[test]
fn a_balancing_move_takes_the_vm_and_its_open_connection_along() {
    let o = Overlay::up_balancing("ob", 5);
    let first = o.create_vm(&format!("tcp ip={CA} mtu=1450"), MAC, 1);
    assert_eq!(first, "ha", "placed on the first host of the lowest share");
    let probe = TcpProbe::start(
        format!("{CA}:8").parse().unwrap(),
        None,
        Duration::from_millis(5),
    )
    .unwrap();
    let before = announcements(&o, "ha");
    let moved = wait("the balancer's move", Duration::from_secs(60), || {
        o.owner("v").filter(|(h, _)| h == "hb")
    });
    eprintln!("moved by the balancer: {moved:?}");
    check_located(&o, "hb");
    check_announced(&o, "hb", before);
    std::thread::sleep(Duration::from_millis(500));
    let st = probe.stop(Duration::from_secs(3));
    st.check().expect("the connection carried on");
    eprintln!(
        "largest reply gap across the balancing move {:?}",
        st.max_gap
    );
    let moves: u64 = ["ha", "hb", "gw"]
        .iter()
        .filter_map(|h| metric_at(o.agent(h), "ferry_agent_balance_moves_total"))
        .sum();
    assert_eq!(moves, 1, "one move, by the balancer");
}
