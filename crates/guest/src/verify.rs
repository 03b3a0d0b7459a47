//! Verifying a guest memory image against the test guest's own records.
//!
//! The dirty workload keeps a status page at the start of its region (see `pattern::status`)
//! holding its exact position, updated with one store after each page; so for any paused or
//! migrated memory image the expected content of every page is known: pages `0..next` hold
//! `pass`, pages `next..` hold `pass - 1`.
use crate::pattern::{dirty_word, status, DIRTY_MAGIC, PAGE_SIZE, WORDS_PER_PAGE};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("reading guest memory at {gpa:#x} failed: {msg}")]
    Read { gpa: u64, msg: String },
    #[error("no dirty-workload status page at {base:#x} (magic {found:#x})")]
    NoStatus { base: u64, found: u64 },
    #[error("status page at {base:#x} is inconsistent: {what}")]
    BadStatus { base: u64, what: String },
    #[error("page {page} (gpa {gpa:#x}) word {word}: expected pass {expected_pass} ({expected:#x}), found {found:#x}{hint}")]
    Mismatch {
        page: u64,
        gpa: u64,
        word: u64,
        expected_pass: u64,
        expected: u64,
        found: u64,
        hint: String,
    },
}

/// The position recorded in a dirty region's status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyPosition {
    pub cpu: u64,
    pub pages: u64,
    pub pass: u64,
    pub next: u64,
    pub completed: u64,
}

/// Reads `buf.len()` bytes of guest memory at `gpa`.
pub trait MemoryReader {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String>;
}

impl<F: Fn(u64, &mut [u8]) -> Result<(), String>> MemoryReader for F {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self(gpa, buf)
    }
}

fn words(buf: &[u8]) -> impl Iterator<Item = u64> + '_ {
    buf.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
}

fn read_page(mem: &impl MemoryReader, gpa: u64, buf: &mut [u8]) -> Result<(), VerifyError> {
    mem.read(gpa, buf)
        .map_err(|msg| VerifyError::Read { gpa, msg })
}

/// Reads the status page of the dirty region at `base`.
pub fn dirty_position(mem: &impl MemoryReader, base: u64) -> Result<DirtyPosition, VerifyError> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    read_page(mem, base, &mut buf)?;
    let w: Vec<u64> = words(&buf).collect();
    if w[status::MAGIC] != DIRTY_MAGIC {
        return Err(VerifyError::NoStatus {
            base,
            found: w[status::MAGIC],
        });
    }
    let pos = w[status::POSITION];
    let p = DirtyPosition {
        cpu: w[status::CPU],
        pages: w[status::PAGES],
        pass: pos >> 32,
        next: pos & 0xffff_ffff,
        completed: w[status::COMPLETED],
    };
    if p.pass == 0 || p.next > p.pages || p.completed + 1 < p.pass || p.completed > p.pass {
        return Err(VerifyError::BadStatus {
            base,
            what: format!("{p:?}"),
        });
    }
    Ok(p)
}

/// Checks every page of the dirty region at `base` against the position in its status page.
/// Returns that position.
pub fn verify_dirty_region(
    mem: &impl MemoryReader,
    base: u64,
) -> Result<DirtyPosition, VerifyError> {
    let p = dirty_position(mem, base)?;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for page in 0..p.pages {
        let gpa = base + (page + 1) * PAGE_SIZE;
        read_page(mem, gpa, &mut buf)?;
        let ws: Vec<u64> = words(&buf).collect();
        // The page at `next` may be the one the guest was writing when it stopped: a prefix of
        // its words already holds the new pass (the status word moves only after the whole
        // page). Everything else must match exactly.
        let new_prefix = if page == p.next {
            ws.iter()
                .enumerate()
                .take_while(|&(w, &f)| f == dirty_word(page, p.pass, w as u64))
                .count()
        } else {
            0
        };
        for (word, &found) in ws.iter().enumerate().skip(new_prefix) {
            let word = word as u64;
            let expected_pass = if page < p.next { p.pass } else { p.pass - 1 };
            let expected = dirty_word(page, expected_pass, word);
            if found != expected {
                return Err(VerifyError::Mismatch {
                    page,
                    gpa,
                    word,
                    expected_pass,
                    expected,
                    found,
                    hint: diagnose(page, p.pass, word, found),
                });
            }
        }
    }
    Ok(p)
}

