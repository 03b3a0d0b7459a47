//! Wire protocol (docs/migration-protocol.md): framed messages with explicit lengths, bounded
//! before anything is allocated, and a CRC32C over every payload.
//!
//! Frame header, 16 bytes, little-endian:
//! `kind u8 | reserved [u8; 3] | length u32 | crc32c(payload) u32 | reserved u32`.
pub use crate::pages::{for_each_page, is_zero_page, Compression, PageData, PageRef, PagesBuf};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Protocol magic sent in [`Hello`].
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version this code speaks.
pub const VERSION: u32 = 4;
/// [`Hello::caps`] bit: this connection reopens the interrupted post-copy of `session`.
pub const CAP_RESUME: u64 = 1;
/// `Hello.caps`: the VM's disks come too (shared-nothing migration): `Disks` follows
/// `Welcome`, and one more connection (`Join` index = `connections`) carries their data.
pub const CAP_STORAGE: u64 = 2;
/// `Hello.caps`: a seeded migration: the destination answers `Welcome` with the pages its
/// seed gave it (`Held` frames, the last one empty), and pass 1 skips those that match.
pub const CAP_SEEDED: u64 = 4;
/// Highest guest page address (exclusive) a page list may name: 1 TiB.
pub const MAX_GUEST_ADDR: u64 = 1 << 40;
/// Most data connections one migration may use.
pub const MAX_CONNECTIONS: u32 = 64;
/// Largest payload accepted.
pub const MAX_FRAME: u32 = 16 << 20;
pub const HEADER_LEN: usize = 16;
pub const PAGE: usize = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_BATCH: usize = 256;
/// Bytes each page adds to a `Pages` frame before its body: gpa u64, encoding u8, length u32.
pub const PAGE_HEADER_LEN: usize = 13;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Not a `source`: the text is in the message once (error chains printed it twice).
    #[error("connection: {0}")]
    Io(std::io::Error),
    #[error("the peer made no progress within the I/O timeout (it stopped reading or sending without closing the connection)")]
    Stalled,
    /// A TLS record failed its check (altered on the way) or broke the protocol.
    #[error("{0}")]
    Tls(String),
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(u32),
    #[error("CRC mismatch in a {0} frame (corrupted stream)")]
    Crc(&'static str),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("not a Ferry migration stream (bad magic)")]
    BadMagic,
    #[error("peer speaks migration protocol version {peer}, this Ferry speaks {VERSION}")]
    Version { peer: u32 },
    #[error("unexpected {got} frame while waiting for {want}")]
    Unexpected {
        got: &'static str,
        want: &'static str,
    },
    #[error("the peer reported an error: {0}")]
    Peer(String),
}

impl ProtocolError {
    /// The connection ended, failed or went silent: nothing wrong was found in the stream
    /// itself (the cause is probably told on another connection).
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            ProtocolError::Io(_) | ProtocolError::Closed | ProtocolError::Stalled
        )
    }
}

impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            // What a socket timeout (SO_RCVTIMEO / SO_SNDTIMEO) reports.
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ProtocolError::Stalled,
            std::io::ErrorKind::InvalidData if e.to_string().starts_with("TLS:") => {
                ProtocolError::Tls(e.to_string())
            }
            _ => ProtocolError::Io(e),
        }
    }
}

/// Opening message of the source (on the control connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    /// Capability bits: [`CAP_RESUME`].
    pub caps: u64,
    /// Names this migration: every data connection repeats it in its `Join`.
    pub session: u64,
    /// Data connections that follow (1..=[`MAX_CONNECTIONS`]).
    pub connections: u32,
    /// The VM's configuration, opaque here, so the destination builds an identical VM.
    pub config: Vec<u8>,
}

