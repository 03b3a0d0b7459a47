//! Seeded migration's part of the protocol (docs/seeding.md): the content hash of a page
//! and the `Held` frame, the destination's list of the pages a seed gave it and their hashes.
use crate::protocol::{malformed, ProtocolError, MAX_FRAME, MAX_GUEST_ADDR, PAGE};

/// Bytes of a page's content hash: BLAKE3's first 16 bytes.
pub const HASH_LEN: usize = 16;
/// One `Held` entry: page address u64, hash.
pub const HELD_ENTRY: usize = 8 + HASH_LEN;
/// Most entries in one `Held` frame.
pub const MAX_HELD: usize = (MAX_FRAME as usize - 4) / HELD_ENTRY;

pub type PageHash = [u8; HASH_LEN];

/// The content hash of a page (BLAKE3, truncated to 128 bits: a cryptographic hash, so a
/// guest cannot make two different pages hash alike and have one taken for the other).
pub fn page_hash(page: &[u8]) -> PageHash {
    let h = blake3::hash(page);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.as_bytes()[..HASH_LEN]);
    out
}

/// `count u32`, then `count` × (`gpa u64`, `hash [u8; 16]`).
pub(crate) fn encode_held(held: &[(u64, PageHash)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + held.len() * HELD_ENTRY);
    b.extend_from_slice(&(held.len() as u32).to_le_bytes());
    for (gpa, h) in held {
        b.extend_from_slice(&gpa.to_le_bytes());
        b.extend_from_slice(h);
    }
    b
}

pub(crate) fn parse_held(p: &[u8]) -> Result<Vec<(u64, PageHash)>, ProtocolError> {
    let bad = |why: String| malformed("Held", why);
    let n = p
        .get(..4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .ok_or_else(|| bad("shorter than its count".into()))?;
    if n > MAX_HELD || p.len() != 4 + n * HELD_ENTRY {
        return Err(bad(format!("{} bytes for {n} entries", p.len())));
    }
    let mut out = Vec::with_capacity(n);
    for e in p[4..].chunks_exact(HELD_ENTRY) {
        let mut g = [0u8; 8];
        g.copy_from_slice(&e[..8]);
        let gpa = u64::from_le_bytes(g);
        if gpa % PAGE as u64 != 0 || gpa >= MAX_GUEST_ADDR {
            return Err(bad(format!("page {gpa:#x}")));
        }
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(&e[8..]);
        out.push((gpa, h));
    }
    Ok(out)
}
