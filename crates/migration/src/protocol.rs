//! Wire protocol (docs/migration-protocol.md): framed messages with explicit lengths, bounded
//! before anything is allocated, and a CRC32C over every payload.
//!
//! Frame header, 16 bytes, little-endian:
//! `kind u8 | reserved [u8; 3] | length u32 | crc32c(payload) u32 | reserved u32`.
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Protocol magic sent in [`Hello`].
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version this code speaks.
pub const VERSION: u32 = 1;
/// Largest payload accepted.
pub const MAX_FRAME: u32 = 16 << 20;
pub const HEADER_LEN: usize = 16;
pub const PAGE: usize = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_BATCH: usize = 256;
/// Bytes each page adds to a `Pages` frame before its body: gpa u64, encoding u8, length u32.
pub const PAGE_HEADER_LEN: usize = 13;

/// True when the page is all zero.
pub fn is_zero_page(p: &[u8]) -> bool {
    p.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && p.chunks_exact(16).remainder().iter().all(|&b| b == 0)
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
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

/// Opening message of the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    /// Capability bits (none defined yet in version 1).
    pub caps: u64,
    /// The VM's configuration, opaque here, so the destination builds an identical VM.
    pub config: Vec<u8>,
}

/// How one page travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    Zero,
    Raw(Vec<u8>),
    /// LZ4 block of a 4 KiB page.
    Lz4(Vec<u8>),
}

const ENC_ZERO: u8 = 0;
const ENC_RAW: u8 = 1;
const ENC_LZ4: u8 = 2;

/// Page encodings the source may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Lz4,
}

impl PageData {
    /// Encodes a page: zero pages as a marker, others raw or compressed (raw when
    /// compression does not pay).
    pub fn encode(page: &[u8], c: Compression) -> PageData {
        if is_zero_page(page) {
            return PageData::Zero;
        }
        if c == Compression::Lz4 {
            let z = lz4_flex::block::compress(page);
            if z.len() < page.len() * 7 / 8 {
                return PageData::Lz4(z);
            }
        }
        PageData::Raw(page.to_vec())
    }

    /// Decodes into `out` (4096 bytes).
    pub fn decode(&self, out: &mut [u8]) -> Result<(), ProtocolError> {
        match self {
            PageData::Zero => out.fill(0),
            PageData::Raw(d) => out.copy_from_slice(d),
            PageData::Lz4(z) => {
                let n =
                    lz4_flex::block::decompress_into(z, out).map_err(|e| malformed("Pages", e))?;
                if n != PAGE {
                    return Err(malformed(
                        "Pages",
                        format!("page decompressed to {n} bytes"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Bytes this encoding puts on the wire for the page body.
    pub fn wire_len(&self) -> usize {
        match self {
            PageData::Zero => 0,
            PageData::Raw(d) | PageData::Lz4(d) => d.len(),
        }
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// Destination accepts the VM (it has built it from the configuration).
    Welcome,
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
}

const K_HELLO: u8 = 1;
const K_WELCOME: u8 = 2;
const K_PAGES: u8 = 3;
const K_STATE: u8 = 4;
const K_READY: u8 = 5;
const K_COMMIT: u8 = 6;
const K_ABORT: u8 = 7;
const K_RESUMED: u8 = 8;

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
        _ => "unknown",
    }
}

impl Message {
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
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
        }
    }
}

fn malformed(what: &'static str, why: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Malformed {
        what,
        why: why.to_string(),
    }
}

/// A `Pages` frame built in place, page by page: the sender's hot path encodes straight into
/// one buffer (no allocation or copy per page).
pub struct PagesBuf {
    buf: Vec<u8>,
    count: u32,
    scratch: Vec<u8>,
}

impl Default for PagesBuf {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(4 + MAX_BATCH * (PAGE_HEADER_LEN + PAGE));
        buf.extend_from_slice(&[0; 4]);
        PagesBuf {
            buf,
            count: 0,
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE)],
        }
    }
}

impl PagesBuf {
    fn put(&mut self, gpa: u64, enc: u8, body: &[u8]) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.push(enc);
        self.buf
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(body);
        self.count += 1;
    }

    /// Adds a page, encoded as [`PageData::encode`] would; returns the bytes it adds to the
    /// frame and whether it went as a zero page.
    pub fn push(&mut self, gpa: u64, page: &[u8], c: Compression) -> (usize, bool) {
        if is_zero_page(page) {
            self.put(gpa, ENC_ZERO, &[]);
            return (PAGE_HEADER_LEN, true);
        }
        if c == Compression::Lz4 {
            if let Ok(n) = lz4_flex::block::compress_into(page, &mut self.scratch) {
                if n < page.len() * 7 / 8 {
                    let z = std::mem::take(&mut self.scratch);
                    self.put(gpa, ENC_LZ4, &z[..n]);
                    self.scratch = z;
                    return (PAGE_HEADER_LEN + n, false);
                }
            }
        }
        self.put(gpa, ENC_RAW, page);
        (PAGE_HEADER_LEN + page.len(), false)
    }

    fn push_encoded(&mut self, gpa: u64, d: &PageData) {
        match d {
            PageData::Zero => self.put(gpa, ENC_ZERO, &[]),
            PageData::Raw(x) => self.put(gpa, ENC_RAW, x),
            PageData::Lz4(x) => self.put(gpa, ENC_LZ4, x),
        }
    }

    /// Pages in the frame so far.
    pub fn pages(&self) -> usize {
        self.count as usize
    }

    /// Sends the frame (if it holds any page) and starts an empty one.
    pub fn send(&mut self, w: &mut impl Write) -> Result<(), ProtocolError> {
        if self.count == 0 {
            return Ok(());
        }
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        send_frame(w, K_PAGES, &self.buf)?;
        self.buf.truncate(4);
        self.count = 0;
        Ok(())
    }
}

