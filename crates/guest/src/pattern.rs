//! Memory patterns shared by the guest image (no_std) and the host-side verifier.
//! Both sides compile this same file, so they cannot drift apart.

/// Guest page size used by every workload.
pub const PAGE_SIZE: u64 = 4096;
/// Words of 8 bytes in a page.
pub const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;
/// First word of a dirty workload's status page: ASCII "FERRYDRT" little-endian.
pub const DIRTY_MAGIC: u64 = u64::from_le_bytes(*b"FERRYDRT");

/// Status page (first page of a dirty region), word offsets.
pub mod status {
    /// DIRTY_MAGIC.
    pub const MAGIC: usize = 0;
    /// vCPU index that owns the region.
    pub const CPU: usize = 1;
    /// Number of data pages following the status page.
    pub const PAGES: usize = 2;
    /// Position, one word so a pause can never split it: `pass << 32 | next`. Data pages
    /// `0..next` already hold `pass`; pages `next..` still hold `pass - 1` (the first pass is 1).
    pub const POSITION: usize = 3;
    /// Passes completed.
    pub const COMPLETED: usize = 4;
}

/// Word `word` of data page `page` as written by pass `pass` of the dirty workload.
/// A page never written (pass 0) is all zero. Every word depends on the page index and the
/// pass, so a stale page (old pass) or a misplaced page (other index) cannot pass as right.
#[inline(always)]
pub fn dirty_word(page: u64, pass: u64, word: u64) -> u64 {
    if pass == 0 {
        return 0;
    }
    ((page << 24) ^ pass)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(word.wrapping_mul(0xD6E8_FEB8_6659_FD93))
        | 1
}

/// Word `word` of page `page` of a verify region filled with `seed`.
#[inline(always)]
pub fn verify_word(seed: u64, page: u64, word: u64) -> u64 {
    let mut x = seed ^ (page << 12) ^ word;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Folds one word into a running checksum (FNV-1a over 64-bit words).
#[inline(always)]
pub fn checksum_step(sum: u64, word: u64) -> u64 {
    (sum ^ word).wrapping_mul(0x0000_0100_0000_01B3)
}

/// Initial checksum value.
pub const CHECKSUM_INIT: u64 = 0xCBF2_9CE4_8422_2325;

/// Bytes of a disk sector.
pub const SECTOR: u64 = 512;
/// Words of 8 bytes in a sector.
pub const WORDS_PER_SECTOR: u64 = SECTOR / 8;
/// First word of a disk workload's status page: ASCII "FERRYDSK" little-endian.
pub const DISK_MAGIC: u64 = u64::from_le_bytes(*b"FERRYDSK");

/// Status page (first page of a disk workload's region), word offsets.
pub mod disk_status {
    /// DISK_MAGIC.
    pub const MAGIC: usize = 0;
    /// vCPU index that runs the workload.
    pub const CPU: usize = 1;
    /// Sectors of the span the workload writes (from sector 0).
    pub const SECTORS: usize = 2;
    /// `pass << 32 | next` (in blocks of `BLOCK` sectors): blocks `0..next` hold `pass`
    /// (acknowledged by the device), blocks after `next` still hold `pass - 1`; block `next`
    /// may hold either (its write may have completed just before a pause).
    pub const POSITION: usize = 3;
    /// Passes written and read back correctly.
    pub const COMPLETED: usize = 4;
    /// Sectors per write request.
    pub const BLOCK: usize = 5;
}

/// Word `word` of sector `sector` as written by pass `pass` of the disk workload; a sector
/// never written (pass 0) is all zero. Depends on sector, pass and word, so a stale, misplaced
/// or lost write cannot read back as right.
#[inline(always)]
pub fn disk_word(sector: u64, pass: u64, word: u64) -> u64 {
    if pass == 0 {
        return 0;
    }
    ((sector << 20) ^ (pass << 2) ^ 0x5A5A)
        .wrapping_mul(0xA076_1D64_78BD_642F)
        .wrapping_add(word.wrapping_mul(0xE703_7ED1_A0B4_28DB))
        | 1
}
