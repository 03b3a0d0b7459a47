//! A snapshot of a running VM (`ferry snapshot --live`, `ferry seed create`; docs/seeding.md).
//!
//! Memory is copied while the guest runs, in rounds, each a snapshot of its own in a
//! subdirectory of DIR: `base` (every populated page), then `r1`, `r2`, ... (the pages the
//! guest wrote during the round before, which the dirty log caught). Once a round leaves
//! little (at most [`PAUSE_BYTES`]) or after [`MAX_ROUNDS`], the VM pauses for the last diff,
//! written to DIR itself with the VM's state, and runs on. DIR is then the leaf of a chain
//! whose memory is that of the instant of the pause: a consistent point-in-time copy, which
//! `ferry restore` runs and `ferry receive --seed` takes, and whose directory moves as a whole
//! (the parents are named relative to it). The rounds carry no state: alone they restore
//! nothing.
use crate::memory::{DirtyBitmap, PAGE_SIZE};
use crate::snapshot::{absolute, parent_ref, populated, SnapshotError};
use crate::vm::{RunState, Vm};
use ferry_snapshot::{ParentRef, Writer, MAX_RUN_PAGES};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

/// Rounds copied while the guest runs, at most.
pub const MAX_ROUNDS: usize = 4;
/// What may be left for the pause: copying stops once a round leaves at most this much.
pub const PAUSE_BYTES: u64 = 16 << 20;

/// One round of a live snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveRound {
    pub dir: PathBuf,
    pub pages_stored: u64,
    pub ms: f64,
}

/// What a live snapshot wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveSnapshotReport {
    pub dir: PathBuf,
    pub id: u64,
    /// The rounds copied while the guest ran.
    pub rounds: Vec<LiveRound>,
    /// Pages written during the pause (the last diff).
    pub paused_pages: u64,
    /// How long the guest was paused.
    pub paused_ms: f64,
    pub state_bytes: u64,
    pub elapsed_ms: f64,
}

/// Pages in `a` or `b` (bitmaps of the same VM).
fn union(mut a: DirtyBitmap, b: &DirtyBitmap) -> DirtyBitmap {
    for (x, y) in a.ranges.iter_mut().zip(&b.ranges) {
        for (w, v) in x.bits.iter_mut().zip(&y.bits) {
            *w |= v;
        }
    }
    a
}

/// Writes the pages of `pages` into a snapshot in `dir` (with `state`, and `parent`): data
/// runs copied out of guest memory (the guest may be writing: a copy races only with writes
/// the dirty log catches), zero runs recorded in diffs. Returns its id and pages stored.
fn write_pages(
    vm: &Vm,
    dir: &Path,
    pages: &DirtyBitmap,
    parent: Option<ParentRef>,
    state: &[u8],
) -> Result<(u64, u64), SnapshotError> {
    let diff = parent.is_some();
    let mut w = Writer::create(dir)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut run: Vec<u8> = Vec::with_capacity((MAX_RUN_PAGES as u64 * PAGE_SIZE) as usize);
    let mut run_at = 0u64;
    let mut zero_run: Option<(u64, u32)> = None;
    let mut stored = 0u64;
    let next_of = |at: u64, bytes: usize| at + bytes as u64;
    for gpa in pages.pages() {
        vm.memory()
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(format!("page {gpa:#x}: {e}")))?;
        let zero = ferry_migration::protocol::is_zero_page(&page);
        let full = run.len() as u64 >= MAX_RUN_PAGES as u64 * PAGE_SIZE;
        if !run.is_empty() && (zero || gpa != next_of(run_at, run.len()) || full) {
            w.add_pages(run_at, &run)?;
            run.clear();
        }
        if let Some((s, n)) = zero_run {
            if !zero || gpa != s + n as u64 * PAGE_SIZE || n >= MAX_RUN_PAGES {
                w.add_zero(s, n);
                zero_run = None;
            }
        }
        if zero {
            if diff {
                zero_run = Some(zero_run.map_or((gpa, 1), |(s, n)| (s, n + 1)));
            }
            continue;
        }
        if run.is_empty() {
            run_at = gpa;
        }
        run.extend_from_slice(&page);
        stored += 1;
    }
    if !run.is_empty() {
        w.add_pages(run_at, &run)?;
    }
    if let Some((s, n)) = zero_run {
        w.add_zero(s, n);
    }
    let written = w.finish(parent, state)?;
    Ok((written.meta.id, stored))
}

