//! VHDX on-disk structures (MS-VHDX 1.0): the file identifier, the two headers, the two
//! region tables, the metadata table and its items, BAT entries. Every integer is little
//! endian; every checksum is CRC-32C over the structure with its checksum field zeroed.
//! docs/vhdx.md draws the layout.

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// The largest virtual size the format allows (64 TB, as MS-VHDX counts: 2^46 bytes).
pub const MAX_SIZE: u64 = 64 << 40;

pub const FILE_ID_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_SIZE: usize = 64 * KIB as usize;
pub const METADATA_TABLE_SIZE: usize = 64 * KIB as usize;

pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";
const REGION_SIGNATURE: &[u8; 4] = b"regi";
const METADATA_SIGNATURE: &[u8; 8] = b"metadata";

/// Payload block states (BAT entry bits 0-2).
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

/// A GUID as VHDX stores it: the first three fields little endian, the last eight bytes as
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    pub const fn new(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A fresh random (version 4) GUID.
    pub fn random() -> std::io::Result<Guid> {
        use std::io::Read;
        let mut g = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut g)?;
        g[7] = (g[7] & 0x0f) | 0x40;
        g[8] = (g[8] & 0x3f) | 0x80;
        Ok(Guid(g))
    }

    fn read(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }
}

pub const REGION_BAT: Guid = Guid::new(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub const REGION_METADATA: Guid = Guid::new(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const META_FILE_PARAMETERS: Guid = Guid::new(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const META_DISK_SIZE: Guid = Guid::new(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const META_DISK_ID: Guid = Guid::new(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const META_LOGICAL_SECTOR: Guid = Guid::new(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const META_PHYSICAL_SECTOR: Guid = Guid::new(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const META_PARENT_LOCATOR: Guid = Guid::new(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
pub fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// CRC-32C of `b` with the four bytes at `at` (its checksum field) taken as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// Stores the checksum of `b` in its field at `at`.
pub fn seal(b: &mut [u8], at: usize) {
    let c = checksum(b, at);
    put(b, at, &c.to_le_bytes());
}

/// The file type identifier: signature and the creator, UTF-16.
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * KIB as usize];
    put(&mut b, 0, FILE_SIGNATURE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        put(&mut b, 8 + 2 * i, &u.to_le_bytes());
    }
    b
}

/// One of the two headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub file_write: Guid,
    pub data_write: Guid,
    /// Zero: the log holds nothing to replay.
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// None unless the signature and checksum hold.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[0..4] != HEADER_SIGNATURE {
            return None;
        }
        let b = &b[..HEADER_SIZE];
        if checksum(b, 4) != u32_at(b, 4) {
            return None;
        }
        Some(Header {
            seq: u64_at(b, 8),
            file_write: Guid::read(&b[16..]),
            data_write: Guid::read(&b[32..]),
            log_guid: Guid::read(&b[48..]),
            log_version: u16_at(b, 64),
            version: u16_at(b, 66),
            log_length: u32_at(b, 68),
            log_offset: u64_at(b, 72),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        put(&mut b, 0, HEADER_SIGNATURE);
        put(&mut b, 8, &self.seq.to_le_bytes());
        put(&mut b, 16, &self.file_write.0);
        put(&mut b, 32, &self.data_write.0);
        put(&mut b, 48, &self.log_guid.0);
        put(&mut b, 64, &self.log_version.to_le_bytes());
        put(&mut b, 66, &self.version.to_le_bytes());
        put(&mut b, 68, &self.log_length.to_le_bytes());
        put(&mut b, 72, &self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// A region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses a region table; None unless the signature and checksum hold.
pub fn parse_regions(b: &[u8]) -> Option<Vec<Region>> {
    if b.len() < REGION_TABLE_SIZE || &b[0..4] != REGION_SIGNATURE {
        return None;
    }
    let b = &b[..REGION_TABLE_SIZE];
    if checksum(b, 4) != u32_at(b, 4) {
        return None;
    }
    let n = u32_at(b, 8) as usize;
    if n > 2047 {
        return None;
    }
    Some(
        (0..n)
            .map(|i| {
                let e = &b[16 + 32 * i..48 + 32 * i];
                Region {
                    guid: Guid::read(e),
                    offset: u64_at(e, 16),
                    length: u32_at(e, 24),
                    required: u32_at(e, 28) & 1 != 0,
                }
            })
            .collect(),
    )
}

pub fn encode_regions(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    put(&mut b, 0, REGION_SIGNATURE);
    put(&mut b, 8, &(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let at = 16 + 32 * i;
        put(&mut b, at, &r.guid.0);
        put(&mut b, at + 16, &r.offset.to_le_bytes());
        put(&mut b, at + 24, &r.length.to_le_bytes());
        put(&mut b, at + 28, &u32::from(r.required).to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// What the metadata region says about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub block_size: u32,
    /// File parameters' LeaveBlocksAllocated: a fixed image (every block stays present).
    pub fixed: bool,
    pub has_parent: bool,
    pub disk_size: u64,
    pub disk_id: Guid,
    pub logical_sector: u32,
    pub physical_sector: u32,
}

/// Parses the metadata region `m` (its whole length). Errors name what is wrong.
pub fn parse_metadata(m: &[u8]) -> Result<Params, String> {
    if m.len() < METADATA_TABLE_SIZE || &m[0..8] != METADATA_SIGNATURE {
        return Err("no metadata table (bad signature)".into());
    }
    let n = u16_at(m, 10) as usize;
    if n > 2047 {
        return Err(format!("metadata table claims {n} entries (at most 2047)"));
    }
    let (mut params, mut size, mut id, mut logical, mut physical) = (None, None, None, None, None);
    let mut parent = false;
    for i in 0..n {
        let e = &m[32 + 32 * i..64 + 32 * i];
        let (guid, off, len) = (
            Guid::read(e),
            u32_at(e, 16) as usize,
            u32_at(e, 20) as usize,
        );
        let (user, required) = (u32_at(e, 24) & 1 != 0, u32_at(e, 24) & 4 != 0);
        if len == 0 {
            continue;
        }
        let item = match off.checked_add(len) {
            Some(end) if off >= METADATA_TABLE_SIZE && end <= m.len() => &m[off..end],
            _ => {
                return Err(format!(
                    "metadata item {i} lies outside the metadata region"
                ))
            }
        };
        let need = |n: usize| {
            if item.len() < n {
                Err(format!(
                    "metadata item {i} is {} bytes, too short",
                    item.len()
                ))
            } else {
                Ok(item)
            }
        };
        match guid {
            META_FILE_PARAMETERS => params = Some((u32_at(need(8)?, 0), u32_at(item, 4))),
            META_DISK_SIZE => size = Some(u64_at(need(8)?, 0)),
            META_DISK_ID => id = Some(Guid::read(need(16)?)),
            META_LOGICAL_SECTOR => logical = Some(u32_at(need(4)?, 0)),
            META_PHYSICAL_SECTOR => physical = Some(u32_at(need(4)?, 0)),
            META_PARENT_LOCATOR => parent = true,
            _ if required && !user => {
                return Err(format!(
                    "metadata item {i} is required but unknown to Ferry"
                ))
            }
            _ => {}
        }
    }
    let missing = |what: &str| format!("metadata lacks the {what}");
    let (block_size, flags) = params.ok_or_else(|| missing("file parameters"))?;
    let p = Params {
        block_size,
        fixed: flags & 1 != 0,
        has_parent: flags & 2 != 0 || parent,
        disk_size: size.ok_or_else(|| missing("virtual disk size"))?,
        disk_id: id.unwrap_or_default(),
        logical_sector: logical.ok_or_else(|| missing("logical sector size"))?,
        physical_sector: physical.ok_or_else(|| missing("physical sector size"))?,
    };
    if !p.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&u64::from(p.block_size)) {
        return Err(format!(
            "block size {} (must be a power of two from 1 MiB to 256 MiB)",
            p.block_size
        ));
    }
    if !matches!(p.logical_sector, 512 | 4096) || !matches!(p.physical_sector, 512 | 4096) {
        return Err(format!(
            "sector sizes {}/{} (logical/physical must be 512 or 4096)",
            p.logical_sector, p.physical_sector
        ));
    }
    if p.disk_size == 0
        || p.disk_size > MAX_SIZE
        || !p.disk_size.is_multiple_of(u64::from(p.logical_sector))
    {
        return Err(format!(
            "virtual size {} (must be a multiple of the {}-byte sector, at most 64 TB)",
            p.disk_size, p.logical_sector
        ));
    }
    Ok(p)
}

/// The metadata region (1 MiB) describing `p`: the table, then each item from 64 KiB on.
pub fn encode_metadata(p: &Params) -> Vec<u8> {
    let mut m = vec![0u8; MIB as usize];
    put(&mut m, 0, METADATA_SIGNATURE);
    let mut params = [0u8; 8];
    put(&mut params, 0, &p.block_size.to_le_bytes());
    put(&mut params, 4, &u32::from(p.fixed).to_le_bytes());
    // (guid, data, IsVirtualDisk)
    let items: [(Guid, Vec<u8>, bool); 5] = [
        (META_FILE_PARAMETERS, params.to_vec(), false),
        (META_DISK_SIZE, p.disk_size.to_le_bytes().to_vec(), true),
        (META_DISK_ID, p.disk_id.0.to_vec(), true),
        (
            META_LOGICAL_SECTOR,
            p.logical_sector.to_le_bytes().to_vec(),
            true,
        ),
        (
            META_PHYSICAL_SECTOR,
            p.physical_sector.to_le_bytes().to_vec(),
            true,
        ),
    ];
    put(&mut m, 10, &(items.len() as u16).to_le_bytes());
    let mut off = METADATA_TABLE_SIZE;
    for (i, (guid, data, vdisk)) in items.iter().enumerate() {
        let at = 32 + 32 * i;
        put(&mut m, at, &guid.0);
        put(&mut m, at + 16, &(off as u32).to_le_bytes());
        put(&mut m, at + 20, &(data.len() as u32).to_le_bytes());
        let flags = (u32::from(*vdisk) << 1) | 4; // IsVirtualDisk, IsRequired
        put(&mut m, at + 24, &flags.to_le_bytes());
        put(&mut m, off, data);
        off += data.len();
    }
    m
}

/// Payload blocks per sector bitmap block: 2^23 sectors' worth.
pub fn chunk_ratio(p: &Params) -> u64 {
    (1u64 << 23) * u64::from(p.logical_sector) / u64::from(p.block_size)
}

/// BAT entries a disk of these parameters has (payload and sector bitmap entries).
pub fn bat_entries(p: &Params) -> u64 {
    let blocks = p.disk_size.div_ceil(u64::from(p.block_size));
    let ratio = chunk_ratio(p);
    if p.has_parent {
        blocks.div_ceil(ratio) * (ratio + 1)
    } else {
        blocks + (blocks - 1) / ratio
    }
}

/// The BAT index of payload block `b`: a sector bitmap entry follows every `ratio` of them.
pub fn bat_index(b: u64, ratio: u64) -> u64 {
    b + b / ratio
}

pub fn bat_state(e: u64) -> u64 {
    e & 7
}

/// The file offset a BAT entry points at (its FileOffsetMB field, in bytes).
pub fn bat_offset(e: u64) -> u64 {
    (e >> 20) * MIB
}

pub fn bat_entry(state: u64, offset: u64) -> u64 {
    debug_assert!(offset.is_multiple_of(MIB));
    (offset / MIB) << 20 | state
}