/// Says what a wrong word looks like: an older pass of the same page, or another page.
fn diagnose(page: u64, pass: u64, word: u64, found: u64) -> String {
    if found == 0 {
        return " (page never written: zero)".into();
    }
    for q in (0..=pass + 1).rev() {
        if dirty_word(page, q, word) == found {
            return format!(" (stale: holds pass {q})");
        }
    }
    " (misplaced or corrupt)".into()
}

/// Words per page, re-exported for readers sizing buffers.
pub const PAGE_WORDS: u64 = WORDS_PER_PAGE;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A fake region: status page + `pages` pages written as the guest would.
    fn region(pages: u64, pass: u64, next: u64) -> RefCell<Vec<u8>> {
        let mut m = vec![0u8; ((pages + 1) * PAGE_SIZE) as usize];
        let mut put = |off: u64, v: u64| {
            m[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(0, DIRTY_MAGIC);
        put(8 * status::PAGES as u64, pages);
        put(8 * status::POSITION as u64, pass << 32 | next);
        put(8 * status::COMPLETED as u64, pass - 1);
        for page in 0..pages {
            let q = if page < next { pass } else { pass - 1 };
            for w in 0..WORDS_PER_PAGE {
                put((page + 1) * PAGE_SIZE + w * 8, dirty_word(page, q, w));
            }
        }
        RefCell::new(m)
    }

    fn reader(m: &RefCell<Vec<u8>>) -> impl Fn(u64, &mut [u8]) -> Result<(), String> + '_ {
        move |gpa, buf| {
            let m = m.borrow();
            let s = m
                .get(gpa as usize..gpa as usize + buf.len())
                .ok_or("out of range")?;
            buf.copy_from_slice(s);
            Ok(())
        }
    }

    #[test]
    fn exact_region_passes() {
        let m = region(8, 3, 5);
        let p = verify_dirty_region(&reader(&m), 0).unwrap();
        assert_eq!((p.pass, p.next, p.pages), (3, 5, 8));
        let first = region(8, 1, 2); // pages 2.. never written
        verify_dirty_region(&reader(&first), 0).unwrap();
    }

    #[test]
    fn stale_and_misplaced_pages_are_caught() {
        let m = region(8, 3, 5);
        // Page 1 rolled back to pass 2: stale.
        let off = (2 * PAGE_SIZE) as usize;
        let stale: Vec<u8> = (0..WORDS_PER_PAGE)
            .flat_map(|w| dirty_word(1, 2, w).to_le_bytes())
            .collect();
        m.borrow_mut()[off..off + PAGE_SIZE as usize].copy_from_slice(&stale);
        let e = verify_dirty_region(&reader(&m), 0).unwrap_err();
        assert!(matches!(e, VerifyError::Mismatch { page: 1, .. }), "{e}");
        assert!(e.to_string().contains("stale: holds pass 2"), "{e}");

        let m = region(8, 3, 5);
        // Page 6 holds page 7's content: misplaced.
        let (a, b) = ((7 * PAGE_SIZE) as usize, (8 * PAGE_SIZE) as usize);
        let copy = m.borrow()[b..b + PAGE_SIZE as usize].to_vec();
        m.borrow_mut()[a..a + PAGE_SIZE as usize].copy_from_slice(&copy);
        let e = verify_dirty_region(&reader(&m), 0).unwrap_err();
        assert!(e.to_string().contains("misplaced"), "{e}");

        let m = region(8, 3, 5);
        m.borrow_mut()[(5 * PAGE_SIZE + 100) as usize] ^= 1; // one flipped bit
        assert!(verify_dirty_region(&reader(&m), 0).is_err());
    }

    #[test]
    fn the_page_being_written_may_hold_a_prefix_of_the_new_pass() {
        let m = region(8, 3, 5);
        // Page 5 (= next) half written with pass 3: allowed.
        let off = (6 * PAGE_SIZE) as usize;
        for w in 0..200u64 {
            let v = dirty_word(5, 3, w).to_le_bytes();
            m.borrow_mut()[off + 8 * w as usize..off + 8 * w as usize + 8].copy_from_slice(&v);
        }
        verify_dirty_region(&reader(&m), 0).unwrap();
        // But not a new-pass word after an old one (not a prefix), nor on another page.
        let w = 300usize;
        let v = dirty_word(5, 3, w as u64).to_le_bytes();
        m.borrow_mut()[off + 8 * w..off + 8 * w + 8].copy_from_slice(&v);
        assert!(verify_dirty_region(&reader(&m), 0).is_err());
        let m = region(8, 3, 5);
        let off = (7 * PAGE_SIZE) as usize;
        m.borrow_mut()[off..off + 8].copy_from_slice(&dirty_word(6, 3, 0).to_le_bytes());
        assert!(verify_dirty_region(&reader(&m), 0).is_err());
    }

    #[test]
    fn missing_status_is_reported() {
        let m = RefCell::new(vec![0u8; 2 * PAGE_SIZE as usize]);
        assert!(matches!(
            verify_dirty_region(&reader(&m), 0),
            Err(VerifyError::NoStatus { .. })
        ));
    }
}