impl Vm {
    /// The id of this VM's last snapshot or seed when every page written since it is in the
    /// dirty log: KVM's manual protection (which keeps the log until pages are re-armed)
    /// with a baseline unbroken since (a migration, or a failed seed, breaks it).
    pub fn seed_baseline(&self) -> Option<u64> {
        if !self.manual_dirty_log() || !self.dirty_logging() {
            return None;
        }
        self.snapshot_track().last.as_ref().map(|(id, _)| *id)
    }

    /// Writes a snapshot of this running VM to `dir` while it runs, pausing it only for the
    /// last diff (see the module's header). With `update`, only what the guest wrote since
    /// this VM's last snapshot or seed (taken or restored here) is copied, the chain going on
    /// from it (a seed update). Any failure leaves the VM running.
    pub fn snapshot_live(
        &self,
        dir: &Path,
        update: bool,
    ) -> Result<LiveSnapshotReport, SnapshotError> {
        let t0 = Instant::now();
        let st = self.state();
        if st != RunState::Running {
            return Err(SnapshotError::NotRunning(st));
        }
        if self.memory_loading() {
            return Err(SnapshotError::Loading);
        }
        let last = self.snapshot_track().last.clone();
        let mut parent: Option<(u64, PathBuf)> = match (update, last) {
            (false, _) => None,
            (true, Some((id, p))) if self.dirty_logging() => {
                if absolute(dir) == absolute(&p) {
                    return Err(SnapshotError::SameDir(dir.to_path_buf()));
                }
                Some((id, p))
            }
            (true, _) => return Err(SnapshotError::NoParent),
        };
        if !self.dirty_logging() {
            self.start_dirty_log()?;
        }
        // From here every write shows in the next fetch. What the log held is what changed
        // since the last snapshot: an update's first round; otherwise dropped, and with it
        // that snapshot's diff baseline, gone until this one is done.
        let since_last = self.fetch_dirty()?;
        self.snapshot_track().last = None;
        let mut pages = if update { since_last } else { populated(self)? };
        let mut rounds = Vec::new();
        for round in 0..MAX_ROUNDS {
            let t = Instant::now();
            let sub = dir.join(if round == 0 {
                "base".to_string()
            } else {
                format!("r{round}")
            });
            let pref = parent.as_ref().map(|(id, p)| parent_ref(&sub, p, *id));
            let (id, stored) = write_pages(self, &sub, &pages, pref, &[])?;
            parent = Some((id, absolute(&sub)));
            rounds.push(LiveRound {
                dir: sub,
                pages_stored: stored,
                ms: t.elapsed().as_secs_f64() * 1e3,
            });
            pages = self.fetch_dirty()?;
            if pages.count() * PAGE_SIZE <= PAUSE_BYTES {
                break;
            }
        }
        let (pid, pdir) = parent.ok_or_else(|| std::io::Error::other("no round was copied"))?;
        let t_pause = Instant::now();
        self.pause()?;
        let last = (|| {
            let more = self.fetch_dirty()?;
            let pages = union(pages, &more);
            let state =
                postcard::to_stdvec(&self.save_state()?).map_err(|e| SnapshotError::State {
                    dir: dir.into(),
                    what: e.to_string(),
                })?;
            let pref = parent_ref(dir, &pdir, pid);
            let (id, stored) = write_pages(self, dir, &pages, Some(pref), &state)?;
            Ok::<_, SnapshotError>((id, stored, state.len() as u64))
        })();
        let resumed = self.resume();
        let paused_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        let (id, paused_pages, state_bytes) = last?;
        resumed?;
        self.snapshot_track().last = Some((id, absolute(dir)));
        Ok(LiveSnapshotReport {
            dir: dir.to_path_buf(),
            id,
            rounds,
            paused_pages,
            paused_ms,
            state_bytes,
            elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }
}
