//! A VM keeps its address and its open TCP connections across hosts on different subnets
//! (issue #14), on real kernel networking: scripts/netlab.sh's sites A and B (10.61.1.0/24,
//! 10.61.2.0/24) joined by a router, site B behind the delayed WAN link, a client outside
//! both (10.61.3.0/24) on the overlay through its gateway agent; etcd in the router; the VM
//! on virtual network "blue" at CA 10.99.0.5 (the test guest's smoltcp stack). The client
//! holds one TCP connection and sends a request every 5 ms while the VM moves.
mod common;
mod overlay_common;
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
        let out = o.cli(&args);
        eprintln!("{out}");
        assert_eq!(o.owner("v").unwrap().0, to);
        check_located(&o, to);
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