/// The position recorded in a disk workload's status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskPosition {
    pub cpu: u64,
    pub sectors: u64,
    /// Sectors per block (per write request).
    pub block: u64,
    pub pass: u64,
    /// First block not yet known written in `pass`.
    pub next: u64,
    pub completed: u64,
}

/// Reads the status page of the disk workload whose region starts at `base`.
pub fn disk_position(mem: &impl MemoryReader, base: u64) -> Result<DiskPosition, VerifyError> {
    use crate::pattern::{disk_status as st, DISK_MAGIC};
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    read_page(mem, base, &mut buf)?;
    let w: Vec<u64> = words(&buf).collect();
    if w[st::MAGIC] != DISK_MAGIC {
        return Err(VerifyError::NoStatus {
            base,
            found: w[st::MAGIC],
        });
    }
    let pos = w[st::POSITION];
    let p = DiskPosition {
        cpu: w[st::CPU],
        sectors: w[st::SECTORS],
        block: w[st::BLOCK],
        pass: pos >> 32,
        next: pos & 0xffff_ffff,
        completed: w[st::COMPLETED],
    };
    let blocks = p.sectors.checked_div(p.block).unwrap_or(0);
    if p.block == 0 || p.pass == 0 || p.next > blocks || p.completed > p.pass {
        return Err(VerifyError::BadStatus {
            base,
            what: format!("{p:?}"),
        });
    }
    Ok(p)
}

/// Checks a disk image (its first `p.sectors` sectors, read with `read(offset, buf)`) against
/// the disk workload's position: blocks before `next` hold `pass`, blocks after it `pass - 1`,
/// block `next` either (its write may have completed just before the pause).
pub fn verify_disk_image(
    read: impl Fn(u64, &mut [u8]) -> Result<(), String>,
    p: &DiskPosition,
) -> Result<(), VerifyError> {
    use crate::pattern::{disk_word, SECTOR, WORDS_PER_SECTOR};
    let mut buf = vec![0u8; SECTOR as usize];
    for sector in 0..p.sectors {
        let off = sector * SECTOR;
        read(off, &mut buf).map_err(|msg| VerifyError::Read { gpa: off, msg })?;
        let ws: Vec<u64> = words(&buf).collect();
        let block = sector / p.block;
        let holds =
            |pass: u64| (0..WORDS_PER_SECTOR).all(|w| ws[w as usize] == disk_word(sector, pass, w));
        let ok = if block < p.next {
            holds(p.pass)
        } else if block == p.next {
            holds(p.pass) || holds(p.pass - 1)
        } else {
            holds(p.pass - 1)
        };
        if !ok {
            let found_pass = (0..=p.pass + 1).find(|&q| holds(q));
            return Err(VerifyError::Mismatch {
                page: sector,
                gpa: off,
                word: 0,
                expected_pass: if block < p.next { p.pass } else { p.pass - 1 },
                expected: disk_word(sector, p.pass, 0),
                found: ws[0],
                hint: match found_pass {
                    Some(q) => format!(" (sector holds pass {q}: a lost or stale write)"),
                    None => " (sector matches no pass: misplaced or corrupt)".into(),
                },
            });
        }
    }
    Ok(())
}

/// [`verify_disk_image`] over an image already in memory (e.g. `qemu-img convert`'s output).
pub fn verify_disk_bytes(image: &[u8], p: &DiskPosition) -> Result<(), VerifyError> {
    verify_disk_image(
        |off, buf| {
            let src = usize::try_from(off)
                .ok()
                .and_then(|o| image.get(o..o + buf.len()))
                .ok_or_else(|| format!("offset {off} is past the image's {} bytes", image.len()))?;
            buf.copy_from_slice(src);
            Ok(())
        },
        p,
    )
}