/// The fields every version starts its `Hello` with, read first so that a peer of another
/// version gets a clear error rather than a decoding failure.
#[derive(Deserialize)]
struct HelloHead {
    magic: [u8; 8],
    version: u32,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// Destination accepts the VM (it has built it from the configuration).
    Welcome,
    /// First frame on each data connection: which migration and which connection it is.
    Join {
        session: u64,
        index: u32,
    },
    /// The source's populated memory as (first page address, page count) runs, sent before
    /// pass 1 so the destination can map it ahead of the pages (a hint).
    Populated(Vec<(u64, u64)>),
    /// On each data connection after its share of a pass; `last` ends the final pass (sent
    /// with the VM paused), after which the connection carries nothing more.
    EndOfPass {
        pass: u32,
        last: bool,
    },
    Pages(Vec<(u64, PageData)>),
    /// The source has paused the VM and sent every page: the VM's device and vCPU state.
    State(Vec<u8>),
    /// Destination has loaded everything and can resume.
    Ready,
    /// Source commits: the destination resumes, the source will stop.
    Commit,
    /// Destination confirms the VM runs there.
    Resumed,
    /// Either side gives up; the text says why.
    Abort(String),
    /// Pages the destination does not hold, as (first page, page count) runs. From the source
    /// at a post-copy switch-over (before `State`: these are fetched after the VM resumes);
    /// from the destination when a post-copy reconnects (before `Welcome`: what is still
    /// missing). Long lists take several frames.
    Missing(Vec<(u64, u64)>),
    /// Post-copy, source to destination before the pause: pages post-copy will fetch (dirty
    /// after the last pass): drop them now, while the VM still runs at the source, so the
    /// switch-over does not wait for it. Answered by `Discarded`, one per frame.
    Discard(Vec<(u64, u64)>),
    Discarded,
    /// Post-copy, destination to source on the control connection: pages a vCPU waits for.
    Demand(Vec<u64>),
    /// Post-copy, destination to source: every page is in; the source is released.
    PostCopyDone(PostCopyFigures),
    /// After `Welcome` when the disks come too: the disks the destination is to create.
    Disks(Vec<crate::disk_wire::DiskSpec>),
    /// The destination has created every disk (empty) and takes their data.
    DisksReady,
    /// Seeded migration, destination to source after `Welcome`: pages the seed gave the
    /// destination and their content hashes; an empty one ends the list.
    Held(Vec<(u64, crate::seed::PageHash)>),
    /// Seeded migration, destination to source right after `Welcome`: the snapshot id of the
    /// seed it loaded whole (0: none, or one with parts left out).
    SeedId(u64),
    /// The source's answer: true, it knows what changed since that seed from its own dirty
    /// log (no hashes needed); false, send `Held`.
    SeedUse(bool),
}

/// What the destination measured during post-copy, sent with [`Message::PostCopyDone`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCopyFigures {
    /// Faults on pages still at the source (each page counted once).
    pub faults: u64,
    /// Faults on pages the source never had (filled with zeros locally).
    pub zero_faults: u64,
    /// Pages installed from the source's answers to demand requests.
    pub pulled: u64,
    /// Pages installed from the background push.
    pub pushed: u64,
    /// Time from a fault to its page being installed, microseconds.
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
}

const K_HELLO: u8 = 1;
const K_WELCOME: u8 = 2;
pub(crate) const K_PAGES: u8 = 3;
const K_STATE: u8 = 4;
const K_READY: u8 = 5;
const K_COMMIT: u8 = 6;
const K_ABORT: u8 = 7;
const K_RESUMED: u8 = 8;
const K_JOIN: u8 = 9;
const K_END_OF_PASS: u8 = 10;
const K_POPULATED: u8 = 11;
const K_MISSING: u8 = 12;
const K_DEMAND: u8 = 13;
const K_POSTCOPY_DONE: u8 = 14;
const K_DISCARD: u8 = 15;
const K_DISCARDED: u8 = 16;
const K_DISKS: u8 = 17;
const K_DISKS_READY: u8 = 18;
const K_HELD: u8 = 22;
const K_SEED_ID: u8 = 23;
const K_SEED_USE: u8 = 24;
pub(crate) use crate::disk_wire::{K_DISK_DATA, K_DISK_SYNC, K_DISK_ZERO};
/// Most runs in one `Populated` frame.
pub const MAX_RANGES: usize = (MAX_FRAME as usize - 4) / 16;
/// `Pages` frame kind, for receivers that walk page frames in place ([`recv_raw`]).
pub const KIND_PAGES: u8 = K_PAGES;
/// `Abort` frame kind, for a peek at what waits on a connection.
pub const KIND_ABORT: u8 = K_ABORT;

