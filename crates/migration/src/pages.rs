//! Pages on the wire: the per-page encodings (zero, raw, LZ4, zstd), the `Pages` frame the
//! sender builds in place, and the receiver's in-place walk over one.
use crate::protocol::{
    malformed, send_frame, ProtocolError, HEADER_LEN, K_PAGES, MAX_BATCH, PAGE, PAGE_HEADER_LEN,
};
use serde::{Deserialize, Serialize};
use std::io::Write;

/// True when the page is all zero.
pub fn is_zero_page(p: &[u8]) -> bool {
    p.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && p.chunks_exact(16).remainder().iter().all(|&b| b == 0)
}

/// How one page travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    Zero,
    Raw(Vec<u8>),
    /// LZ4 block of a 4 KiB page.
    Lz4(Vec<u8>),
    /// zstd frame of a 4 KiB page.
    Zstd(Vec<u8>),
}

pub(crate) const ENC_ZERO: u8 = 0;
const ENC_RAW: u8 = 1;
const ENC_LZ4: u8 = 2;
const ENC_ZSTD: u8 = 3;
/// zstd level used for pages: the fastest (pages are small; the link is the limit).
const ZSTD_LEVEL: i32 = 1;

/// Page encodings the source may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Lz4,
    Zstd,
}

/// A page borrowed from a received `Pages` frame (no copy).
#[derive(Debug, Clone, Copy)]
pub enum PageRef<'a> {
    Zero,
    Raw(&'a [u8]),
    Lz4(&'a [u8]),
    Zstd(&'a [u8]),
}

thread_local! {
    static ZSTD_IN: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

impl PageRef<'_> {
    /// Decodes into `out` (4096 bytes); a compressed page must expand to exactly one page.
    pub fn decode(&self, out: &mut [u8]) -> Result<(), ProtocolError> {
        let n = match *self {
            PageRef::Zero => {
                out.fill(0);
                return Ok(());
            }
            PageRef::Raw(d) => {
                out.copy_from_slice(d);
                return Ok(());
            }
            PageRef::Lz4(z) => {
                lz4_flex::block::decompress_into(z, out).map_err(|e| malformed("Pages", e))?
            }
            PageRef::Zstd(z) => ZSTD_IN.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new().map_err(|e| malformed("Pages", e))?);
                }
                match d.as_mut() {
                    Some(d) => d
                        .decompress_to_buffer(z, out)
                        .map_err(|e| malformed("Pages", e)),
                    None => Err(malformed("Pages", "no zstd context")),
                }
            })?,
        };
        if n != PAGE {
            return Err(malformed(
                "Pages",
                format!("page decompressed to {n} bytes"),
            ));
        }
        Ok(())
    }
}

impl PageData {
    /// Encodes a page: zero pages as a marker, others raw or compressed (raw when
    /// compression does not pay).
    pub fn encode(page: &[u8], c: Compression) -> PageData {
        let mut b = PagesBuf::default();
        b.push(0, page, c);
        let mut out = None;
        for_each_page(b.payload(), |_, p| {
            out = Some(p.into());
            Ok::<(), ProtocolError>(())
        })
        .ok();
        out.unwrap_or(PageData::Zero)
    }

    pub fn as_ref(&self) -> PageRef<'_> {
        match self {
            PageData::Zero => PageRef::Zero,
            PageData::Raw(d) => PageRef::Raw(d),
            PageData::Lz4(d) => PageRef::Lz4(d),
            PageData::Zstd(d) => PageRef::Zstd(d),
        }
    }

    /// Decodes into `out` (4096 bytes).
    pub fn decode(&self, out: &mut [u8]) -> Result<(), ProtocolError> {
        self.as_ref().decode(out)
    }

    /// Bytes this encoding puts on the wire for the page body.
    pub fn wire_len(&self) -> usize {
        match self {
            PageData::Zero => 0,
            PageData::Raw(d) | PageData::Lz4(d) | PageData::Zstd(d) => d.len(),
        }
    }
}

impl From<PageRef<'_>> for PageData {
    fn from(p: PageRef<'_>) -> Self {
        match p {
            PageRef::Zero => PageData::Zero,
            PageRef::Raw(d) => PageData::Raw(d.to_vec()),
            PageRef::Lz4(d) => PageData::Lz4(d.to_vec()),
            PageRef::Zstd(d) => PageData::Zstd(d.to_vec()),
        }
    }
}

/// A `Pages` frame built in place, page by page: the sender's hot path reads each page from
/// guest memory straight into the frame and encodes it there (no allocation, one copy).
pub struct PagesBuf {
    /// Always the largest frame's size; `used` bytes of it are the frame so far.
    buf: Vec<u8>,
    used: usize,
    count: u32,
    scratch: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

const PAGES_FRAME_MAX: usize = 4 + MAX_BATCH * (PAGE_HEADER_LEN + PAGE);

impl Default for PagesBuf {
    fn default() -> Self {
        PagesBuf {
            buf: vec![0; PAGES_FRAME_MAX],
            used: 4,
            count: 0,
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE).max(PAGE + 64)],
            zstd: None,
        }
    }
}

