//! Seeded migration (docs/seeding.md): the destination holds a copy of the VM from earlier
//! (a seed). After Welcome it names the seed (`SeedId`); a source that made that seed and
//! has logged every write since answers `SeedUse(true)` and pass 1 sends what its dirty log
//! says changed. Otherwise (`SeedUse(false)`) the destination lists the pages it holds with
//! their content hashes (`Held`) and pass 1 sends only the pages whose content differs. The
//! dirty log started before pass 1 catches every write after a page was compared, so later
//! passes are those of any migration.
use super::{DestinationVm, EngineError, SourceVm};
use crate::protocol::{recv, send, Message, ProtocolError};
use crate::seed::{PageHash, MAX_HELD};
use crate::transport::Conn;
use std::collections::HashMap;

/// The destination's pages, by address.
pub(super) type Held = HashMap<u64, PageHash>;

/// How pass 1 of a seeded migration finds what to send.
pub(super) enum Plan {
    /// The pages of the source's dirty log since the seed.
    DirtyLog,
    /// The destination's pages and hashes.
    Hashes(Held),
}

/// Destination, right after Welcome: names the seed, and lists `held` if the source asks.
pub(super) fn offer<V: DestinationVm>(
    vm: &V,
    ctl: &mut Conn,
    held: &[(u64, PageHash)],
) -> Result<(), EngineError> {
    send(ctl, &Message::SeedId(vm.seed_id().unwrap_or(0)))?;
    match recv(ctl)? {
        Message::SeedUse(true) => Ok(()),
        Message::SeedUse(false) => Ok(send_held(ctl, held)?),
        Message::Abort(why) => Err(ProtocolError::Peer(why).into()),
        m => Err(m.unexpected("SeedUse").into()),
    }
}

/// Source, right after Welcome: takes the dirty-log path when the destination's seed is the
/// one this VM's log runs from, else asks for the hashes.
pub(super) fn choose<V: SourceVm>(vm: &V, ctl: &mut Conn) -> Result<Plan, EngineError> {
    let id = match recv(ctl)? {
        Message::SeedId(id) => id,
        Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
        m => return Err(m.unexpected("SeedId").into()),
    };
    let mine = id != 0 && vm.seed_baseline() == Some(id);
    send(ctl, &Message::SeedUse(mine))?;
    if mine {
        Ok(Plan::DirtyLog)
    } else {
        Ok(Plan::Hashes(recv_held(ctl, vm.memory_end())?))
    }
}

/// Destination: sends `held`, in as many `Held` frames as it takes, then an empty one.
fn send_held(ctl: &mut Conn, held: &[(u64, PageHash)]) -> Result<(), ProtocolError> {
    for chunk in held.chunks(MAX_HELD) {
        send(ctl, &Message::Held(chunk.to_vec()))?;
    }
    send(ctl, &Message::Held(Vec::new()))
}

/// Source: reads the destination's `Held` frames up to the empty one; `end` bounds the
/// addresses (the VM's memory).
fn recv_held(ctl: &mut Conn, end: u64) -> Result<Held, EngineError> {
    let mut held = Held::new();
    loop {
        match recv(ctl)? {
            Message::Held(h) if h.is_empty() => return Ok(held),
            Message::Held(h) => {
                for (gpa, hash) in h {
                    if gpa >= end {
                        return Err(ProtocolError::Malformed {
                            what: "Held",
                            why: format!("page {gpa:#x} beyond the VM's memory ({end:#x})"),
                        }
                        .into());
                    }
                    held.insert(gpa, hash);
                }
            }
            Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
            m => return Err(m.unexpected("Held").into()),
        }
    }
}
