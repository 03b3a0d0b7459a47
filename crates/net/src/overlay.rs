//! The overlay's forwarding on one host (docs/network.md, "Overlay"): a virtual network is
//! a VXLAN device (`fvxVNI`, learning off) enslaved to a bridge (`fbrVNI`) that the VMs' taps
//! join. Which host runs which NIC is the CA→PA map; from it each host gets static FDB
//! entries on its VXLAN device — every remote NIC's MAC to its host's provider address, and
//! the all-zeros MAC to every other VTEP (broadcast and unknown unicast, such as ARP, are
//! flooded there). The kernel never moves a static entry when traffic arrives from
//! elsewhere, so after a move the entry must be rewritten: [`Host::program`] replaces
//! entries before it deletes stale ones, so a moved NIC always has a location. Programming
//! goes through iproute2 (`ip`, `bridge`), optionally inside a network namespace.
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("`{cmd}` failed: {why}")]
    Command { cmd: String, why: String },
    #[error("MAC address {0:?}: expected six hex bytes separated by ':'")]
    BadMac(String),
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zeros address: a VXLAN FDB entry for it floods to its destination.
    pub const FLOOD: Mac = Mac([0; 6]);
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = OverlayError;
    fn from_str(s: &str) -> Result<Mac, OverlayError> {
        let bad = || OverlayError::BadMac(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Mac(m))
    }
}

/// A VM NIC on a virtual network: its MAC, its customer address, and the provider address
/// of the host it runs on now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: Mac,
    pub ca: Ipv4Addr,
    pub pa: Ipv4Addr,
}

/// One static entry of a VXLAN device's forwarding database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// What the host with provider address `local` must have on its VXLAN device: the NICs
/// that run elsewhere, at their hosts; the flood entry for every other VTEP in `vteps`.
pub fn plan(local: Ipv4Addr, nics: &[Nic], vteps: &[Ipv4Addr]) -> BTreeSet<Fdb> {
    let remote = nics.iter().filter(|n| n.pa != local).map(|n| Fdb {
        mac: n.mac,
        dst: n.pa,
    });
    let flood = vteps.iter().filter(|v| **v != local).map(|v| Fdb {
        mac: Mac::FLOOD,
        dst: *v,
    });
    remote.chain(flood).collect()
}

/// The changes from `have` to `want`: entries to write (first), and entries to delete
/// after (not the unicast MACs written anew: `replace` moved those already).
pub fn diff(have: &BTreeSet<Fdb>, want: &BTreeSet<Fdb>) -> (Vec<Fdb>, Vec<Fdb>) {
    let add: Vec<Fdb> = want.difference(have).copied().collect();
    let moved: BTreeSet<Mac> = add
        .iter()
        .filter(|e| e.mac != Mac::FLOOD)
        .map(|e| e.mac)
        .collect();
    let del = have
        .difference(want)
        .filter(|e| e.mac == Mac::FLOOD || !moved.contains(&e.mac))
        .copied()
        .collect();
    (add, del)
}

/// One virtual network's devices on one host (or in network namespace `ns`).
pub struct Host {
    ns: Option<String>,
    vni: u32,
}

impl Host {
    /// Creates (or finds) the VXLAN device and bridge of network `vni`, sending from the
    /// provider address `local`.
    pub fn create(ns: Option<&str>, vni: u32, local: Ipv4Addr) -> Result<Host, OverlayError> {
        let h = Host {
            ns: ns.map(str::to_string),
            vni,
        };
        let (vx, br) = (h.vxlan(), h.bridge());
        if h.run("ip", &["link", "show", &br]).is_err() {
            h.run("ip", &["link", "add", &br, "type", "bridge"])?;
        }
        if h.run("ip", &["link", "show", &vx]).is_err() {
            let (id, local, port) = (vni.to_string(), local.to_string(), VXLAN_PORT.to_string());
            h.run(
                "ip",
                &[
                    "link",
                    "add",
                    &vx,
                    "type",
                    "vxlan",
                    "id",
                    &id,
                    "local",
                    &local,
                    "dstport",
                    &port,
                    "nolearning",
                ],
            )?;
        }
        h.run("ip", &["link", "set", &vx, "master", &br])?;
        h.run("ip", &["link", "set", &vx, "up"])?;
        h.run("ip", &["link", "set", &br, "up"])?;
        Ok(h)
    }

    /// The handle of network `vni`'s devices, made earlier by [`Host::create`].
    pub fn create_existing(ns: Option<&str>, vni: u32) -> Host {
        Host {
            ns: ns.map(str::to_string),
            vni,
        }
    }

