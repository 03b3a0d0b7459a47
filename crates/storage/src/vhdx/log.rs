//! The VHDX log (MS-VHDX 2.3): a circular buffer of 4 KiB sectors holding entries, each a
//! header, descriptors and data sectors. Metadata (BAT) updates are written here and made
//! durable before they are written in place, so a crash at any point leaves either the old or
//! the new metadata, and opening replays whatever the log holds.
//!
//! Entries are found by scanning every sector; an entry is valid when its signature,
//! checksum (CRC-32C over the whole entry), log GUID and every descriptor and data sector's
//! sequence number agree. The active sequence is the valid entry with the highest sequence
//! number whose tail (the first entry still needed) starts a run of valid entries with
//! consecutive sequence numbers that reaches it; entries may wrap around the log's end.
use super::format::{checksum, put, seal, u32_at, u64_at, Guid};

pub const SECTOR: usize = 4096;
const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const DATA_DESC: &[u8; 4] = b"desc";
const ZERO_DESC: &[u8; 4] = b"zero";
const DATA_SECTOR: &[u8; 4] = b"data";
const HEADER_BYTES: usize = 64;
const DESC_BYTES: usize = 32;

/// One update an entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write these 4 KiB at `offset`.
    Data { offset: u64, data: Vec<u8> },
    /// Write `len` zero bytes at `offset`.
    Zero { offset: u64, len: u64 },
}

/// A valid entry read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub ops: Vec<Op>,
    /// The file's durable size when the entry was written: a shorter file was truncated.
    pub flushed_file_offset: u64,
    /// The size the file must have once the entry is applied.
    pub last_file_offset: u64,
}

fn desc_sectors(n: usize) -> usize {
    (HEADER_BYTES + DESC_BYTES * n).div_ceil(SECTOR)
}

/// The most 4 KiB data sectors one entry can carry in a log of `log_len` bytes.
pub fn max_data_sectors(log_len: u64) -> usize {
    let total = (log_len as usize) / SECTOR;
    let mut n = total.saturating_sub(1);
    while n > 0 && n + desc_sectors(n) > total {
        n -= 1;
    }
    n
}

