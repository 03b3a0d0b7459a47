//! Virtual networks and the CA→PA map (issue #14; docs/network.md). A network has a name
//! and a VXLAN id (VNI); a VM's NICs (in its spec, `"nics"`) each name a network, a MAC and
//! a customer address (CA). Where each NIC runs is the map, `/ferry/map/NET/MAC`: the NIC's
//! CA and the provider address (PA) of the host that owns the VM. The map entry changes in
//! the same transaction as the owner record ([`crate::records::claim`]): a move publishes
//! the NIC's new location and withdraws the old one atomically, so there is never a moment
//! with no location or two, and the entry always names the host with the VM's fence epoch.
//!
//! Keys:
//! - `/ferry/nets/NAME` → [`Network`]; `/ferry/vnis/VNI` → NAME (a VNI names one network);
//! - `/ferry/addrs/NET/mac/MAC` and `/ferry/addrs/NET/ca/CA` → the VM that holds the
//!   address, written in the VM's define transaction (no two NICs share one);
//! - `/ferry/map/NET/MAC` → [`MapEntry`], while the VM has an owner.
use crate::membership::{HostRecord, HOSTS};
use crate::records::VmRecord;
use crate::store::{Compare, Op, Store, StoreError};
use std::net::Ipv4Addr;

pub const NETS: &str = "/ferry/nets/";
pub const VNIS: &str = "/ferry/vnis/";
pub const ADDRS: &str = "/ferry/addrs/";
pub const MAP: &str = "/ferry/map/";
/// The inner MTU a network gets by default: 1500 less VXLAN's 50 bytes of outer headers.
pub const DEFAULT_MTU: u32 = 1450;
/// The largest VNI VXLAN carries (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Network {
    pub version: u32,
    pub name: String,
    pub vni: u32,
    /// The MTU inside the network (its taps, its VXLAN devices, what VMs are told).
    pub mtu: u32,
}

/// A VM NIC on a virtual network (an element of a VM spec's `"nics"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub network: String,
    /// Lower-case `52:54:00:12:34:56`.
    pub mac: String,
    /// The customer address (IPv4).
    pub ca: Ipv4Addr,
}

/// Where a NIC runs now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapEntry {
    pub version: u32,
    pub vm: String,
    pub network: String,
    pub mac: String,
    pub ca: Ipv4Addr,
    /// The owner host, and its provider address (None: that host has none and cannot carry
    /// the network).
    pub host: String,
    pub pa: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network name {0:?}: 1-64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("VNI {0}: expected 1 to {MAX_VNI}")]
    BadVni(u32),
    #[error("MTU {0}: expected 576 to 9000")]
    BadMtu(u32),
    #[error("network {0:?} already exists")]
    Exists(String),
    #[error("VNI {0} is network {1:?}'s already")]
    VniTaken(u32, String),
    #[error("no network {0:?} (`ferry cluster net create` first)")]
    NoSuchNetwork(String),
    #[error(
        "MAC address {0:?}: expected six hex bytes, unicast, not all zero (52:54:00:12:34:56)"
    )]
    BadMac(String),
    #[error("{what} {addr} on network {network:?} is taken (by VM {by:?})")]
    Taken {
        what: &'static str,
        addr: String,
        network: String,
        by: String,
    },
    #[error("network record {0:?} is damaged: {1}")]
    Damaged(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn damaged(key: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Damaged(key.into(), e.to_string())
}

/// A MAC address as the map keeps it (lower case), if it is a usable unicast one.
pub fn normal_mac(s: &str) -> Result<String, NetError> {
    let bad = || NetError::BadMac(s.into());
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let b: Vec<u8> = parts
        .iter()
        .map(|p| u8::from_str_radix(p, 16).map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if b[0] & 1 != 0 || b.iter().all(|x| *x == 0) {
        return Err(bad());
    }
    Ok(s.to_ascii_lowercase())
}

/// Defines a network; refused if the name or the VNI is taken.
pub fn create(store: &dyn Store, net: &Network) -> Result<(), NetError> {
    if !crate::membership::valid_id(&net.name) {
        return Err(NetError::BadName(net.name.clone()));
    }
    if !(1..=MAX_VNI).contains(&net.vni) {
        return Err(NetError::BadVni(net.vni));
    }
    if !(576..=9000).contains(&net.mtu) {
        return Err(NetError::BadMtu(net.mtu));
    }
    let key = format!("{NETS}{}", net.name);
    let vni_key = format!("{VNIS}{}", net.vni);
    let b = serde_json::to_vec(net).map_err(|e| damaged(&key, e))?;
    let r = store.txn(
        &[
            Compare::Absent(key.clone()),
            Compare::Absent(vni_key.clone()),
        ],
        &[
            Op::put(key.clone(), b),
            Op::put(vni_key.clone(), net.name.clone()),
        ],
    )?;
    if r.succeeded {
        return Ok(());
    }
    if store.get(&key)?.is_some() {
        return Err(NetError::Exists(net.name.clone()));
    }
    let by = store
        .get(&vni_key)?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    Err(NetError::VniTaken(net.vni, by))
}

/// Every network, by name.
pub fn networks(store: &dyn Store) -> Result<Vec<Network>, NetError> {
    store
        .list(NETS)?
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value).map_err(|e| damaged(&kv.key, e)))
        .collect()
}

