//! A set of guest pages both sides of a post-copy share between threads: which pages the
//! destination still lacks. One bit per 4 KiB page, in atomic 64-bit words so senders,
//! receivers, the fault thread and the demand server claim pages without a lock; claiming a
//! whole word hands a sender the next 64 neighbouring pages at once.
use crate::protocol::{MAX_GUEST_ADDR, PAGE};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct PageSet {
    words: Vec<AtomicU64>,
    count: AtomicU64,
}

const P: u64 = PAGE as u64;

impl PageSet {
    /// The set of `pages` (ascending or not, page-aligned, below [`MAX_GUEST_ADDR`]).
    pub fn from_pages(pages: impl IntoIterator<Item = u64> + Clone) -> Result<Self, String> {
        let end = pages.clone().into_iter().max().map_or(0, |g| g + P);
        let set = Self::with_end(end)?;
        for gpa in pages {
            set.insert(gpa)?;
        }
        Ok(set)
    }

    /// The set of every page of `runs` ((first page, count) pairs).
    pub fn from_runs(runs: &[(u64, u64)]) -> Result<Self, String> {
        let end = runs.iter().map(|&(g, n)| g + n * P).max().unwrap_or(0);
        let set = Self::with_end(end)?;
        for &(gpa, n) in runs {
            set.insert_run(gpa, n)?;
        }
        Ok(set)
    }

    fn with_end(end: u64) -> Result<Self, String> {
        if end > MAX_GUEST_ADDR {
            return Err(format!("page {:#x} is beyond guest memory", end - P));
        }
        let words = end.div_ceil(P * 64) as usize;
        Ok(PageSet {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        })
    }

    fn at(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        let page = gpa / P;
        let w = self.words.get((page / 64) as usize)?;
        Some((w, 1u64 << (page % 64)))
    }

    fn insert(&self, gpa: u64) -> Result<(), String> {
        if !gpa.is_multiple_of(P) {
            return Err(format!("{gpa:#x} is not a page address"));
        }
        let (w, bit) = self
            .at(gpa)
            .ok_or_else(|| format!("page {gpa:#x} out of range"))?;
        if w.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Inserts `n` pages from `gpa`, a word at a time where it can.
    fn insert_run(&self, gpa: u64, n: u64) -> Result<(), String> {
        if !gpa.is_multiple_of(P) {
            return Err(format!("{gpa:#x} is not a page address"));
        }
        let (mut page, end) = (gpa / P, gpa / P + n);
        while page < end {
            let w = self
                .words
                .get((page / 64) as usize)
                .ok_or_else(|| format!("page {:#x} out of range", page * P))?;
            let from = page % 64;
            let k = (64 - from).min(end - page);
            let mask = if k == 64 {
                u64::MAX
            } else {
                ((1u64 << k) - 1) << from
            };
            let old = w.fetch_or(mask, Ordering::SeqCst);
            self.count
                .fetch_add((mask & !old).count_ones() as u64, Ordering::SeqCst);
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

    /// The first word at or after `from` with a page in it.
    pub fn next_word(&self, from: usize) -> Option<usize> {
        (from..self.words.len()).find(|&w| self.words[w].load(Ordering::SeqCst) != 0)
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
        let mut out: Vec<Vec<(u64, u64)>> = vec![Vec::new()];
        for w in 0..self.words.len() {
            let not = except
                .and_then(|e| e.words.get(w))
                .map_or(0, |x| x.load(Ordering::SeqCst));
            let bits = self.words[w].load(Ordering::SeqCst) & !not;
            for gpa in Self::pages_of(w, bits) {
                let cur = out.last_mut().expect("never empty");
                if let Some((start, n)) = cur.last_mut() {
                    if *start + *n * P == gpa {
                        *n += 1;
                        continue;
                    }
                }
                if cur.len() == max {
                    out.push(Vec::new());
                }
                out.last_mut().expect("never empty").push((gpa, 1));
            }
        }
        out
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
}