/// Encodes an entry of data sectors (each `(file offset, 4 KiB)`) at log offset `tail`
/// (the entry is its own tail: it needs no earlier entry).
pub fn encode(
    seq: u64,
    guid: Guid,
    tail: u32,
    sectors: &[(u64, &[u8])],
    flushed_file_offset: u64,
    last_file_offset: u64,
) -> Vec<u8> {
    let d = desc_sectors(sectors.len());
    let mut b = vec![0u8; (d + sectors.len()) * SECTOR];
    put(&mut b, 0, ENTRY_SIGNATURE);
    let len = b.len() as u32;
    put(&mut b, 8, &len.to_le_bytes());
    put(&mut b, 12, &tail.to_le_bytes());
    put(&mut b, 16, &seq.to_le_bytes());
    put(&mut b, 24, &(sectors.len() as u32).to_le_bytes());
    put(&mut b, 32, &guid.0);
    put(&mut b, 48, &flushed_file_offset.to_le_bytes());
    put(&mut b, 56, &last_file_offset.to_le_bytes());
    for (i, (offset, data)) in sectors.iter().enumerate() {
        assert_eq!(data.len(), SECTOR, "log data sectors are 4 KiB");
        let at = HEADER_BYTES + DESC_BYTES * i;
        put(&mut b, at, DATA_DESC);
        put(&mut b, at + 4, &data[4092..]);
        put(&mut b, at + 8, &data[..8]);
        put(&mut b, at + 16, &offset.to_le_bytes());
        put(&mut b, at + 24, &seq.to_le_bytes());
        let s = (d + i) * SECTOR;
        put(&mut b, s, DATA_SECTOR);
        put(&mut b, s + 4, &((seq >> 32) as u32).to_le_bytes());
        put(&mut b, s + 8, &data[8..4092]);
        put(&mut b, s + 4092, &(seq as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// A valid entry found at a sector of the log.
struct Found {
    at: usize,
    sectors: usize,
    tail: usize,
    entry: Entry,
}

/// The entry starting at sector `at` of `log` (wrapping around its end), if valid for
/// `guid`.
fn parse_at(log: &[u8], at: usize, guid: Guid) -> Option<Found> {
    let count = log.len() / SECTOR;
    let sector = |i: usize| &log[((at + i) % count) * SECTOR..][..SECTOR];
    let h = sector(0);
    if &h[0..4] != ENTRY_SIGNATURE {
        return None;
    }
    let len = u32_at(h, 8) as usize;
    let tail = u32_at(h, 12) as usize;
    let seq = u64_at(h, 16);
    let n = u32_at(h, 24) as usize;
    if len == 0 || !len.is_multiple_of(SECTOR) || len > log.len() || seq == 0 {
        return None;
    }
    if !tail.is_multiple_of(SECTOR) || tail >= log.len() || h[32..48] != guid.0 {
        return None;
    }
    let sectors = len / SECTOR;
    if n > (sectors * SECTOR - HEADER_BYTES) / DESC_BYTES || desc_sectors(n) > sectors {
        return None;
    }
    let bytes: Vec<u8> = (0..sectors).flat_map(|i| sector(i).to_vec()).collect();
    if checksum(&bytes, 4) != u32_at(&bytes, 4) {
        return None;
    }
    let mut ops = Vec::with_capacity(n);
    let mut data = desc_sectors(n);
    for i in 0..n {
        let d = &bytes[HEADER_BYTES + DESC_BYTES * i..][..DESC_BYTES];
        let offset = u64_at(d, 16);
        if u64_at(d, 24) != seq || !offset.is_multiple_of(SECTOR as u64) {
            return None;
        }
        if &d[0..4] == ZERO_DESC {
            let len = u64_at(d, 8);
            if !len.is_multiple_of(SECTOR as u64) {
                return None;
            }
            ops.push(Op::Zero { offset, len });
        } else if &d[0..4] == DATA_DESC {
            if data >= sectors {
                return None;
            }
            let s = &bytes[data * SECTOR..][..SECTOR];
            let sseq = (u64::from(u32_at(s, 4)) << 32) | u64::from(u32_at(s, 4092));
            if &s[0..4] != DATA_SECTOR || sseq != seq {
                return None;
            }
            let mut v = Vec::with_capacity(SECTOR);
            v.extend_from_slice(&d[8..16]);
            v.extend_from_slice(&s[8..4092]);
            v.extend_from_slice(&d[4..8]);
            ops.push(Op::Data { offset, data: v });
            data += 1;
        } else {
            return None;
        }
    }
    Some(Found {
        at,
        sectors,
        tail: tail / SECTOR,
        entry: Entry {
            seq,
            ops,
            flushed_file_offset: u64_at(h, 48),
            last_file_offset: u64_at(h, 56),
        },
    })
}

/// The active sequence of `log` (the whole log region) for `guid`, oldest entry first;
/// empty when nothing is to be replayed.
pub fn active(log: &[u8], guid: Guid) -> Vec<Entry> {
    let count = log.len() / SECTOR;
    if count == 0 || guid == Guid::ZERO {
        return Vec::new();
    }
    let mut found: Vec<Found> = (0..count).filter_map(|i| parse_at(log, i, guid)).collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.entry.seq));
    let by_at = |at: usize| found.iter().find(|f| f.at == at);
    for head in &found {
        // Walk from the head's tail to the head through consecutive sequence numbers.
        let mut seq_run = Vec::new();
        let mut at = head.tail;
        let mut want = None;
        while seq_run.len() <= count {
            let Some(f) = by_at(at) else { break };
            if want.is_some_and(|w| w != f.entry.seq) {
                break;
            }
            seq_run.push(f.entry.clone());
            if f.at == head.at {
                return seq_run;
            }
            want = Some(f.entry.seq + 1);
            at = (at + f.sectors) % count;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Guid {
        Guid([7; 16])
    }

    fn sector(fill: u8) -> Vec<u8> {
        let mut s = vec![fill; SECTOR];
        s[0..8].copy_from_slice(b"LEADING!");
        s[4092..].copy_from_slice(b"TAIL");
        s
    }

    fn place(log: &mut [u8], at: usize, e: &[u8]) {
        let count = log.len() / SECTOR;
        for (i, s) in e.chunks(SECTOR).enumerate() {
            let to = ((at + i) % count) * SECTOR;
            log[to..to + SECTOR].copy_from_slice(s);
        }
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        let (a, b) = (sector(0xaa), sector(0xbb));
        let e = encode(
            5,
            g(),
            0,
            &[(0x30_0000, &a), (0x30_1000, &b)],
            1 << 30,
            2 << 30,
        );
        let mut log = vec![0u8; 16 * SECTOR];
        place(&mut log, 0, &e);
        let got = active(&log, g());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].seq, 5);
        assert_eq!(
            (got[0].flushed_file_offset, got[0].last_file_offset),
            (1 << 30, 2 << 30)
        );
        assert_eq!(
            got[0].ops,
            vec![
                Op::Data {
                    offset: 0x30_0000,
                    data: a
                },
                Op::Data {
                    offset: 0x30_1000,
                    data: b
                }
            ]
        );
        // Another log GUID (a past session's), or one flipped bit: nothing to replay.
        assert!(active(&log, Guid([8; 16])).is_empty());
        log[SECTOR + 100] ^= 1;
        assert!(active(&log, g()).is_empty());
    }

    #[test]
    fn the_newest_sequence_wins_and_may_wrap_around_the_end() {
        let s = sector(1);
        let mut log = vec![0u8; 8 * SECTOR];
        // An old entry at 0 (seq 3), then a sequence 6 -> 7 starting at sector 5 (tail 5),
        // whose second entry wraps from sector 7 to sector 0.
        place(
            &mut log,
            2,
            &encode(3, g(), 2 * SECTOR as u32, &[(0, &s)], 0, 0),
        );
        place(
            &mut log,
            5,
            &encode(6, g(), 5 * SECTOR as u32, &[(4096, &s)], 0, 0),
        );
        let tail = 5 * SECTOR as u32;
        place(&mut log, 7, &encode(7, g(), tail, &[(8192, &s)], 0, 0));
        let got = active(&log, g());
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 7]);
        // The head's tail points at an entry that is gone: its sequence is not replayable,
        // and the older complete one is.
        log[5 * SECTOR..6 * SECTOR].fill(0);
        let got = active(&log, g());
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn capacity_leaves_room_for_descriptors() {
        // 1 MiB log = 256 sectors: 254 data sectors need 2 descriptor sectors.
        assert_eq!(max_data_sectors(1 << 20), 254);
        assert!(max_data_sectors(1 << 20) + desc_sectors(254) <= 256);
    }
}