    /// Sets the MTU inside the network on its VXLAN device (the bridge follows its ports).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), OverlayError> {
        self.run(
            "ip",
            &["link", "set", &self.vxlan(), "mtu", &mtu.to_string()],
        )?;
        Ok(())
    }

    /// Makes the bridge's permanent neighbour entries `want` (customer address → MAC), so
    /// the host's own IP stack on the network (a gateway's, a client's) never has to ask
    /// by ARP where a VM is. Returns (written, deleted).
    pub fn neighbours(
        &self,
        want: &BTreeSet<(Ipv4Addr, Mac)>,
    ) -> Result<(usize, usize), OverlayError> {
        let br = self.bridge();
        let out = self.run(
            "ip",
            &["-4", "neigh", "show", "dev", &br, "nud", "permanent"],
        )?;
        let have: BTreeSet<(Ipv4Addr, Mac)> = out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let ip = w.first()?.parse().ok()?;
                let i = w.iter().position(|x| *x == "lladdr")?;
                Some((ip, w.get(i + 1)?.parse().ok()?))
            })
            .collect();
        let add: Vec<_> = want.difference(&have).collect();
        let readdressed: BTreeSet<Ipv4Addr> = add.iter().map(|(ip, _)| *ip).collect();
        let del: Vec<_> = have
            .difference(want)
            .filter(|(ip, _)| !readdressed.contains(ip))
            .collect();
        for (ip, mac) in &add {
            let (ip, mac) = (ip.to_string(), mac.to_string());
            self.run(
                "ip",
                &[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    &mac,
                    "dev",
                    &br,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        for (ip, _) in &del {
            self.run("ip", &["neigh", "del", &ip.to_string(), "dev", &br])?;
        }
        Ok((add.len(), del.len()))
    }

    pub fn vxlan(&self) -> String {
        format!("fvx{}", self.vni)
    }

    /// The bridge the VMs' taps of this network join.
    pub fn bridge(&self) -> String {
        format!("fbr{}", self.vni)
    }

    /// The static entries with a destination on the VXLAN device now.
    pub fn fdb(&self) -> Result<BTreeSet<Fdb>, OverlayError> {
        let out = self.run("bridge", &["fdb", "show", "dev", &self.vxlan()])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let mac = w.first()?.parse().ok()?;
                let i = w.iter().position(|x| *x == "dst")?;
                let dst = w.get(i + 1)?.parse().ok()?;
                Some(Fdb { mac, dst })
            })
            .collect())
    }

    /// Makes the VXLAN device's entries `want`: writes what is missing (a moved MAC is
    /// replaced in place), then deletes what is stale. Returns (written, deleted).
    pub fn program(&self, want: &BTreeSet<Fdb>) -> Result<(usize, usize), OverlayError> {
        let (add, del) = diff(&self.fdb()?, want);
        let vx = self.vxlan();
        for e in &add {
            let (mac, dst) = (e.mac.to_string(), e.dst.to_string());
            let verb = if e.mac == Mac::FLOOD {
                "append"
            } else {
                "replace"
            };
            self.run(
                "bridge",
                &[
                    "fdb",
                    verb,
                    &mac,
                    "dev",
                    &vx,
                    "dst",
                    &dst,
                    "self",
                    "permanent",
                ],
            )?;
        }
        for e in &del {
            let (mac, dst) = (e.mac.to_string(), e.dst.to_string());
            self.run(
                "bridge",
                &["fdb", "del", &mac, "dev", &vx, "dst", &dst, "self"],
            )?;
        }
        Ok((add.len(), del.len()))
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<String, OverlayError> {
        let mut c = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, tool]);
                c
            }
            None => Command::new(tool),
        };
        let cmd = format!("{tool} {}", args.join(" "));
        let out = c.args(args).output().map_err(|e| OverlayError::Command {
            cmd: cmd.clone(),
            why: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(OverlayError::Command {
                cmd,
                why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn a_host_forwards_remote_nics_to_their_hosts_and_floods_to_the_other_vteps() {
        let (a, b, c) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        let ca = |n| Ipv4Addr::new(192, 168, 0, n);
        let nics = [
            Nic {
                mac: mac(1),
                ca: ca(1),
                pa: a,
            },
            Nic {
                mac: mac(2),
                ca: ca(2),
                pa: b,
            },
        ];
        let p = plan(a, &nics, &[a, b, c]);
        let want: BTreeSet<Fdb> = [
            Fdb {
                mac: mac(2),
                dst: b,
            },
            Fdb {
                mac: Mac::FLOOD,
                dst: b,
            },
            Fdb {
                mac: Mac::FLOOD,
                dst: c,
            },
        ]
        .into();
        assert_eq!(p, want);
    }

    #[test]
    fn a_moved_nic_is_rewritten_not_deleted_and_stale_flood_entries_go() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let gone = Ipv4Addr::new(10, 0, 0, 9);
        let have: BTreeSet<Fdb> = [
            Fdb {
                mac: mac(2),
                dst: a,
            },
            Fdb {
                mac: Mac::FLOOD,
                dst: a,
            },
            Fdb {
                mac: Mac::FLOOD,
                dst: gone,
            },
        ]
        .into();
        let want: BTreeSet<Fdb> = [
            Fdb {
                mac: mac(2),
                dst: b,
            },
            Fdb {
                mac: Mac::FLOOD,
                dst: a,
            },
            Fdb {
                mac: Mac::FLOOD,
                dst: b,
            },
        ]
        .into();
        let (add, del) = diff(&have, &want);
        assert_eq!(
            add,
            vec![
                Fdb {
                    mac: mac(2),
                    dst: b
                },
                Fdb {
                    mac: Mac::FLOOD,
                    dst: b
                }
            ]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        // mac(2) at a is not deleted: the replace moved it (deleting would remove it).
        assert_eq!(
            del,
            vec![Fdb {
                mac: Mac::FLOOD,
                dst: gone
            }]
        );
    }

    #[test]
    fn macs_read_and_print_alike_and_bad_ones_are_refused() {
        let m: Mac = "52:54:00:ab:cd:0e".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0e");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0e:1",
            "zz:54:00:ab:cd:0e",
            "5:54:00:ab:cd:0e1",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }
}