pub fn kind_name(k: u8) -> &'static str {
    match k {
        K_HELLO => "Hello",
        K_WELCOME => "Welcome",
        K_PAGES => "Pages",
        K_STATE => "State",
        K_READY => "Ready",
        K_COMMIT => "Commit",
        K_ABORT => "Abort",
        K_RESUMED => "Resumed",
        K_JOIN => "Join",
        K_END_OF_PASS => "EndOfPass",
        K_POPULATED => "Populated",
        K_MISSING => "Missing",
        K_DEMAND => "Demand",
        K_POSTCOPY_DONE => "PostCopyDone",
        K_DISCARD => "Discard",
        K_DISCARDED => "Discarded",
        K_DISKS => "Disks",
        K_DISKS_READY => "DisksReady",
        K_HELD => "Held",
        K_SEED_ID => "SeedId",
        K_SEED_USE => "SeedUse",
        K_DISK_DATA => "DiskData",
        K_DISK_ZERO => "DiskZero",
        K_DISK_SYNC => "DiskSync",
        _ => "unknown",
    }
}

impl Message {
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// The error for this message arriving where `want` was expected.
    pub fn unexpected(&self, want: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            got: self.name(),
            want,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => K_HELLO,
            Message::Welcome => K_WELCOME,
            Message::Pages(_) => K_PAGES,
            Message::State(_) => K_STATE,
            Message::Ready => K_READY,
            Message::Commit => K_COMMIT,
            Message::Abort(_) => K_ABORT,
            Message::Resumed => K_RESUMED,
            Message::Join { .. } => K_JOIN,
            Message::EndOfPass { .. } => K_END_OF_PASS,
            Message::Populated(_) => K_POPULATED,
            Message::Missing(_) => K_MISSING,
            Message::Demand(_) => K_DEMAND,
            Message::PostCopyDone(_) => K_POSTCOPY_DONE,
            Message::Discard(_) => K_DISCARD,
            Message::Discarded => K_DISCARDED,
            Message::Disks(_) => K_DISKS,
            Message::DisksReady => K_DISKS_READY,
            Message::Held(_) => K_HELD,
            Message::SeedId(_) => K_SEED_ID,
            Message::SeedUse(_) => K_SEED_USE,
        }
    }
}

pub(crate) fn malformed(what: &'static str, why: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Malformed {
        what,
        why: why.to_string(),
    }
}

