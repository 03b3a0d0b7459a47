//! The overlay on a `ferry host` with a provider address (`--provider-addr`; issue #14,
//! docs/network.md): every virtual network gets its VXLAN device and bridge here, each VM
//! NIC a tap on its network's bridge, and a thread keeps the host's forwarding equal to the
//! CA→PA map — static FDB entries for the NICs on other hosts and the flood entries for
//! the other VTEPs, permanent neighbour entries for every NIC — rewritten as soon as the map
//! changes (a watch on the store), and at least every second.
use ferry_cluster::net::{self, Nic};
use ferry_cluster::Store;
use ferry_net::overlay::{plan, Host, Mac, Nic as MapNic};
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A NIC's tap and its MAC.
pub type TapMac = (String, String);

/// This host's part of the overlay.
#[derive(Clone)]
pub struct Overlay {
    pub store: Arc<dyn Store>,
    pub pa: Ipv4Addr,
}

/// The tap of NIC `i` of VM `vm`: the same name on every host, so a VM that arrives by
/// live migration finds its NIC's tap under the name its state carries.
pub fn tap_name(vm: &str, i: usize) -> String {
    // FNV-1a: short, stable, and an interface name has at most 15 characters.
    let h = vm.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("ft{h:08x}n{i}")
}

/// Parses `network=NAME,ca=A.B.C.D[,mac=MAC]`, NIC `i` of VM `vm`.
pub fn parse_nic(spec: &str, vm: &str, i: usize) -> Result<Nic, String> {
    let (mut network, mut ca, mut mac) = (None, None, None);
    for kv in spec.split(',') {
        match kv.split_once('=') {
            Some(("network", v)) if !v.is_empty() => network = Some(v.to_string()),
            Some(("ca", v)) => {
                ca = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|_| format!("--nic {spec:?}: ca={v}: not an IPv4 address"))?,
                )
            }
            Some(("mac", v)) => {
                mac = Some(net::normal_mac(v).map_err(|e| format!("--nic {spec:?}: {e}"))?)
            }
            _ => {
                return Err(format!(
                    "--nic {spec:?}: expected network=NAME,ca=A.B.C.D[,mac=MAC]"
                ))
            }
        }
    }
    let (Some(network), Some(ca)) = (network, ca) else {
        return Err(format!("--nic {spec:?}: network= and ca= are required"));
    };
    let mac = mac.unwrap_or_else(|| {
        let h = tap_name(vm, i);
        let b = u32::from_str_radix(&h[2..10], 16)
            .unwrap_or(0)
            .to_be_bytes();
        format!("52:54:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3] ^ i as u8)
    });
    Ok(Nic { network, mac, ca })
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes each tap the bridge's port for its NIC's MAC, learning or not (`bridge fdb replace
/// MAC dev TAP master static`): a VM that arrives, or boots after a failover, on a host
/// whose bridge learned its MAC on the VXLAN port while it ran elsewhere gets its frames
/// from the first one on — those arriving while it is still paused wait in the tap —
/// instead of after its first frame taught the bridge. The entry goes with the tap.
pub fn pin(nics: &[TapMac]) {
    for (tap, mac) in nics {
        let out = std::process::Command::new("bridge")
            .args(["fdb", "replace", mac, "dev", tap, "master", "static"])
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            tracing::warn!("bridge fdb replace {mac} dev {tap} master static failed");
        }
    }
}

/// Deletes the taps (those already gone are no error).
pub fn remove_taps(taps: &[TapMac]) {
    for (t, _) in taps {
        let _ = ip(&["link", "del", t]);
    }
}

impl Overlay {
    /// Creates network `n`'s devices on this host (if missing) with its MTU.
    fn network_host(&self, n: &net::Network) -> Result<Host, String> {
        let h = Host::create(None, n.vni, self.pa).map_err(|e| e.to_string())?;
        h.set_mtu(n.mtu).map_err(|e| e.to_string())?;
        Ok(h)
    }

