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
