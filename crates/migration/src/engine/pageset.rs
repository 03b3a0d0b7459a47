//! A set of guest pages shared between threads: what a pre-copy pass still has to send, or,
//! in post-copy, which pages the destination still lacks. One bit per 4 KiB page, in atomic
//! 64-bit words so senders, receivers, the fault thread and the demand server claim pages
//! without a lock; claiming a whole word hands a sender the next 64 neighbouring pages at once.
//!
//! Cost follows what is in the set, not the size of guest memory: the words are allocated
//! zeroed by the kernel (untouched pages of the bitmap take no memory), and a summary level
//! (one bit per word, set whenever the word may hold a page) lets every scan skip 4096 empty
//! pages (16 MiB of guest memory) per summary bit it finds clear. A 512 GiB guest needs a
//! 16 MiB bitmap when every page is in the set, 32 KiB of summary, and nothing more.
use crate::protocol::{MAX_GUEST_ADDR, PAGE};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct PageSet {
    words: Box<[AtomicU64]>,
    /// Bit `w % 64` of `summary[w / 64]` is set whenever `words[w]` may be non-zero.
    summary: Box<[AtomicU64]>,
    count: AtomicU64,
}

const P: u64 = PAGE as u64;

/// `n` zeroed atomic words, from the kernel's zero pages (no page is touched until written).
fn zeroed(n: usize) -> Box<[AtomicU64]> {
    let b: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64 (documented in
    // std), so a boxed slice of u64 is a valid boxed slice of AtomicU64 of the same length,
    // freed with the same layout.
    unsafe { Box::from_raw(Box::into_raw(b) as *mut [AtomicU64]) }
}

impl PageSet {
    /// An empty set for guest addresses below `end` (at most [`MAX_GUEST_ADDR`]).
    pub fn new(end: u64) -> Result<Self, String> {
        if end > MAX_GUEST_ADDR {
            return Err(format!("page {:#x} is beyond guest memory", end - P));
        }
        let words = end.div_ceil(P * 64) as usize;
        Ok(PageSet {
            words: zeroed(words),
            summary: zeroed(words.div_ceil(64)),
            count: AtomicU64::new(0),
        })
    }

    /// The set of `pages` (ascending or not, page-aligned, below [`MAX_GUEST_ADDR`]).
    pub fn from_pages(pages: impl IntoIterator<Item = u64> + Clone) -> Result<Self, String> {
        let end = pages.clone().into_iter().max().map_or(0, |g| g + P);
        let set = Self::new(end)?;
        for gpa in pages {
            set.insert(gpa)?;
        }
        Ok(set)
    }

    /// The set of every page of `runs` ((first page, count) pairs).
    pub fn from_runs(runs: &[(u64, u64)]) -> Result<Self, String> {
        let end = runs.iter().map(|&(g, n)| g + n * P).max().unwrap_or(0);
        let set = Self::new(end)?;
        for &(gpa, n) in runs {
            set.insert_run(gpa, n)?;
        }
        Ok(set)
    }

    /// Guest addresses this set can hold end here.
    pub fn end(&self) -> u64 {
        self.words.len() as u64 * 64 * P
    }

    fn at(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        let page = gpa / P;
        let w = self.words.get((page / 64) as usize)?;
        Some((w, 1u64 << (page % 64)))
    }

    fn mark(&self, w: usize) {
        if let Some(s) = self.summary.get(w / 64) {
            s.fetch_or(1 << (w % 64), Ordering::SeqCst);
        }
    }

    /// Adds the pages `bits` of word `w` (64 pages from page `w * 64`); false when `w` is out
    /// of range.
    pub fn insert_word(&self, w: usize, bits: u64) -> bool {
        let Some(word) = self.words.get(w) else {
            return bits == 0;
        };
        if bits == 0 {
            return true;
        }
        let old = word.fetch_or(bits, Ordering::SeqCst);
        self.count
            .fetch_add((bits & !old).count_ones() as u64, Ordering::SeqCst);
        self.mark(w);
        true
    }

    /// Adds the pages of `words` (word `first + i` holding pages `64 (first + i) ..`); an error
    /// names the first word with pages beyond the set's end.
    pub fn insert_words(&self, first: usize, words: &[u64]) -> Result<(), String> {
        for (i, &bits) in words.iter().enumerate() {
            if bits != 0 && !self.insert_word(first + i, bits) {
                return Err(format!(
                    "page {:#x} is beyond the page set",
                    (first + i) as u64 * 64 * P
                ));
            }
        }
        Ok(())
    }

    pub fn insert(&self, gpa: u64) -> Result<(), String> {
        if !gpa.is_multiple_of(P) {
            return Err(format!("{gpa:#x} is not a page address"));
        }
        let page = gpa / P;
        if !self.insert_word((page / 64) as usize, 1 << (page % 64)) {
            return Err(format!("page {gpa:#x} out of range"));
        }
        Ok(())
    }

    /// Inserts `n` pages from `gpa`, a word at a time where it can.
    pub fn insert_run(&self, gpa: u64, n: u64) -> Result<(), String> {
        if !gpa.is_multiple_of(P) {
            return Err(format!("{gpa:#x} is not a page address"));
        }
        let (mut page, end) = (gpa / P, gpa / P + n);
        while page < end {
            let from = page % 64;
            let k = (64 - from).min(end - page);
            let mask = if k == 64 {
                u64::MAX
            } else {
                ((1u64 << k) - 1) << from
            };
            if !self.insert_word((page / 64) as usize, mask) {
                return Err(format!("page {:#x} out of range", page * P));
            }
            page += k;
        }
        Ok(())
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, gpa: u64) -> bool {
        self.at(gpa)
            .is_some_and(|(w, bit)| w.load(Ordering::SeqCst) & bit != 0)
    }

    /// Removes `gpa`; true when it was there (this caller claimed it).
    pub fn take(&self, gpa: u64) -> bool {
        let Some((w, bit)) = self.at(gpa) else {
            return false;
        };
        let had = w.fetch_and(!bit, Ordering::SeqCst) & bit != 0;
        if had {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        had
    }

    /// Number of 64-page words.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Word `w` (64 pages from page `w * 64`), of which a caller claims every page at once.
    pub fn take_word(&self, w: usize) -> u64 {
        let Some(word) = self.words.get(w) else {
            return 0;
        };
        let bits = word.swap(0, Ordering::SeqCst);
        if bits != 0 {
            self.count
                .fetch_sub(bits.count_ones() as u64, Ordering::SeqCst);
        }
        bits
    }

    /// Number of groups of 64 words (4096 pages) that [`PageSet::take_group`] claims.
    pub fn groups(&self) -> usize {
        self.summary.len()
    }

    /// Claims every page of group `g` (words `64 g .. 64 g + 64`): calls `f(word, bits)` for
    /// each word with pages in it, in ascending order. Only words the summary names are
    /// looked at.
    pub fn take_group(&self, g: usize, mut f: impl FnMut(usize, u64)) {
        let Some(s) = self.summary.get(g) else {
            return;
        };
        let mut marks = s.swap(0, Ordering::SeqCst);
        while marks != 0 {
            let w = g * 64 + marks.trailing_zeros() as usize;
            marks &= marks - 1;
            let bits = self.take_word(w);
            if bits != 0 {
                f(w, bits);
            }
        }
    }

    /// The first word at or after `from` with a page in it.
    pub fn next_word(&self, from: usize) -> Option<usize> {
        let mut g = from / 64;
        let mut low = from % 64;
        while g < self.summary.len() {
            let s = &self.summary[g];
            let mut marks = s.load(Ordering::SeqCst) & (u64::MAX << low);
            while marks != 0 {
                let b = marks.trailing_zeros();
                marks &= marks - 1;
                let w = g * 64 + b as usize;
                if self.words[w].load(Ordering::SeqCst) != 0 {
                    return Some(w);
                }
                // Stale mark: drop it, unless a page arrived meanwhile (then keep both).
                s.fetch_and(!(1 << b), Ordering::SeqCst);
                if self.words[w].load(Ordering::SeqCst) != 0 {
                    s.fetch_or(1 << b, Ordering::SeqCst);
                    return Some(w);
                }
            }
            g += 1;
            low = 0;
        }
        None
    }

    /// The pages of word `w` named by `bits`.
    pub fn pages_of(w: usize, bits: u64) -> impl Iterator<Item = u64> {
        (0..64u64)
            .filter(move |b| bits & (1 << b) != 0)
            .map(move |b| (w as u64 * 64 + b) * P)
    }

    /// The word holding `gpa`.
    pub fn word_of(gpa: u64) -> usize {
        (gpa / P / 64) as usize
    }

    /// The set as (first page, count) runs, in frames of at most `max` runs.
    pub fn runs(&self, max: usize) -> Vec<Vec<(u64, u64)>> {
        self.runs_except(max, None)
    }

    /// As [`PageSet::runs`], leaving out the pages of `except`.
    pub fn runs_except(&self, max: usize, except: Option<&PageSet>) -> Vec<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let _ = self.for_each_frame(max, except, |f| {
            out.push(f);
            Ok::<_, ()>(())
        });
        if out.is_empty() {
            out.push(Vec::new());
        }
        out
    }

    /// Hands the set (less `except`) to `f` as frames of at most `max` ascending (first page,
    /// count) runs, one frame at a time; stops at the first error. Nothing is removed.
    pub fn for_each_frame<E>(
        &self,
        max: usize,
        except: Option<&PageSet>,
        mut f: impl FnMut(Vec<(u64, u64)>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut cur: Vec<(u64, u64)> = Vec::new();
        let mut w = 0;
        while let Some(x) = self.next_word(w) {
            w = x + 1;
            let not = except
                .and_then(|e| e.words.get(x))
                .map_or(0, |v| v.load(Ordering::SeqCst));
            let mut bits = self.words[x].load(Ordering::SeqCst) & !not;
            while bits != 0 {
                // A run of consecutive set bits inside this word.
                let b = bits.trailing_zeros() as u64;
                let len = (!(bits >> b)).trailing_zeros() as u64;
                bits &= if b + len >= 64 {
                    0
                } else {
                    u64::MAX << (b + len)
                };
                let gpa = (x as u64 * 64 + b) * P;
                if let Some((start, n)) = cur.last_mut() {
                    if *start + *n * P == gpa {
                        *n += len;
                        continue;
                    }
                }
                if cur.len() == max {
                    f(std::mem::take(&mut cur))?;
                }
                cur.push((gpa, len));
            }
        }
        if !cur.is_empty() {
            f(cur)?;
        }
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_and_counted() {
        let s = PageSet::from_runs(&[(0, 3), (P * 70, 2)]).unwrap();
        assert_eq!(s.len(), 5);
        assert!(s.contains(P) && !s.contains(P * 3));
        assert!(s.take(P));
        assert!(!s.take(P), "a page is claimed once");
        assert_eq!(s.len(), 4);
        let bits = s.take_word(0);
        assert_eq!(
            PageSet::pages_of(0, bits).collect::<Vec<_>>(),
            vec![0, 2 * P]
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s.next_word(0), Some(1));
        assert_eq!(s.runs(10), vec![vec![(P * 70, 2)]]);
        let s = PageSet::from_runs(&[(P * 5, 1), (P * 70, 2)]).unwrap();
        assert_eq!(s.runs(1), vec![vec![(P * 5, 1)], vec![(P * 70, 2)]]);
        assert!(PageSet::from_runs(&[(MAX_GUEST_ADDR, 1)]).is_err());
        assert!(PageSet::from_pages([4097]).is_err());
        assert!(PageSet::from_pages(std::iter::empty()).unwrap().is_empty());
        // Runs across word boundaries, overlapping: counted once each.
        let s = PageSet::from_runs(&[(P * 60, 200), (P * 100, 10), (P * 300, 1)]).unwrap();
        assert_eq!(s.len(), 201);
        assert!(s.contains(P * 60) && s.contains(P * 259) && !s.contains(P * 260));
        assert_eq!(s.runs(10), vec![vec![(P * 60, 200), (P * 300, 1)]]);
        let old = PageSet::from_runs(&[(P * 70, 100)]).unwrap();
        assert_eq!(
            s.runs_except(10, Some(&old)),
            vec![vec![(P * 60, 10), (P * 170, 90), (P * 300, 1)]]
        );
    }

    fn rss() -> u64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    }

    #[test]
    fn a_512_gib_set_costs_what_is_in_it() {
        let before = rss();
        let s = PageSet::new(513 << 30).unwrap();
        // Pages far apart: one word and one summary word touched each.
        for g in [0u64, 7 << 30, 300 << 30, 512 << 30] {
            s.insert_run(g, 3).unwrap();
        }
        assert!(
            rss() - before < 4 << 20,
            "grew {} KiB",
            (rss() - before) >> 10
        );
        assert_eq!(s.len(), 12);
        assert_eq!(s.next_word(1), Some(PageSet::word_of(7 << 30)));
        let frames = s.runs(2);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], vec![(0, 3), (7 << 30, 3)]);
        // Claiming by groups finds exactly the words with pages.
        let mut got = Vec::new();
        for g in 0..s.groups() {
            s.take_group(g, |w, bits| got.push((w, bits)));
        }
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|&(_, b)| b == 0b111));
        assert!(s.is_empty() && s.next_word(0).is_none());
        // A run spanning words comes back as one run; a full word as 64 pages.
        let s = PageSet::new(1 << 20).unwrap();
        s.insert_run(P * 60, 70).unwrap();
        assert!(s.insert_word(3, u64::MAX));
        assert!(!s.insert_word(1 << 20, 1), "beyond the end");
        assert_eq!(s.runs(10), vec![vec![(P * 60, 70), (P * 192, 64)]]);
    }
}