impl PagesBuf {
    /// Writes a page header at the cursor; the body (len bytes) must follow it.
    fn header(&mut self, gpa: u64, enc: u8, len: usize) {
        let h = &mut self.buf[self.used..self.used + PAGE_HEADER_LEN];
        h[..8].copy_from_slice(&gpa.to_le_bytes());
        h[8] = enc;
        h[9..13].copy_from_slice(&(len as u32).to_le_bytes());
    }

    fn put(&mut self, gpa: u64, enc: u8, body: &[u8]) {
        self.header(gpa, enc, body.len());
        let at = self.used + PAGE_HEADER_LEN;
        self.buf[at..at + body.len()].copy_from_slice(body);
        self.used = at + body.len();
        self.count += 1;
    }

    /// Compresses `page` into `scratch`; the compressed length when it saves at least 1/8.
    fn compress(
        scratch: &mut [u8],
        zstd: &mut Option<zstd::bulk::Compressor<'static>>,
        page: &[u8],
        c: Compression,
    ) -> Option<usize> {
        let n = match c {
            Compression::None => return None,
            Compression::Lz4 => lz4_flex::block::compress_into(page, scratch).ok()?,
            Compression::Zstd => {
                if zstd.is_none() {
                    *zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
                }
                zstd.as_mut()?.compress_to_buffer(page, scratch).ok()?
            }
        };
        (n < page.len() * 7 / 8).then_some(n)
    }

    /// Adds the page at `gpa`, which `read` copies into the frame: zero pages go as a marker,
    /// others compressed with `c` when that saves at least an eighth, raw otherwise. Returns
    /// the bytes it adds to the frame and whether it went as a zero page. The frame must have
    /// room (fewer than [`MAX_BATCH`] pages).
    pub fn push_with<E>(
        &mut self,
        gpa: u64,
        c: Compression,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(usize, bool), E> {
        let body = self.used + PAGE_HEADER_LEN;
        read(&mut self.buf[body..body + PAGE])?;
        let page = &self.buf[body..body + PAGE];
        let (enc, len) = if is_zero_page(page) {
            (ENC_ZERO, 0)
        } else if let Some(n) = Self::compress(&mut self.scratch, &mut self.zstd, page, c) {
            self.buf[body..body + n].copy_from_slice(&self.scratch[..n]);
            (
                if c == Compression::Lz4 {
                    ENC_LZ4
                } else {
                    ENC_ZSTD
                },
                n,
            )
        } else {
            (ENC_RAW, PAGE)
        };
        self.header(gpa, enc, len);
        self.used = body + len;
        self.count += 1;
        Ok((PAGE_HEADER_LEN + len, enc == ENC_ZERO))
    }

    /// [`PagesBuf::push_with`] for a page already in memory.
    pub fn push(&mut self, gpa: u64, page: &[u8], c: Compression) -> (usize, bool) {
        self.push_with(gpa, c, |b| {
            b.copy_from_slice(page);
            Ok::<(), ()>(())
        })
        .unwrap_or_default()
    }

    pub(crate) fn push_encoded(&mut self, gpa: u64, d: &PageData) {
        match d {
            PageData::Zero => self.put(gpa, ENC_ZERO, &[]),
            PageData::Raw(x) => self.put(gpa, ENC_RAW, x),
            PageData::Lz4(x) => self.put(gpa, ENC_LZ4, x),
            PageData::Zstd(x) => self.put(gpa, ENC_ZSTD, x),
        }
    }

    /// Pages in the frame so far.
    pub fn pages(&self) -> usize {
        self.count as usize
    }

    /// The frame's payload so far, with its page count filled in.
    pub(crate) fn payload(&mut self) -> &[u8] {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        &self.buf[..self.used]
    }

    /// Sends the frame (if it holds any page) and starts an empty one; returns the bytes sent.
    pub fn send(&mut self, w: &mut impl Write) -> Result<usize, ProtocolError> {
        if self.count == 0 {
            return Ok(0);
        }
        let n = HEADER_LEN + self.used;
        send_frame(w, K_PAGES, self.payload())?;
        self.used = 4;
        self.count = 0;
        Ok(n)
    }
}

/// Walks a `Pages` payload in place, calling `f` for each page; checks counts, lengths,
/// alignment and encodings (the page bodies are decoded by the caller).
pub fn for_each_page<'a, E: From<ProtocolError>>(
    p: &'a [u8],
    mut f: impl FnMut(u64, PageRef<'a>) -> Result<(), E>,
) -> Result<usize, E> {
    let bad = |why: &str| E::from(malformed("Pages", why));
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&'a [u8], E> {
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
        let body = take(len)?;
        let d = match (enc, len) {
            (ENC_ZERO, 0) => PageRef::Zero,
            (ENC_RAW, PAGE) => PageRef::Raw(body),
            (ENC_LZ4, _) => PageRef::Lz4(body),
            (ENC_ZSTD, _) => PageRef::Zstd(body),
            _ => return Err(bad(&format!("encoding {enc} with {len} bytes"))),
        };
        f(gpa, d)?;
    }
    if at != p.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(count)
}
