//! Virtual networks and the CA→PA map against both stores: networks are unique by name and
//! VNI, a NIC's MAC and CA are reserved for its VM at define time, and the map entry of a
//! VM's NIC follows its owner in the owner's own transaction — published at the new host's
//! PA and withdrawn from the old one at once, withdrawn when the VM stops.
mod common;
use common::Etcd;
use ferry_cluster::membership::{HostRecord, Membership};
use ferry_cluster::net::{self, MapEntry, NetError, Network, Nic};
use ferry_cluster::records::{self, Desired, RecordError, VmRecord};
use ferry_cluster::store::{EtcdStore, MemStore};
use ferry_cluster::Store;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

fn host(id: &str, pa: Option<[u8; 4]>) -> HostRecord {
    HostRecord {
        version: 1,
        id: id.into(),
        addr: "127.0.0.1:1".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        pa: pa.map(Ipv4Addr::from),
    }
}

fn vm(name: &str, nics: &[Nic]) -> VmRecord {
    VmRecord {
        version: 1,
        name: name.into(),
        spec: serde_json::json!({"memory": "64M", "nics": nics}),
        desired: Desired::Running,
        priority: 0,
    }
}

fn nic(net: &str, mac: &str, ca: [u8; 4]) -> Nic {
    Nic {
        network: net.into(),
        mac: mac.into(),
        ca: ca.into(),
    }
}

fn network(name: &str, vni: u32) -> Network {
    Network {
        version: 1,
        name: name.into(),
        vni,
        mtu: net::DEFAULT_MTU,
    }
}

fn entry(s: &dyn Store, mac: &str) -> Option<MapEntry> {
    net::map(s).unwrap().into_iter().find(|e| e.mac == mac)
}

fn the_map(store: Arc<dyn Store>) {
    let s = &*store;
    net::create(s, &network("blue", 42)).unwrap();
    assert!(matches!(
        net::create(s, &network("blue", 43)),
        Err(NetError::Exists(_))
    ));
    match net::create(s, &network("red", 42)) {
        Err(NetError::VniTaken(42, by)) => assert_eq!(by, "blue"),
        r => panic!("{r:?}"),
    }
    for bad in [network("x y", 7), network("ok", 0), network("ok", 1 << 24)] {
        assert!(net::create(s, &bad).is_err(), "{bad:?}");
    }
    net::create(s, &network("red", 43)).unwrap();
    let names: Vec<String> = net::networks(s)
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["blue", "red"]);

    let mac = "52:54:00:00:00:01";
    let n1 = nic("blue", mac, [10, 99, 0, 5]);
    records::define(s, &vm("v1", std::slice::from_ref(&n1))).unwrap();
    // The same MAC or CA on the same network is taken; on another network it is not.
    match records::define(
        s,
        &vm("v2", &[nic("blue", "52:54:00:00:00:02", [10, 99, 0, 5])]),
    ) {
        Err(RecordError::Net(NetError::Taken { what, by, .. })) => {
            assert_eq!((what, by.as_str()), ("address", "v1"))
        }
        r => panic!("{r:?}"),
    }
    match records::define(s, &vm("v2", &[nic("blue", mac, [10, 99, 0, 6])])) {
        Err(RecordError::Net(NetError::Taken { what: "MAC", .. })) => {}
        r => panic!("{r:?}"),
    }
    match records::define(
        s,
        &vm("v2", &[nic("green", "52:54:00:00:00:02", [10, 99, 0, 6])]),
    ) {
        Err(RecordError::Net(NetError::NoSuchNetwork(n))) => assert_eq!(n, "green"),
        r => panic!("{r:?}"),
    }
    assert!(
        records::vm(s, "v2").unwrap().is_none(),
        "nothing of a refused define stays"
    );
    records::define(s, &vm("v2", &[nic("red", mac, [10, 99, 0, 5])])).unwrap();

    // Not placed: not in the map. Placed: at its host's PA. Moved: at the new one, in the
    // owner's transaction (the entry's revision is the owner's epoch).
    assert_eq!(entry(s, mac), None);
    let ttl = Duration::from_secs(5);
    let _a = Membership::join(store.clone(), &host("ha", Some([10, 61, 1, 2])), ttl).unwrap();
    let _b = Membership::join(store.clone(), &host("hb", Some([10, 61, 2, 2])), ttl).unwrap();
    let _c = Membership::join(store.clone(), &host("hc", None), ttl).unwrap();
    let o = records::claim(s, "v1", "ha", None).unwrap();
    let at = |s: &dyn Store| {
        let kv = s.get(&format!("{}blue/{mac}", net::MAP)).unwrap().unwrap();
        let e: MapEntry = serde_json::from_slice(&kv.value).unwrap();
        (e.host, e.pa, e.ca, kv.mod_revision)
    };
    assert_eq!(
        at(s),
        (
            "ha".into(),
            Some(Ipv4Addr::new(10, 61, 1, 2)),
            n1.ca,
            o.epoch
        )
    );
    let prepared = records::prepare_claim(s, "v1", "hb").unwrap();
    let o2 = records::claim_prepared(s, "v1", "hb", Some(o.epoch), prepared.clone()).unwrap();
    assert_eq!(
        at(s),
        (
            "hb".into(),
            Some(Ipv4Addr::new(10, 61, 2, 2)),
            n1.ca,
            o2.epoch
        )
    );
    // A claim that loses the race changes no map entry either.
    assert!(records::claim_prepared(s, "v1", "hb", Some(o.epoch), prepared).is_err());
    assert_eq!(at(s).3, o2.epoch);
    // A host without a PA: the entry says so.
    let o3 = records::claim(s, "v1", "hc", Some(o2.epoch)).unwrap();
    assert_eq!(at(s).1, None);
    // Released: withdrawn.
    records::release(s, "v1", o3.epoch).unwrap();
    assert_eq!(entry(s, mac).filter(|e| e.network == "blue"), None);
    let vteps = net::vteps(s).unwrap();
    assert_eq!(
        vteps,
        [
            ("ha".to_string(), Ipv4Addr::new(10, 61, 1, 2)),
            ("hb".to_string(), Ipv4Addr::new(10, 61, 2, 2))
        ]
    );
}

#[test]
fn the_map_on_the_embedded_store() {
    the_map(Arc::new(MemStore::in_memory()));
}

#[test]
fn the_map_on_etcd() {
    let etcd = Etcd::start(1);
    the_map(Arc::new(EtcdStore::connect(&etcd.clients).unwrap()));
}