/// Writes one message as a frame.
pub fn send(w: &mut impl Write, m: &Message) -> Result<(), ProtocolError> {
    let enc = |e: postcard::Error| malformed("outgoing", e);
    let owned;
    let payload: &[u8] = match m {
        Message::Hello(h) => {
            owned = postcard::to_stdvec(h).map_err(enc)?;
            &owned
        }
        Message::Pages(p) => {
            let mut b = PagesBuf::default();
            for (gpa, d) in p {
                b.push_encoded(*gpa, d);
            }
            return send_frame(w, K_PAGES, b.payload());
        }
        Message::Join { session, index } => {
            owned = [&session.to_le_bytes()[..], &index.to_le_bytes()].concat();
            &owned
        }
        Message::EndOfPass { pass, last } => {
            owned = [&pass.to_le_bytes()[..], &[*last as u8]].concat();
            &owned
        }
        Message::Populated(r) | Message::Missing(r) | Message::Discard(r) => {
            let mut b = Vec::with_capacity(4 + r.len() * 16);
            b.extend_from_slice(&(r.len() as u32).to_le_bytes());
            for (gpa, pages) in r {
                b.extend_from_slice(&gpa.to_le_bytes());
                b.extend_from_slice(&pages.to_le_bytes());
            }
            owned = b;
            &owned
        }
        Message::Demand(g) => {
            let mut b = Vec::with_capacity(4 + g.len() * 8);
            b.extend_from_slice(&(g.len() as u32).to_le_bytes());
            for gpa in g {
                b.extend_from_slice(&gpa.to_le_bytes());
            }
            owned = b;
            &owned
        }
        Message::PostCopyDone(f) => {
            owned = postcard::to_stdvec(f).map_err(enc)?;
            &owned
        }
        Message::Disks(d) => {
            owned = postcard::to_stdvec(d).map_err(enc)?;
            &owned
        }
        Message::Held(h) => {
            owned = crate::seed::encode_held(h);
            &owned
        }
        Message::SeedId(id) => {
            owned = id.to_le_bytes().to_vec();
            &owned
        }
        Message::SeedUse(d) => {
            owned = vec![*d as u8];
            &owned
        }
        Message::State(s) => s,
        Message::Abort(t) => t.as_bytes(),
        Message::Welcome
        | Message::Ready
        | Message::Commit
        | Message::Resumed
        | Message::Discarded
        | Message::DisksReady => &[],
    };
    send_frame(w, m.kind(), payload)
}

pub(crate) fn send_frame(
    w: &mut impl Write,
    kind: u8,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    send_frame_parts(w, kind, &[payload])
}

/// As [`send_frame`], the payload given in pieces (sent as they are, without gathering them
/// into one buffer first).
pub(crate) fn send_frame_parts(
    w: &mut impl Write,
    kind: u8,
    parts: &[&[u8]],
) -> Result<(), ProtocolError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_FRAME as usize {
        return Err(ProtocolError::Oversized(len as u32));
    }
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = parts
        .iter()
        .fold(crc32c::crc32c(&h[..8]), |c, p| crc32c::crc32c_append(c, p));
    h[8..12].copy_from_slice(&crc.to_le_bytes());
    w.write_all(&h)?;
    for p in parts {
        w.write_all(p)?;
    }
    w.flush()?; // under TLS: seals the last partial record
    Ok(())
}

/// Reads the next frame and requires it to be `want` (a payload-less message); the peer's
/// Abort becomes its reason.
pub fn expect(r: &mut impl Read, want: Message) -> Result<(), ProtocolError> {
    match recv(r)? {
        m if m == want => Ok(()),
        Message::Abort(why) => Err(ProtocolError::Peer(why)),
        m => Err(ProtocolError::Unexpected {
            got: m.name(),
            want: want.name(),
        }),
    }
}

fn eof_is_closed(e: std::io::Error) -> ProtocolError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => e.into(),
    }
}

/// Reads one frame into `payload` (reused between calls) and returns its kind: the length is
/// bounded before allocating, the CRC checked before anything looks at the payload.
pub fn recv_raw(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<u8, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(eof_is_closed)?;
    let kind = h[0];
    let name = kind_name(kind);
    if name == "unknown" {
        return Err(ProtocolError::UnknownKind(kind));
    }
    if h[1..4] != [0; 3] || h[12..16] != [0; 4] {
        return Err(malformed(name, "reserved header bytes are not zero"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized(len));
    }
    let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    payload.resize(len as usize, 0);
    r.read_exact(payload).map_err(eof_is_closed)?;
    if frame_crc(&h, payload) != crc {
        // Versions 1 to 3 covered the payload only: let their Hello through, so that the
        // peer hears which version it met rather than of a CRC error.
        let older_hello = kind == K_HELLO && crc32c::crc32c(payload) == crc;
        if !older_hello {
            return Err(ProtocolError::Crc(name));
        }
    }
    Ok(kind)
}

/// A frame's CRC32C: over the header's kind, reserved and length bytes (0..8), then the
/// payload, so a flipped kind cannot turn one well-formed message into another.
pub fn frame_crc(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..8]), payload)
}

