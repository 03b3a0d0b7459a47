//! Seeded migration (docs/seeding.md): the destination holds a copy of the VM from earlier
//! (a seed) and tells the source which pages it holds, with their content hashes; pass 1
//! sends only the pages whose content differs. The dirty log started before pass 1 catches
//! every write after a page was compared, so later passes are those of any migration.
use super::EngineError;
use crate::protocol::{recv, send, Message, ProtocolError};
use crate::seed::{PageHash, MAX_HELD};
use crate::transport::Conn;
use std::collections::HashMap;

/// The destination's pages, by address.
pub(super) type Held = HashMap<u64, PageHash>;

/// Destination: sends `held` after Welcome, in as many `Held` frames as it takes, then an
/// empty one.
pub(super) fn send_held(ctl: &mut Conn, held: &[(u64, PageHash)]) -> Result<(), ProtocolError> {
    for chunk in held.chunks(MAX_HELD) {
        send(ctl, &Message::Held(chunk.to_vec()))?;
    }
    send(ctl, &Message::Held(Vec::new()))
}

/// Source: reads the destination's `Held` frames up to the empty one; `end` bounds the
/// addresses (the VM's memory).
pub(super) fn recv_held(ctl: &mut Conn, end: u64) -> Result<Held, EngineError> {
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