fn decode_pages(p: &[u8]) -> Result<Vec<(u64, PageData)>, ProtocolError> {
    let bad = |why: &str| malformed("Pages", why);
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], ProtocolError> {
        let s = p.get(at..at + n).ok_or_else(|| bad("truncated"))?;
        at += n;
        Ok(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("count"))?) as usize;
    if count > MAX_BATCH {
        return Err(bad(&format!(
            "{count} pages in one batch (limit {MAX_BATCH})"
        )));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let gpa = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad("gpa"))?);
        if gpa % PAGE as u64 != 0 {
            return Err(bad(&format!("unaligned page address {gpa:#x}")));
        }
        let enc = take(1)?[0];
        let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("length"))?) as usize;
        if len > PAGE {
            return Err(bad(&format!("page body of {len} bytes")));
        }
        let body = take(len)?.to_vec();
        let d = match (enc, len) {
            (ENC_ZERO, 0) => PageData::Zero,
            (ENC_RAW, PAGE) => PageData::Raw(body),
            (ENC_LZ4, _) => PageData::Lz4(body),
            _ => return Err(bad(&format!("encoding {enc} with {len} bytes"))),
        };
        out.push((gpa, d));
    }
    if at != p.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Writes one message as a frame.
pub fn send(w: &mut impl Write, m: &Message) -> Result<(), ProtocolError> {
    let enc = |e: postcard::Error| malformed("outgoing", e);
    let hello;
    let payload: &[u8] = match m {
        Message::Hello(h) => {
            hello = postcard::to_stdvec(h).map_err(enc)?;
            &hello
        }
        Message::Pages(p) => {
            let mut b = PagesBuf::default();
            for (gpa, d) in p {
                b.push_encoded(*gpa, d);
            }
            b.buf[..4].copy_from_slice(&b.count.to_le_bytes());
            return send_frame(w, K_PAGES, &b.buf);
        }
        Message::State(s) => s,
        Message::Abort(t) => t.as_bytes(),
        Message::Welcome | Message::Ready | Message::Commit | Message::Resumed => &[],
    };
    send_frame(w, m.kind(), payload)
}

fn send_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.len() > MAX_FRAME as usize {
        return Err(ProtocolError::Oversized(payload.len() as u32));
    }
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    w.write_all(&h)?;
    w.write_all(payload)?;
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

/// Reads one frame: the length is bounded before allocating, the CRC checked before decoding.
pub fn recv(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut h) {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
            _ => e.into(),
        });
    }
    let kind = h[0];
    let name = kind_name(kind);
    if name == "unknown" {
        return Err(ProtocolError::UnknownKind(kind));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized(len));
    }
    let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => e.into(),
    })?;
    if crc32c::crc32c(&p) != crc {
        return Err(ProtocolError::Crc(name));
    }
    let empty = |m: Message| {
        if p.is_empty() {
            Ok(m)
        } else {
            Err(malformed(name, "unexpected payload"))
        }
    };
    match kind {
        K_HELLO => {
            let h: Hello = postcard::from_bytes(&p).map_err(|e| malformed("Hello", e))?;
            Ok(Message::Hello(h))
        }
        K_WELCOME => empty(Message::Welcome),
        K_PAGES => Ok(Message::Pages(decode_pages(&p)?)),
        K_STATE => Ok(Message::State(p)),
        K_READY => empty(Message::Ready),
        K_COMMIT => empty(Message::Commit),
        K_ABORT => Ok(Message::Abort(String::from_utf8_lossy(&p).into_owned())),
        K_RESUMED => empty(Message::Resumed),
        k => Err(ProtocolError::UnknownKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            config: vec![1, 2, 3],
        }));
        roundtrip(Message::Welcome);
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
        ];
        assert!(matches!(pages[0].1, PageData::Zero));
        assert!(matches!(pages[1].1, PageData::Lz4(_)));
        assert!(
            matches!(pages[2].1, PageData::Raw(_)),
            "incompressible pages go raw"
        );
        let mut out = vec![0u8; PAGE];
        pages[1].1.decode(&mut out).unwrap();
        assert_eq!(out, page);
        roundtrip(Message::Pages(pages));
        roundtrip(Message::State(vec![9; 100_000]));
        roundtrip(Message::Ready);
        roundtrip(Message::Commit);
        roundtrip(Message::Abort("disk full".into()));
        roundtrip(Message::Resumed);
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
        let mut f = vec![K_PAGES, 0, 0, 0];
        f.extend_from_slice(&(p.len() as u32).to_le_bytes());
        f.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&p);
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtocolError::Malformed { what: "Pages", .. })
        ));
    }
}
