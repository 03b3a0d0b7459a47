//! VHDX images (MS-VHDX 1.0), written here from the specification: no published Rust crate
//! writes VHDX with its log, and Ferry needs writes that survive a crash at any point.
//! Dynamic and fixed images, 512-byte and 4 KiB logical sectors, virtual sizes to 64 TB;
//! differencing images (with a parent) are refused with a clear error.
//!
//! - Reads and writes of present blocks go straight to the file. A write to a block that is
//!   not present allocates it at the file's end (1 MiB aligned, its block size long: the file
//!   grows sparse, so the rest of the block reads as zeroes) and marks its BAT sector dirty.
//! - `flush` syncs the data, then writes the dirty BAT sectors through the log: one entry at
//!   the log's start, synced, then the sectors in place, synced. A crash before the entry is
//!   whole leaves the old BAT (its blocks were never acknowledged as flushed); after, opening
//!   replays it. Either way every flush that returned Ok is there.
//! - Before the first change the headers get new file-write, data-write and log GUIDs (so
//!   entries of earlier sessions are never replayed); a clean close empties the log again.
//!
//! docs/vhdx.md has the layout and the rules in full.
pub mod format;
pub mod log;

use crate::lock::{open_locked, LockMode};
use crate::raw::{push_file_extents, zero_range};
use crate::{in_range, push_extent, Extent, Image, StorageError};
use format::*;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

/// BAT entries per 4 KiB sector.
const PER_SECTOR: usize = 512;
/// Where `create` puts the log, the metadata region and the BAT.
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const BAT_OFFSET: u64 = 3 * MIB;
/// The largest metadata region and log an image may have here.
const MAX_REGION: u64 = 32 * MIB;

/// How to make a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhdxOptions {
    pub size: u64,
    /// Payload block size; None: 32 MiB (Hyper-V's default).
    pub block_size: Option<u32>,
    /// 512 or 4096.
    pub logical_sector: u32,
    /// Every block allocated up front (the file is sparse where nothing was written).
    pub fixed: bool,
}

impl VhdxOptions {
    /// A dynamic image with 512-byte sectors.
    pub fn dynamic(size: u64) -> Self {
        VhdxOptions {
            size,
            block_size: None,
            logical_sector: 512,
            fixed: false,
        }
    }
}

pub struct VhdxImage {
    file: File,
    path: PathBuf,
    readonly: bool,
    p: Params,
    block: u64,
    ratio: u64,
    bat_offset: u64,
    log_offset: u64,
    log_length: u64,
    map: RwLock<Map>,
    journal: Mutex<Journal>,
    /// The headers have this session's GUIDs (set before the first change).
    touched: AtomicBool,
}

struct Map {
    /// The whole BAT, padded to whole sectors (what the file holds past its last entry is
    /// kept as read).
    bat: Vec<u64>,
    /// Where the next block goes: the file's end, 1 MiB aligned.
    file_end: u64,
    /// BAT sectors changed since the last flush.
    dirty: BTreeSet<usize>,
}

impl Map {
    /// Takes the dirty BAT sectors: each one's file offset and its bytes now.
    fn take_dirty(&mut self, bat_offset: u64) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|s| {
                let bytes = self.bat[s * PER_SECTOR..][..PER_SECTOR]
                    .iter()
                    .flat_map(|e| e.to_le_bytes())
                    .collect();
                (bat_offset + s as u64 * 4096, bytes)
            })
            .collect()
    }
}

struct Journal {
    header: Header,
    /// Which header slot holds `header`.
    slot: usize,
    /// The next log entry's sequence number.
    seq: u64,
}