    /// Makes a tap for each NIC of VM `vm` on its network's bridge (replacing a leftover of
    /// the same name); returns the taps and the `ferry run --net` spec of each.
    pub fn taps(&self, vm: &str, nics: &[Nic]) -> Result<(Vec<TapMac>, Vec<String>), String> {
        let nets = net::networks(&*self.store).map_err(|e| e.to_string())?;
        let (mut taps, mut specs) = (Vec::new(), Vec::new());
        for (i, nic) in nics.iter().enumerate() {
            let n = nets
                .iter()
                .find(|n| n.name == nic.network)
                .ok_or_else(|| format!("NIC {i}: no network {:?}", nic.network))?;
            let host = self.network_host(n)?;
            let tap = tap_name(vm, i);
            let _ = ip(&["link", "del", &tap]);
            let made = ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])
                .and_then(|_| ip(&["link", "set", &tap, "mtu", &n.mtu.to_string()]))
                .and_then(|_| ip(&["link", "set", &tap, "master", &host.bridge()]))
                .and_then(|_| ip(&["link", "set", &tap, "up"]));
            taps.push((tap.clone(), nic.mac.clone()));
            if let Err(e) = made {
                remove_taps(&taps);
                return Err(format!("NIC {i} of {vm}: {e}"));
            }
            specs.push(format!("tap={tap},mac={}", nic.mac));
        }
        Ok((taps, specs))
    }

    /// The NICs of VM `vm` (from its record), for an arriving VMM's taps.
    pub fn nics_of_vm(&self, vm: &str) -> Result<Vec<Nic>, String> {
        let rec = ferry_cluster::records::vm(&*self.store, vm)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no VM {vm:?}"))?;
        net::nics_of(&rec.0.spec).map_err(|e| e.to_string())
    }

    /// Makes this host's forwarding the map's, once. `made`: networks whose devices exist.
    fn program(&self, made: &mut HashSet<u32>) -> Result<usize, String> {
        let s = &*self.store;
        let e = |e: ferry_cluster::net::NetError| e.to_string();
        let nets = net::networks(s).map_err(e)?;
        let map = net::map(s).map_err(e)?;
        let vteps: Vec<Ipv4Addr> = net::vteps(s).map_err(e)?.into_iter().map(|v| v.1).collect();
        let mut changes = 0;
        for n in &nets {
            let host = if made.contains(&n.vni) {
                Host::create_existing(None, n.vni)
            } else {
                let h = self.network_host(n)?;
                made.insert(n.vni);
                h
            };
            let nics: Vec<MapNic> = map
                .iter()
                .filter(|m| m.network == n.name)
                .filter_map(|m| {
                    Some(MapNic {
                        mac: m.mac.parse().ok()?,
                        ca: m.ca,
                        pa: m.pa?,
                    })
                })
                .collect();
            let fdb = host.program(&plan(self.pa, &nics, &vteps));
            let fdb = match fdb {
                Ok(c) => c,
                Err(err) => {
                    made.remove(&n.vni); // its devices may be gone: made again next time
                    return Err(err.to_string());
                }
            };
            let neigh: BTreeSet<(Ipv4Addr, Mac)> = nics.iter().map(|n| (n.ca, n.mac)).collect();
            let nb = host.neighbours(&neigh).map_err(|e| e.to_string())?;
            changes += fdb.0 + fdb.1 + nb.0 + nb.1;
        }
        Ok(changes)
    }

    /// Keeps this host's forwarding equal to the map, on a thread of its own.
    pub fn spawn(self) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("ferry-overlay".into())
            .spawn(move || {
                let mut made = HashSet::new();
                let mut said = String::new();
                loop {
                    let rev = self.store.revision();
                    let t0 = Instant::now();
                    match self.program(&mut made) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            "overlay: {n} forwarding entries changed in {:?}",
                            t0.elapsed()
                        ),
                        Err(e) if e != said => {
                            eprintln!("ferry host: overlay: {e}");
                            said = e;
                        }
                        Err(_) => {}
                    }
                    match rev {
                        Ok(rev) => {
                            if self
                                .store
                                .wait(net::MAP, rev, Duration::from_secs(1))
                                .is_err()
                            {
                                std::thread::sleep(Duration::from_millis(500));
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(500)),
                    }
                }
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_specs_parse_with_a_stable_default_mac_and_bad_ones_are_refused() {
        let n = parse_nic("network=blue,ca=10.99.0.5", "web-1", 0).unwrap();
        assert_eq!(
            (n.network.as_str(), n.ca),
            ("blue", Ipv4Addr::new(10, 99, 0, 5))
        );
        assert!(n.mac.starts_with("52:54:00:"), "{}", n.mac);
        assert_eq!(
            n,
            parse_nic("network=blue,ca=10.99.0.5", "web-1", 0).unwrap()
        );
        assert_ne!(
            n.mac,
            parse_nic("network=blue,ca=10.99.0.5", "web-1", 1)
                .unwrap()
                .mac
        );
        let m = parse_nic("network=blue,ca=10.99.0.5,mac=52:54:00:AA:00:01", "x", 0).unwrap();
        assert_eq!(m.mac, "52:54:00:aa:00:01");
        for bad in [
            "network=blue",
            "ca=10.0.0.1",
            "network=blue,ca=10.0.0",
            "network=b,ca=10.0.0.1,mac=01:00:00:00:00:01",
            "network=b,ca=10.0.0.1,x=1",
        ] {
            assert!(parse_nic(bad, "x", 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn tap_names_are_stable_short_and_differ_by_vm_and_nic() {
        let a = tap_name("web-1", 0);
        assert_eq!(a, tap_name("web-1", 0));
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, tap_name("web-2", 0));
        assert_ne!(a, tap_name("web-1", 1));
    }
}