/// Reads one frame as a [`Message`].
pub fn recv(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut p = Vec::new();
    let kind = recv_raw(r, &mut p)?;
    parse(kind, p)
}

/// Decodes a frame read by [`recv_raw`]. A `Hello` of another magic or version is refused
/// here, before its version-specific fields are decoded.
pub fn parse(kind: u8, p: Vec<u8>) -> Result<Message, ProtocolError> {
    let name = kind_name(kind);
    let empty = |m: Message| {
        if p.is_empty() {
            Ok(m)
        } else {
            Err(malformed(name, "unexpected payload"))
        }
    };
    let fixed = |n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err(malformed(name, format!("{} bytes, expected {n}", p.len())))
        }
    };
    let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    match kind {
        K_HELLO => {
            let (head, _) =
                postcard::take_from_bytes::<HelloHead>(&p).map_err(|e| malformed("Hello", e))?;
            if head.magic != MAGIC {
                return Err(ProtocolError::BadMagic);
            }
            if head.version != VERSION {
                return Err(ProtocolError::Version { peer: head.version });
            }
            let h: Hello = postcard::from_bytes(&p).map_err(|e| malformed("Hello", e))?;
            Ok(Message::Hello(h))
        }
        K_WELCOME => empty(Message::Welcome),
        K_PAGES => {
            let mut pages = Vec::new();
            for_each_page(&p, |gpa, d| {
                pages.push((gpa, d.into()));
                Ok::<(), ProtocolError>(())
            })?;
            Ok(Message::Pages(pages))
        }
        K_JOIN => {
            fixed(12)?;
            let session = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
            Ok(Message::Join {
                session,
                index: u32_at(8),
            })
        }
        K_END_OF_PASS => {
            fixed(5)?;
            Ok(Message::EndOfPass {
                pass: u32_at(0),
                last: match p[4] {
                    0 => false,
                    1 => true,
                    b => return Err(malformed(name, format!("last flag {b}"))),
                },
            })
        }
        K_POPULATED | K_MISSING | K_DISCARD => {
            let n = if p.len() >= 4 { u32_at(0) as usize } else { 0 };
            fixed(4 + n * 16)?;
            let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or_default());
            let mut r = Vec::with_capacity(n);
            for k in 0..n {
                let (gpa, pages) = (u64_at(4 + k * 16), u64_at(12 + k * 16));
                let bad = gpa % PAGE as u64 != 0
                    || pages == 0
                    || pages > MAX_GUEST_ADDR / PAGE as u64
                    || gpa
                        .checked_add(pages * PAGE as u64)
                        .is_none_or(|end| end > MAX_GUEST_ADDR);
                if bad {
                    return Err(malformed(name, format!("run {gpa:#x} + {pages} pages")));
                }
                r.push((gpa, pages));
            }
            Ok(match kind {
                K_MISSING => Message::Missing(r),
                K_DISCARD => Message::Discard(r),
                _ => Message::Populated(r),
            })
        }
        K_DEMAND => {
            let n = if p.len() >= 4 { u32_at(0) as usize } else { 0 };
            fixed(4 + n * 8)?;
            let mut g = Vec::with_capacity(n);
            for k in 0..n {
                let gpa =
                    u64::from_le_bytes(p[4 + k * 8..12 + k * 8].try_into().unwrap_or_default());
                if gpa % PAGE as u64 != 0 || gpa >= MAX_GUEST_ADDR {
                    return Err(malformed(name, format!("page {gpa:#x}")));
                }
                g.push(gpa);
            }
            Ok(Message::Demand(g))
        }
        K_POSTCOPY_DONE => Ok(Message::PostCopyDone(
            postcard::from_bytes(&p).map_err(|e| malformed(name, e))?,
        )),
        K_STATE => Ok(Message::State(p)),
        K_READY => empty(Message::Ready),
        K_COMMIT => empty(Message::Commit),
        K_ABORT => Ok(Message::Abort(String::from_utf8_lossy(&p).into_owned())),
        K_RESUMED => empty(Message::Resumed),
        K_DISCARDED => empty(Message::Discarded),
        K_DISKS => {
            let d: Vec<crate::disk_wire::DiskSpec> =
                postcard::from_bytes(&p).map_err(|e| malformed(name, e))?;
            if d.len() > crate::disk_wire::MAX_DISKS {
                return Err(malformed(name, format!("{} disks", d.len())));
            }
            Ok(Message::Disks(d))
        }
        K_DISKS_READY => empty(Message::DisksReady),
        K_HELD => Ok(Message::Held(crate::seed::parse_held(&p)?)),
        K_SEED_ID => {
            fixed(8)?;
            Ok(Message::SeedId(u64::from_le_bytes(
                p[..8].try_into().unwrap_or_default(),
            )))
        }
        K_SEED_USE => {
            fixed(1)?;
            match p[0] {
                0 => Ok(Message::SeedUse(false)),
                1 => Ok(Message::SeedUse(true)),
                b => Err(malformed(name, format!("flag {b}"))),
            }
        }
        K_DISK_DATA | K_DISK_ZERO | K_DISK_SYNC => {
            Err(malformed(name, "belongs on the storage connection only"))
        }
        k => Err(ProtocolError::UnknownKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::ENC_ZERO;

    fn roundtrip(m: Message) {
        let mut b = Vec::new();
        send(&mut b, &m).unwrap();
        assert_eq!(recv(&mut b.as_slice()).unwrap(), m);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps: 0,
            session: 42,
            connections: 4,
            config: vec![1, 2, 3],
        }));
        roundtrip(Message::Welcome);
        roundtrip(Message::Join {
            session: u64::MAX,
            index: 3,
        });
        roundtrip(Message::EndOfPass {
            pass: 7,
            last: true,
        });
        roundtrip(Message::Populated(vec![(0, 160), (1 << 20, 3)]));
        roundtrip(Message::Populated(vec![]));
        roundtrip(Message::Missing(vec![(4096, 7), (1 << 30, 1)]));
        roundtrip(Message::Demand(vec![0, 8192, (1 << 39) - 4096]));
        roundtrip(Message::Discard(vec![(8192, 3)]));
        roundtrip(Message::Discarded);
        roundtrip(Message::PostCopyDone(PostCopyFigures {
            faults: 3,
            pulled: 2,
            pushed: 100,
            latency_p99_us: 250,
            ..Default::default()
        }));
        roundtrip(Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps: CAP_RESUME,
            session: 7,
            connections: 1,
            config: vec![],
        }));
        let page: Vec<u8> = (0..PAGE).map(|i| (i / 64) as u8).collect();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let pages = vec![
            (0, PageData::encode(&[0; PAGE], Compression::Lz4)),
            (4096, PageData::encode(&page, Compression::Lz4)),
            (8192, PageData::encode(&random, Compression::Lz4)),
            (1 << 32, PageData::encode(&page, Compression::None)),
            (1 << 33, PageData::encode(&page, Compression::Zstd)),
        ];
        assert!(matches!(pages[0].1, PageData::Zero));
        assert!(matches!(pages[1].1, PageData::Lz4(_)));
        assert!(
            matches!(pages[2].1, PageData::Raw(_)),
            "incompressible pages go raw"
        );
        assert!(matches!(
            PageData::encode(&random, Compression::Zstd),
            PageData::Raw(_)
        ));
        let mut out = vec![0u8; PAGE];
        pages[1].1.decode(&mut out).unwrap();
        assert_eq!(out, page);
        assert!(matches!(pages[4].1, PageData::Zstd(_)));
        pages[4].1.decode(&mut out).unwrap();
        assert_eq!(out, page);
        roundtrip(Message::Pages(pages));
        roundtrip(Message::State(vec![9; 100_000]));
        roundtrip(Message::Ready);
        roundtrip(Message::Commit);
        roundtrip(Message::Abort("disk full".into()));
        roundtrip(Message::Resumed);
    }

    #[test]
    fn a_hello_of_another_version_is_named_as_such() {
        #[derive(Serialize)]
        struct V1 {
            magic: [u8; 8],
            version: u32,
            caps: u64,
            config: Vec<u8>,
        }
        let p = postcard::to_stdvec(&V1 {
            magic: MAGIC,
            version: 1,
            caps: 0,
            config: vec![1],
        })
        .unwrap();
        let mut b = Vec::new();
        send_frame(&mut b, K_HELLO, &p).unwrap();
        assert!(matches!(
            recv(&mut b.as_slice()),
            Err(ProtocolError::Version { peer: 1 })
        ));
        // Framed as versions 1–3 framed it (the CRC over the payload only): still named.
        let mut old = b.clone();
        old[8..12].copy_from_slice(&crc32c::crc32c(&p).to_le_bytes());
        assert!(matches!(
            recv(&mut old.as_slice()),
            Err(ProtocolError::Version { peer: 1 })
        ));
        // Any other kind framed that way is a CRC error.
        let mut w = Vec::new();
        send_frame(&mut w, K_WELCOME, &[]).unwrap();
        w[8..12].copy_from_slice(&crc32c::crc32c(&[]).to_le_bytes());
        assert!(matches!(
            recv(&mut w.as_slice()),
            Err(ProtocolError::Crc(_))
        ));
        let e = ProtocolError::Version { peer: 1 }.to_string();
        assert!(
            e.contains("version 1") && e.contains(&format!("speaks {VERSION}")),
            "{e}"
        );
        let mut bad = Vec::new();
        let p = postcard::to_stdvec(&V1 {
            magic: *b"NOTFERRY",
            version: 2,
            caps: 0,
            config: vec![],
        })
        .unwrap();
        send_frame(&mut bad, K_HELLO, &p).unwrap();
        assert!(matches!(
            recv(&mut bad.as_slice()),
            Err(ProtocolError::BadMagic)
        ));
    }

    #[test]
    fn a_run_past_the_end_of_the_address_space_is_refused_not_wrapped() {
        // Found by afl: gpa + pages overflowed (a panic with overflow checks, a wrapped sum
        // that passed the check without them).
        for kind in [K_POPULATED, K_MISSING, K_DISCARD] {
            let mut p = 1u32.to_le_bytes().to_vec();
            p.extend((!(PAGE as u64 - 1)).to_le_bytes());
            p.extend(16u64.to_le_bytes());
            let e = parse(kind, p).unwrap_err().to_string();
            assert!(e.contains("run 0xfffffffffffff000"), "{e}");
        }
    }

    #[test]
    fn damaged_frames_are_refused() {
        let mut b = Vec::new();
        send(&mut b, &Message::State(vec![7; 1000])).unwrap();
        let mut flipped = b.clone();
        flipped[HEADER_LEN + 500] ^= 1;
        assert!(matches!(
            recv(&mut flipped.as_slice()),
            Err(ProtocolError::Crc("State"))
        ));
        assert!(matches!(
            recv(&mut &b[..b.len() - 1]),
            Err(ProtocolError::Closed)
        ));
        let mut huge = b.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            recv(&mut huge.as_slice()),
            Err(ProtocolError::Oversized(_))
        ));
        let mut kind = b.clone();
        kind[0] = 99;
        assert!(matches!(
            recv(&mut kind.as_slice()),
            Err(ProtocolError::UnknownKind(99))
        ));
        // A Pages frame whose count lies about its contents, with a valid CRC.
        let mut p = Vec::new();
        p.extend_from_slice(&3u32.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.push(ENC_ZERO);
        p.extend_from_slice(&0u32.to_le_bytes());
        let mut h = [0u8; HEADER_LEN];
        h[0] = K_PAGES;
        h[4..8].copy_from_slice(&(p.len() as u32).to_le_bytes());
        let crc = frame_crc(&h, &p);
        h[8..12].copy_from_slice(&crc.to_le_bytes());
        let mut f = h.to_vec();
        f.extend_from_slice(&p);
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtocolError::Malformed { what: "Pages", .. })
        ));
    }
}