impl VhdxImage {
    /// Opens and locks `path`, replaying its log first when it holds one (which needs write
    /// access: a read-only open of such an image is refused).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, StorageError> {
        let file = open_locked(path, LockMode::of(readonly))?;
        let bad = |why: String| StorageError::Format {
            path: path.to_owned(),
            why,
        };
        let len = file.metadata()?.len();
        if len < MIB {
            return Err(bad(format!("{len} bytes: too short for a VHDX image")));
        }
        let mut head = vec![0u8; MIB as usize];
        file.read_exact_at(&mut head, 0)?;
        if &head[..8] != FILE_SIGNATURE {
            return Err(bad("not a VHDX image (no \"vhdxfile\" signature)".into()));
        }
        let headers = HEADER_OFFSETS.map(|o| Header::parse(&head[o as usize..]));
        let (slot, header) = match headers {
            [Some(a), Some(b)] if b.seq > a.seq => (1, b),
            [Some(a), _] => (0, a),
            [None, Some(b)] => (1, b),
            [None, None] => return Err(bad("both VHDX headers are damaged".into())),
        };
        if header.version != 1 || header.log_version != 0 {
            return Err(bad(format!(
                "VHDX version {} with log version {} (Ferry reads version 1, log version 0)",
                header.version, header.log_version
            )));
        }
        let regions = REGION_OFFSETS
            .iter()
            .find_map(|o| parse_regions(&head[*o as usize..]))
            .ok_or_else(|| bad("both VHDX region tables are damaged".into()))?;
        let find = |g: Guid| regions.iter().find(|r| r.guid == g).copied();
        let (Some(bat_r), Some(meta)) = (find(REGION_BAT), find(REGION_METADATA)) else {
            return Err(bad("the region table lacks the BAT or the metadata".into()));
        };
        if regions
            .iter()
            .any(|r| r.required && r.guid != REGION_BAT && r.guid != REGION_METADATA)
        {
            return Err(bad("a required region is unknown to Ferry".into()));
        }
        for r in [&bat_r, &meta] {
            if r.offset < MIB || r.offset.saturating_add(u64::from(r.length)) > len {
                return Err(bad(format!(
                    "a region at {:#x} lies outside the file",
                    r.offset
                )));
            }
        }
        // Hyper-V and QEMU make 1 MiB of each; larger ones are refused before any is read
        // into memory.
        if u64::from(meta.length) > MAX_REGION || u64::from(header.log_length) > MAX_REGION {
            return Err(bad(format!(
                "metadata region of {} bytes or log of {} bytes (Ferry reads up to {MAX_REGION})",
                meta.length, header.log_length
            )));
        }
        let mut m = vec![0u8; meta.length as usize];
        file.read_exact_at(&mut m, meta.offset)?;
        let p = parse_metadata(&m).map_err(bad)?;
        if p.has_parent {
            return Err(bad(
                "a differencing VHDX image (with a parent disk): not supported; \
                 `qemu-img convert` makes a standalone image of it"
                    .into(),
            ));
        }
        let log_offset = header.log_offset;
        let log_length = u64::from(header.log_length);
        let log_ok = log_length == 0
            || (log_offset >= MIB
                && log_offset.is_multiple_of(MIB)
                && log_length.is_multiple_of(MIB)
                && log_offset + log_length <= len);
        if !readonly && log_length == 0 {
            return Err(bad(
                "it has no log, and Ferry changes VHDX metadata only through the log: \
                 open it read-only"
                    .into(),
            ));
        }
        if !log_ok {
            return Err(bad(format!(
                "log of {log_length} bytes at {log_offset:#x} is misplaced"
            )));
        }
        let entries = bat_entries(&p) as usize;
        if (u64::from(bat_r.length)) < entries as u64 * 8 {
            return Err(bad(format!(
                "BAT region of {} bytes holds fewer than its {entries} entries",
                bat_r.length
            )));
        }
        let mut img = VhdxImage {
            file,
            path: path.to_owned(),
            readonly,
            block: u64::from(p.block_size),
            ratio: chunk_ratio(&p),
            p,
            bat_offset: bat_r.offset,
            log_offset,
            log_length,
            map: RwLock::new(Map {
                bat: Vec::new(),
                file_end: 0,
                dirty: BTreeSet::new(),
            }),
            journal: Mutex::new(Journal {
                header,
                slot,
                seq: 1,
            }),
            touched: AtomicBool::new(false),
        };
        img.replay()?;
        let len = img.file.metadata()?.len();
        let mut raw = vec![0u8; entries.div_ceil(PER_SECTOR) * 4096];
        let have = (u64::from(bat_r.length)).min(raw.len() as u64) as usize;
        img.file.read_exact_at(&mut raw[..have], bat_r.offset)?;
        let bat: Vec<u64> = raw.chunks(8).map(|c| u64_at(c, 0)).collect();
        let regions = [
            ((bat_r.offset, u64::from(bat_r.length)), "BAT"),
            ((meta.offset, u64::from(meta.length)), "metadata"),
        ];
        img.check_bat(&bat, entries, len, &regions)?;
        let m = img.map.get_mut().unwrap_or_else(|e| e.into_inner());
        m.bat = bat;
        m.file_end = len.next_multiple_of(MIB);
        Ok(img)
    }

    /// Replays the log when the header says it may hold entries.
    fn replay(&mut self) -> Result<(), StorageError> {
        let j = self.journal.get_mut().unwrap_or_else(|e| e.into_inner());
        if j.header.log_guid == Guid::ZERO || self.log_length == 0 {
            return Ok(());
        }
        let mut log = vec![0u8; self.log_length as usize];
        self.file.read_exact_at(&mut log, self.log_offset)?;
        let seqs = log::active(&log, j.header.log_guid);
        let Some(last) = seqs.last() else {
            return Ok(());
        };
        if self.readonly {
            return Err(self.bad(
                "its log holds changes not yet applied (the last writer stopped \
                 without closing it): open it writable once to replay them"
                    .into(),
            ));
        }
        j.seq = last.seq + 1;
        let len = self.file.metadata()?.len();
        for e in &seqs {
            if len < e.flushed_file_offset {
                return Err(self.bad(format!(
                    "the file is {len} bytes but its log says {} were written: truncated",
                    e.flushed_file_offset
                )));
            }
            for op in &e.ops {
                match op {
                    log::Op::Data { offset, data } => self.file.write_all_at(data, *offset)?,
                    log::Op::Zero { offset, len } => zero_range(&self.file, *offset, *len, false)?,
                }
            }
            if self.file.metadata()?.len() < e.last_file_offset {
                self.file
                    .set_len(e.last_file_offset.next_multiple_of(MIB))?;
            }
        }
        self.file.sync_data()?;
        // Applied: the log is empty again.
        let j = self.journal.get_mut().unwrap_or_else(|e| e.into_inner());
        let h = Header {
            log_guid: Guid::ZERO,
            ..j.header
        };
        write_header(&self.file, j, h)?;
        Ok(())
    }

    /// Every payload entry is a known state and a present block lies inside the file, clear
    /// of the header section and the regions.
    fn check_bat(
        &self,
        bat: &[u64],
        entries: usize,
        len: u64,
        regions: &[((u64, u64), &str)],
    ) -> Result<(), StorageError> {
        for (i, &e) in bat.iter().enumerate().take(entries) {
            if (i as u64 + 1).is_multiple_of(self.ratio + 1) {
                continue; // a sector bitmap entry: unused without a parent
            }
            match bat_state(e) {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {}
                PAYLOAD_FULLY_PRESENT => {
                    let (at, end) = (bat_offset(e), bat_offset(e) + self.block);
                    if at < MIB || end > len {
                        return Err(self.bad(format!(
                            "BAT entry {i} points at {at:#x}, outside the {len}-byte file"
                        )));
                    }
                    if let Some((_, what)) =
                        regions.iter().find(|((s, l), _)| at < s + l && *s < end)
                    {
                        return Err(
                            self.bad(format!("BAT entry {i} points into the {what} region"))
                        );
                    }
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    return Err(self.bad(format!(
                        "BAT entry {i} is partially present, which only differencing images have"
                    )))
                }
                s => return Err(self.bad(format!("BAT entry {i} has unknown state {s}"))),
            }
        }
        Ok(())
    }

    fn bad(&self, why: String) -> StorageError {
        StorageError::Format {
            path: self.path.clone(),
            why,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's parameters (block size, sector sizes, fixed or dynamic).
    pub fn params(&self) -> Params {
        self.p
    }

    /// The BAT index of payload block `b`.
    fn index(&self, b: u64) -> usize {
        bat_index(b, self.ratio) as usize
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f(block, offset in block, disk offset, length)` for each block-sized piece of
    /// `[offset, offset + len)`.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64, u64) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut at = offset;
        while at < offset + len {
            let (b, o) = (at / self.block, at % self.block);
            let n = (self.block - o).min(offset + len - at);
            f(b, o, at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Where payload block `b` is in the file, if present.
    fn present(m: &Map, i: usize) -> Option<u64> {
        let e = m.bat[i];
        (bat_state(e) == PAYLOAD_FULLY_PRESENT).then(|| bat_offset(e))
    }

    /// Before the first change of this session: new file-write, data-write and log GUIDs in
    /// the headers, synced.
    fn touch(&self) -> Result<(), StorageError> {
        if self.touched.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if self.touched.load(Ordering::Acquire) {
            return Ok(());
        }
        let h = Header {
            file_write: Guid::random()?,
            data_write: Guid::random()?,
            log_guid: Guid::random()?,
            ..j.header
        };
        write_header(&self.file, &mut j, h)?;
        self.touched.store(true, Ordering::Release);
        Ok(())
    }

    /// Gives payload block `i` (BAT index) a place at the file's end; returns it.
    fn allocate(&self, m: &mut Map, i: usize) -> Result<u64, StorageError> {
        let at = m.file_end;
        self.file.set_len(at + self.block)?;
        m.file_end = at + self.block;
        m.bat[i] = bat_entry(PAYLOAD_FULLY_PRESENT, at);
        m.dirty.insert(i / PER_SECTOR);
        Ok(at)
    }

    /// Zeroes `[offset, offset + len)`; whole blocks of a dynamic image are freed when
    /// `free` (their BAT entries become ZERO and their file space a hole).
    fn zero(&self, offset: u64, len: u64, free: bool) -> Result<(), StorageError> {
        crate::check_writable(self.readonly, offset, len, self.p.disk_size)?;
        self.touch()?;
        self.pieces(offset, len, |b, o, at, n| {
            let i = self.index(b);
            let whole = o == 0 && (n == self.block || at + n == self.p.disk_size);
            if free && whole && !self.p.fixed {
                let mut m = self.write_map();
                if let Some(at) = Self::present(&m, i) {
                    zero_range(&self.file, at, self.block, true)?;
                }
                if !matches!(bat_state(m.bat[i]), PAYLOAD_NOT_PRESENT | PAYLOAD_ZERO) {
                    m.bat[i] = bat_entry(PAYLOAD_ZERO, 0);
                    m.dirty.insert(i / PER_SECTOR);
                }
                return Ok(());
            }
            if let Some(at) = Self::present(&self.read_map(), i) {
                zero_range(&self.file, at + o, n, free)?;
            }
            Ok(())
        })
    }

    /// The next log entry, holding `sectors` (each its own tail: it needs no earlier one).
    fn entry(j: &mut Journal, sectors: &[(u64, Vec<u8>)], end: u64) -> Vec<u8> {
        let refs: Vec<(u64, &[u8])> = sectors.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        let e = log::encode(j.seq, j.header.log_guid, 0, &refs, end, end);
        j.seq += 1;
        e
    }

    /// Writes the dirty BAT sectors through the log (the data is synced already).
    fn commit(
        &self,
        j: &mut Journal,
        sectors: &[(u64, Vec<u8>)],
        end: u64,
    ) -> Result<(), StorageError> {
        let max = log::max_data_sectors(self.log_length).max(1);
        for chunk in sectors.chunks(max) {
            let entry = Self::entry(j, chunk, end);
            self.file.write_all_at(&entry, self.log_offset)?;
            self.file.sync_data()?;
            for (o, d) in chunk {
                self.file.write_all_at(d, *o)?;
            }
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Writes `h` (with the next sequence number) into the header slot not in use, synced: a
/// torn write leaves the other, older header current.
fn write_header(file: &File, j: &mut Journal, h: Header) -> Result<(), StorageError> {
    let h = Header {
        seq: j.header.seq + 1,
        ..h
    };
    let slot = 1 - j.slot;
    file.write_all_at(&h.encode(), HEADER_OFFSETS[slot])?;
    file.sync_data()?;
    j.header = h;
    j.slot = slot;
    Ok(())
}

impl Image for VhdxImage {
    fn size(&self) -> u64 {
        self.p.disk_size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn sector_size(&self) -> u32 {
        self.p.logical_sector
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        in_range(offset, buf.len() as u64, self.p.disk_size)?;
        let m = self.read_map();
        self.pieces(offset, buf.len() as u64, |b, o, at, n| {
            let dst = &mut buf[(at - offset) as usize..][..n as usize];
            match Self::present(&m, self.index(b)) {
                Some(f) => self.file.read_exact_at(dst, f + o)?,
                None => dst.fill(0),
            }
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        crate::check_writable(self.readonly, offset, buf.len() as u64, self.p.disk_size)?;
        self.touch()?;
        self.pieces(offset, buf.len() as u64, |b, o, at, n| {
            let src = &buf[(at - offset) as usize..][..n as usize];
            let i = self.index(b);
            if let Some(f) = Self::present(&self.read_map(), i) {
                self.file.write_all_at(src, f + o)?;
                return Ok(());
            }
            let mut m = self.write_map();
            let f = match Self::present(&m, i) {
                Some(f) => f,
                None => self.allocate(&mut m, i)?,
            };
            self.file.write_all_at(src, f + o)?;
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), StorageError> {
        if self.readonly || !self.touched.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let (sectors, end) = {
            let mut m = self.write_map();
            (m.take_dirty(self.bat_offset), m.file_end)
        };
        let done = self
            .file
            .sync_data()
            .map_err(StorageError::from)
            .and_then(|()| self.commit(&mut j, &sectors, end));
        if done.is_err() {
            // Not committed: the next flush tries these sectors again.
            let mut m = self.write_map();
            m.dirty.extend(
                sectors
                    .iter()
                    .map(|(o, _)| ((o - self.bat_offset) / 4096) as usize),
            );
        }
        done
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.zero(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError> {
        self.zero(offset, len, unmap)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, StorageError> {
        in_range(offset, len, self.p.disk_size)?;
        let m = self.read_map();
        let mut v = Vec::new();
        self.pieces(offset, len, |b, o, at, n| {
            match Self::present(&m, self.index(b)) {
                Some(f) => push_file_extents(&self.file, &mut v, f + o, n, at)?,
                None => push_extent(&mut v, at, n, false),
            }
            Ok(())
        })?;
        Ok(v)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let m = self.read_map();
        let _ = self.pieces(offset, len, |b, o, _, n| {
            if let Some(f) = Self::present(&m, self.index(b)) {
                crate::raw::start_writeback(&self.file, f + o, n);
            }
            Ok(())
        });
    }
}

impl Drop for VhdxImage {
    /// A clean close: everything flushed, then the log marked empty.
    fn drop(&mut self) {
        if self.readonly || !self.touched.load(Ordering::Acquire) || self.flush().is_err() {
            return;
        }
        let j = self.journal.get_mut().unwrap_or_else(|e| e.into_inner());
        let h = Header {
            log_guid: Guid::ZERO,
            ..j.header
        };
        let _ = write_header(&self.file, j, h);
    }
}

/// Writes a new, empty VHDX image described by `o` into the new, empty file `f`.
pub fn format(f: &File, o: &VhdxOptions) -> Result<(), String> {
    let block_size = o.block_size.unwrap_or(32 << 20);
    let p = Params {
        block_size,
        fixed: o.fixed,
        has_parent: false,
        disk_size: o.size,
        disk_id: Guid::random().map_err(|e| e.to_string())?,
        logical_sector: o.logical_sector,
        physical_sector: 4096,
    };
    // The same checks an open makes.
    parse_metadata(&encode_metadata(&p))?;
    let entries = bat_entries(&p);
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let data = BAT_OFFSET + bat_len;
    let blocks = o.size.div_ceil(u64::from(block_size));
    let io = |e: std::io::Error| e.to_string();
    let rand = || Guid::random().map_err(io);
    f.write_all_at(
        &file_identifier(concat!("Ferry ", env!("CARGO_PKG_VERSION"))),
        FILE_ID_OFFSET,
    )
    .map_err(io)?;
    let h = Header {
        seq: 0,
        file_write: rand()?,
        data_write: rand()?,
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH as u32,
        log_offset: LOG_OFFSET,
    };
    f.write_all_at(&h.encode(), HEADER_OFFSETS[0]).map_err(io)?;
    let h2 = Header { seq: 1, ..h };
    f.write_all_at(&h2.encode(), HEADER_OFFSETS[1])
        .map_err(io)?;
    let regions = encode_regions(&[
        Region {
            guid: REGION_BAT,
            offset: BAT_OFFSET,
            length: bat_len as u32,
            required: true,
        },
        Region {
            guid: REGION_METADATA,
            offset: METADATA_OFFSET,
            length: MIB as u32,
            required: true,
        },
    ]);
    for at in REGION_OFFSETS {
        f.write_all_at(&regions, at).map_err(io)?;
    }
    f.write_all_at(&encode_metadata(&p), METADATA_OFFSET)
        .map_err(io)?;
    let mut end = data;
    if o.fixed {
        let ratio = chunk_ratio(&p);
        let mut bat = vec![0u64; entries as usize];
        for b in 0..blocks {
            bat[bat_index(b, ratio) as usize] =
                bat_entry(PAYLOAD_FULLY_PRESENT, data + b * u64::from(block_size));
        }
        let bytes: Vec<u8> = bat.iter().flat_map(|e| e.to_le_bytes()).collect();
        f.write_all_at(&bytes, BAT_OFFSET).map_err(io)?;
        end = data + blocks * u64::from(block_size);
    }
    f.set_len(end).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests;
