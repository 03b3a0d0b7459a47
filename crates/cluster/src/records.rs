//! VM records and their owners. A VM's record (`/ferry/vms/NAME`: its spec, the state it
//! should be in, its restart priority) and its owner (`/ferry/owners/NAME`: the host that
//! runs it) are separate keys, so that the owner key changes only when ownership does: its
//! revision is the owner's **epoch**, the fencing token every act of the owner carries.
//! Every change is a compare-and-swap; a host can take a VM only from the owner it read
//! (by epoch) and only while its own membership record exists.
use crate::membership::HOSTS;
use crate::net;
use crate::store::{Compare, Op, Store, StoreError};

pub const VMS: &str = "/ferry/vms/";
pub const OWNERS: &str = "/ferry/owners/";

/// The state a VM should be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub name: String,
    /// How to run it (the agents' business: memory, vCPUs, disks, guest).
    pub spec: serde_json::Value,
    pub desired: Desired,
    /// Higher restarts first after a failure.
    pub priority: i32,
}

/// Who runs a VM, since which revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub epoch: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("VM {0:?} already exists")]
    Exists(String),
    #[error("no VM {0:?}")]
    NoSuchVm(String),
    /// The owner is not the one the caller read: someone else changed it first.
    #[error("VM {name:?} changed owner meanwhile (now {now:?})")]
    Conflict { name: String, now: Option<Owner> },
    #[error("host {0:?} is not a live member (its lease is gone)")]
    HostGone(String),
    #[error("VM record {0:?} is damaged: {1}")]
    Damaged(String, String),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn parse(key: &str, b: &[u8]) -> Result<VmRecord, RecordError> {
    serde_json::from_slice(b).map_err(|e| RecordError::Damaged(key.into(), e.to_string()))
}

/// Creates a VM's record (no owner yet), reserving its NICs' addresses in the same
/// transaction; refused if the name is taken, a network missing or an address in use.
pub fn define(store: &dyn Store, rec: &VmRecord) -> Result<i64, RecordError> {
    let key = format!("{VMS}{}", rec.name);
    let b =
        serde_json::to_vec(rec).map_err(|e| RecordError::Damaged(key.clone(), e.to_string()))?;
    let nics = net::nics_of(&rec.spec)?;
    let (mut when, mut then) = net::reserve(&rec.name, &nics)?;
    when.push(Compare::Absent(key.clone()));
    then.push(Op::put(key.clone(), b));
    let r = store.txn(&when, &then)?;
    if r.succeeded {
        return Ok(r.revision);
    }
    if store.get(&key)?.is_some() {
        return Err(RecordError::Exists(rec.name.clone()));
    }
    match net::why_not_reserved(store, &nics)? {
        Some(e) => Err(e.into()),
        None => Err(RecordError::Conflict {
            name: rec.name.clone(),
            now: None,
        }),
    }
}

/// A VM's record and its revision.
pub fn vm(store: &dyn Store, name: &str) -> Result<Option<(VmRecord, i64)>, RecordError> {
    let key = format!("{VMS}{name}");
    store
        .get(&key)?
        .map(|kv| Ok((parse(&key, &kv.value)?, kv.mod_revision)))
        .transpose()
}

/// Every VM's record, by name.
pub fn vms(store: &dyn Store) -> Result<Vec<VmRecord>, RecordError> {
    store
        .list(VMS)?
        .iter()
        .map(|kv| parse(&kv.key, &kv.value))
        .collect()
}

/// Changes what state a VM should be in (retrying if its record changes meanwhile).
pub fn set_desired(store: &dyn Store, name: &str, desired: Desired) -> Result<(), RecordError> {
    loop {
        let (mut rec, rev) = vm(store, name)?.ok_or_else(|| RecordError::NoSuchVm(name.into()))?;
        rec.desired = desired;
        let b = serde_json::to_vec(&rec)
            .map_err(|e| RecordError::Damaged(name.into(), e.to_string()))?;
        if store.replace(&format!("{VMS}{name}"), rev, &b)?.is_some() {
            return Ok(());
        }
    }
}

/// Who owns `name` now.
pub fn owner(store: &dyn Store, name: &str) -> Result<Option<Owner>, RecordError> {
    Ok(store.get(&format!("{OWNERS}{name}"))?.map(|kv| Owner {
        host: String::from_utf8_lossy(&kv.value).into_owned(),
        epoch: kv.mod_revision,
    }))
}

/// Makes `host` the owner of `name`, if the owner is still the one read (`from`: its epoch,
/// or None for no owner) and `host` is a live member. Returns the new owner (its epoch).
/// The VM's NICs move in the CA→PA map to `host`'s provider address in the same
/// transaction ([`net`]): published there and withdrawn from the old host at once.
pub fn claim(
    store: &dyn Store,
    name: &str,
    host: &str,
    from: Option<i64>,
) -> Result<Owner, RecordError> {
    let map = prepare_claim(store, name, host)?;
    claim_prepared(store, name, host, from, map)
}

/// The map writes a claim of `name` by `host` makes, read ahead of time (a live
/// migration's switch-over should not wait for these reads). They stay right: a VM's NICs
/// never change once defined, and a host keeps its PA for as long as its membership, which
/// the claim requires.
pub fn prepare_claim(store: &dyn Store, name: &str, host: &str) -> Result<Vec<Op>, RecordError> {
    let rec = vm(store, name)?.ok_or_else(|| RecordError::NoSuchVm(name.into()))?;
    let pa = net::provider_address(store, host)?;
    Ok(net::locate(&rec.0, host, pa)?)
}

/// [`claim`] with the map writes of [`prepare_claim`].
pub fn claim_prepared(
    store: &dyn Store,
    name: &str,
    host: &str,
    from: Option<i64>,
    map: Vec<Op>,
) -> Result<Owner, RecordError> {
    let key = format!("{OWNERS}{name}");
    let member = format!("{HOSTS}{host}");
    let vm_key = format!("{VMS}{name}");
    let mut when = vec![Compare::Present(member.clone()), Compare::Present(vm_key)];
    when.push(match from {
        None => Compare::Absent(key.clone()),
        Some(e) => Compare::ModRevision(key.clone(), e),
    });
    let mut then = vec![Op::put(key, host)];
    then.extend(map);
    let r = store.txn(&when, &then)?;
    if r.succeeded {
        return Ok(Owner {
            host: host.into(),
            epoch: r.revision,
        });
    }
    if store.get(&member)?.is_none() {
        return Err(RecordError::HostGone(host.into()));
    }
    if vm(store, name)?.is_none() {
        return Err(RecordError::NoSuchVm(name.into()));
    }
    Err(RecordError::Conflict {
        name: name.into(),
        now: owner(store, name)?,
    })
}

/// Gives up ownership (the VM stopped), if `epoch` is still the owner's; its NICs leave
/// the map in the same transaction.
pub fn release(store: &dyn Store, name: &str, epoch: i64) -> Result<(), RecordError> {
    let key = format!("{OWNERS}{name}");
    let mut then = vec![Op::delete(key.clone())];
    if let Some((rec, _)) = vm(store, name)? {
        then.extend(net::withdraw(&rec)?);
    }
    let r = store.txn(&[Compare::ModRevision(key.clone(), epoch)], &then)?;
    if r.succeeded {
        Ok(())
    } else {
        Err(RecordError::Conflict {
            name: name.into(),
            now: owner(store, name)?,
        })
    }
}