/// The NICs of a VM spec (`"nics"`; none when absent).
pub fn nics_of(spec: &serde_json::Value) -> Result<Vec<Nic>, NetError> {
    match spec.get("nics") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| damaged("nics", e)),
    }
}

fn addr_keys(n: &Nic) -> [(&'static str, String, String); 2] {
    [
        (
            "MAC",
            n.mac.clone(),
            format!("{ADDRS}{}/mac/{}", n.network, n.mac),
        ),
        (
            "address",
            n.ca.to_string(),
            format!("{ADDRS}{}/ca/{}", n.network, n.ca),
        ),
    ]
}

/// What a VM's define transaction must check and write for its NICs: each network exists,
/// each MAC and CA is free on its network (and then reserved for `vm`).
pub fn reserve(vm: &str, nics: &[Nic]) -> Result<(Vec<Compare>, Vec<Op>), NetError> {
    let (mut when, mut then) = (Vec::new(), Vec::new());
    for n in nics {
        normal_mac(&n.mac)?;
        when.push(Compare::Present(format!("{NETS}{}", n.network)));
        for (_, _, key) in addr_keys(n) {
            when.push(Compare::Absent(key.clone()));
            then.push(Op::put(key, vm));
        }
    }
    Ok((when, then))
}

/// Why a define with these NICs did not go through (after its transaction failed), if it
/// was the NICs.
pub fn why_not_reserved(store: &dyn Store, nics: &[Nic]) -> Result<Option<NetError>, NetError> {
    for n in nics {
        if store.get(&format!("{NETS}{}", n.network))?.is_none() {
            return Ok(Some(NetError::NoSuchNetwork(n.network.clone())));
        }
        for (what, addr, key) in addr_keys(n) {
            if let Some(kv) = store.get(&key)? {
                return Ok(Some(NetError::Taken {
                    what,
                    addr,
                    network: n.network.clone(),
                    by: String::from_utf8_lossy(&kv.value).into_owned(),
                }));
            }
        }
    }
    Ok(None)
}

/// The writes that free a deleted VM's addresses.
pub fn unreserve(nics: &[Nic]) -> Vec<Op> {
    nics.iter()
        .flat_map(|n| addr_keys(n).map(|(_, _, k)| Op::delete(k)))
        .collect()
}

/// The provider address in host `host`'s membership record, if it is a member with one.
pub fn provider_address(store: &dyn Store, host: &str) -> Result<Option<Ipv4Addr>, NetError> {
    let key = format!("{HOSTS}{host}");
    Ok(match store.get(&key)? {
        Some(kv) => {
            let r: HostRecord = serde_json::from_slice(&kv.value).map_err(|e| damaged(&key, e))?;
            r.pa
        }
        None => None,
    })
}

/// The writes that put every NIC of `rec` at host `host` (whose provider address is `pa`).
pub fn locate(rec: &VmRecord, host: &str, pa: Option<Ipv4Addr>) -> Result<Vec<Op>, NetError> {
    nics_of(&rec.spec)?
        .into_iter()
        .map(|n| {
            let key = format!("{MAP}{}/{}", n.network, n.mac);
            let e = MapEntry {
                version: 1,
                vm: rec.name.clone(),
                network: n.network,
                mac: n.mac,
                ca: n.ca,
                host: host.into(),
                pa,
            };
            let b = serde_json::to_vec(&e).map_err(|e| damaged(&key, e))?;
            Ok(Op::put(key, b))
        })
        .collect()
}

/// The writes that withdraw every NIC of `rec` from the map (the VM no longer runs).
pub fn withdraw(rec: &VmRecord) -> Result<Vec<Op>, NetError> {
    Ok(nics_of(&rec.spec)?
        .into_iter()
        .map(|n| Op::delete(format!("{MAP}{}/{}", n.network, n.mac)))
        .collect())
}

/// The whole map.
pub fn map(store: &dyn Store) -> Result<Vec<MapEntry>, NetError> {
    store
        .list(MAP)?
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value).map_err(|e| damaged(&kv.key, e)))
        .collect()
}

/// The provider address of every member host that has one (the VTEPs), by host id.
pub fn vteps(store: &dyn Store) -> Result<Vec<(String, Ipv4Addr)>, NetError> {
    let mut v = Vec::new();
    for kv in store.list(HOSTS)? {
        let r: HostRecord = serde_json::from_slice(&kv.value).map_err(|e| damaged(&kv.key, e))?;
        if let Some(pa) = r.pa {
            v.push((r.id, pa));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_normalised_and_multicast_or_zero_ones_refused() {
        assert_eq!(
            normal_mac("52:54:00:AB:cd:01").unwrap(),
            "52:54:00:ab:cd:01"
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "5:54:00:ab:cd:011",
        ] {
            assert!(normal_mac(bad).is_err(), "{bad}");
        }
    }
}
