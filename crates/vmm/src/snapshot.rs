//! Snapshots of a VM to a directory (format: ferry-snapshot, docs/snapshot-format.md) and
//! restore from one, mapping memory files privately so time-to-running does not grow with
//! memory size.
use crate::memory::{DirtyBitmap, RangeBitmap, PAGE_SIZE};
use crate::vm::{RunState, Vm, VmError, VmState};
use ferry_snapshot::{FormatError, ParentRef, RunData, Snapshot, Writer, MAX_RUN_PAGES};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot snapshot: the VM is {0} (pause it first)")]
    NotPaused(RunState),
    #[error("--diff needs a previous snapshot of this VM (taken or restored by this process)")]
    NoParent,
    #[error("a diff snapshot cannot replace its parent in {0}")]
    SameDir(PathBuf),
    #[error("state in {dir}: {what}")]
    State { dir: PathBuf, what: String },
    #[error("mapping guest memory from {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the VM's memory is still being loaded and checked from its snapshot (--lazy-check): try again in a moment")]
    Loading,
    #[error("a live snapshot copies a running VM; this one is {0} (take a plain snapshot)")]
    NotRunning(RunState),
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    pub id: u64,
    pub diff: bool,
    pub pages_stored: u64,
    pub zero_pages: u64,
    pub bytes_stored: u64,
    pub state_bytes: u64,
    pub elapsed_ms: f64,
    /// Finding the pages and writing them (to the page cache).
    pub scan_write_ms: f64,
    /// fsync of the memory file.
    pub sync_ms: f64,
    /// Reading the memory file back and checking its CRCs.
    pub verify_ms: f64,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreReport {
    pub chain: usize,
    pub runs_mapped: u64,
    pub bytes_mapped: u64,
    pub memory_verified_before_start: bool,
    /// From the start of the restore to a VM ready to run (memory mapped, state loaded).
    pub ready_ms: f64,
}

/// How a VM relates to snapshots: the last one taken or restored (the parent of a `--diff`),
/// and the guest ranges backed by snapshot files (mincore cannot see those pages).
#[derive(Debug, Default)]
pub struct SnapshotTrack {
    pub last: Option<(u64, PathBuf)>,
    pub file_backed: Vec<(u64, u64)>,
    /// Set while a lazy restore still loads memory (`MemoryCheck::Background`).
    pub loading: Option<Arc<AtomicBool>>,
}

pub(crate) fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The parent reference as stored: relative ("../name") when parent and child are siblings,
/// and ("name") when the parent lies inside the child's directory (a live snapshot's
/// rounds), so a directory of snapshots can move between hosts as a whole.
pub(crate) fn parent_ref(child: &Path, parent: &Path, id: u64) -> ParentRef {
    let (c, p) = (absolute(child), absolute(parent));
    // Relative when they meet at most two levels above the child: inside it ("name"),
    // beside it ("../name"), or beside its directory ("../../name": a seed update's rounds
    // and the seed it updates).
    let mut up = PathBuf::new();
    let mut at = c.as_path();
    for _ in 0..=2 {
        if let Ok(rest) = p.strip_prefix(at) {
            if !rest.as_os_str().is_empty() && at.parent().is_some() {
                return ParentRef {
                    dir: up.join(rest),
                    id,
                };
            }
        }
        match at.parent() {
            Some(a) => at = a,
            None => break,
        }
        up.push("..");
    }
    ParentRef { dir: p, id }
}

/// Pages resident in the VM's anonymous memory (mincore), plus file-backed ranges.
pub(crate) fn populated(vm: &Vm) -> Result<DirtyBitmap, SnapshotError> {
    let mut out = DirtyBitmap::default();
    let track = vm.snapshot_track();
    for region in vm.memory().iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let host = vm
            .host_address(start)
            .ok_or_else(|| std::io::Error::other("region without mapping"))?;
        const CHUNK: u64 = 1 << 18; // pages per mincore call (1 GiB)
        let mut vec = vec![0u8; CHUNK as usize];
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(CHUNK);
            // SAFETY: host + first*4K .. + n*4K lies inside this region's mapping; `vec` has
            // room for one byte per page.
            let r = unsafe {
                libc::mincore(
                    host.add((first * PAGE_SIZE) as usize).cast(),
                    (n * PAGE_SIZE) as usize,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            for (i, &b) in vec[..n as usize].iter().enumerate() {
                if b & 1 != 0 {
                    let p = first + i as u64;
                    bits[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            first += n;
        }
        for &(gpa, count) in &track.file_backed {
            for p in (gpa..gpa + count * PAGE_SIZE).step_by(PAGE_SIZE as usize) {
                if p >= start && p < start + region.len() {
                    let i = (p - start) / PAGE_SIZE;
                    bits[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
        }
        out.ranges.push(RangeBitmap { start, pages, bits });
    }
    Ok(out)
}

/// Host view of one guest page.
fn page(vm: &Vm, gpa: u64) -> Result<&[u8], SnapshotError> {
    pages_at(vm, gpa, 1)
}

/// Host view of `n` consecutive guest pages of one RAM range.
fn pages_at(vm: &Vm, gpa: u64, n: u32) -> Result<&[u8], SnapshotError> {
    let len = n as u64 * PAGE_SIZE;
    let region = vm
        .memory()
        .find_region(GuestAddress(gpa))
        .filter(|r| gpa + len <= r.start_addr().0 + r.len())
        .ok_or_else(|| {
            std::io::Error::other(format!("{len} bytes at {gpa:#x} not in guest memory"))
        })?;
    let p = region
        .get_host_address(vm_memory::MemoryRegionAddress(gpa - region.start_addr().0))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // SAFETY: the range lies inside one guest memory mapping owned by `vm` (checked above),
    // and the VM is paused (no vCPU writes while the slice lives).
    Ok(unsafe { std::slice::from_raw_parts(p, len as usize) })
}

impl Vm {
    /// A lazy restore is still loading (and checking) this VM's memory: snapshots and
    /// migrations, which read all of it, must wait.
    pub fn memory_loading(&self) -> bool {
        self.snapshot_track()
            .loading
            .as_ref()
            .is_some_and(|l| l.load(Ordering::SeqCst))
    }
}

impl Vm {
    /// Writes a snapshot of this (paused) VM to `dir`. With `diff`, only pages dirtied since
    /// the previous snapshot (taken or restored here) are stored.
    pub fn snapshot(&self, dir: &Path, diff: bool) -> Result<SnapshotReport, SnapshotError> {
        let t0 = Instant::now();
        let st = self.state();
        if !matches!(st, RunState::Paused | RunState::Created) {
            return Err(SnapshotError::NotPaused(st));
        }
        if self.memory_loading() {
            return Err(SnapshotError::Loading);
        }
        let last = self.snapshot_track().last.clone();
        let parent = match (diff, &last) {
            (false, _) => None,
            (true, None) => return Err(SnapshotError::NoParent),
            (true, Some((id, pdir))) => {
                if absolute(dir) == absolute(pdir) {
                    return Err(SnapshotError::SameDir(dir.to_path_buf()));
                }
                Some(parent_ref(dir, pdir, *id))
            }
        };
        if diff && !self.dirty_logging() {
            return Err(SnapshotError::NoParent);
        }
        let state = postcard::to_stdvec(&self.save_state()?).map_err(|e| SnapshotError::State {
            dir: dir.into(),
            what: e.to_string(),
        })?;
        // Clears the log either way, so the next diff starts here.
        let dirty = if self.dirty_logging() {
            Some(self.fetch_dirty()?)
        } else {
            None
        };
        let pages = match (diff, dirty) {
            (true, Some(d)) => d,
            _ => populated(self)?,
        };
        let t_scan = Instant::now();
        let mut w = Writer::create(dir)?;
        let (mut stored, mut zeros) = (0u64, 0u64);
        // Runs of consecutive pages: data runs are written straight from guest memory (one
        // region is one contiguous mapping); zero runs are recorded only in diffs.
        let mut data_run: Option<(u64, u32)> = None;
        let mut zero_run: Option<(u64, u32)> = None;
        for gpa in pages.pages() {
            let is_zero = ferry_migration::protocol::is_zero_page(page(self, gpa)?);
            if let Some((s, n)) = data_run {
                if is_zero || gpa != s + n as u64 * PAGE_SIZE || n >= MAX_RUN_PAGES {
                    w.add_pages(s, pages_at(self, s, n)?)?;
                    data_run = None;
                }
            }
            if let Some((s, n)) = zero_run {
                if !is_zero || gpa != s + n as u64 * PAGE_SIZE || n >= MAX_RUN_PAGES {
                    w.add_zero(s, n);
                    zero_run = None;
                }
            }
            let run = match (is_zero, diff) {
                (false, _) => &mut data_run,
                (true, true) => &mut zero_run,
                (true, false) => continue,
            };
            *run = Some(match *run {
                Some((s, n)) => (s, n + 1),
                None => (gpa, 1),
            });
            if is_zero {
                zeros += 1;
            } else {
                stored += 1;
            }
        }
        if let Some((s, n)) = data_run {
            w.add_pages(s, pages_at(self, s, n)?)?;
        }
        if let Some((s, n)) = zero_run {
            w.add_zero(s, n);
        }
        let scan_ms = t_scan.elapsed().as_secs_f64() * 1e3;
        let written = w.finish(parent, &state)?;
        let meta = written.meta;
        if !self.dirty_logging() {
            self.start_dirty_log()?;
        }
        self.snapshot_track().last = Some((meta.id, absolute(dir)));
        Ok(SnapshotReport {
            dir: dir.to_path_buf(),
            id: meta.id,
            diff,
            pages_stored: stored,
            zero_pages: zeros,
            bytes_stored: stored * PAGE_SIZE,
            state_bytes: state.len() as u64,
            elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
            scan_write_ms: scan_ms,
            sync_ms: written.sync_ms,
            verify_ms: written.verify_ms,
        })
    }
}

/// Maps every run of a snapshot chain over guest memory (base first; later diffs win).
/// A stretch of guest memory to map with one mmap: consecutive runs of one snapshot that are
/// contiguous in guest memory and (for data) in the file.
struct Stretch {
    gpa: u64,
    pages: u64,
    data: RunData,
}

fn coalesce(runs: &[ferry_snapshot::Run]) -> Vec<Stretch> {
    let mut out: Vec<Stretch> = Vec::new();
    for r in runs {
        if let Some(last) = out.last_mut() {
            let next_gpa = last.gpa + last.pages * PAGE_SIZE;
            let joins = r.gpa == next_gpa
                && match (last.data, r.data) {
                    (RunData::Zero, RunData::Zero) => true,
                    (RunData::File { offset: a, .. }, RunData::File { offset: b, .. }) => {
                        b == a + last.pages * PAGE_SIZE
                    }
                    _ => false,
                };
            if joins {
                last.pages += r.pages as u64;
                continue;
            }
        }
        out.push(Stretch {
            gpa: r.gpa,
            pages: r.pages as u64,
            data: r.data,
        });
    }
    out
}

fn map_chain(
    mem: &crate::GuestMem,
    chain: &[Snapshot],
    mapped: &mut Vec<(u64, u64)>,
) -> Result<(), SnapshotError> {
    for snap in chain {
        let path = snap.memory_path();
        let file = std::fs::File::open(&path).map_err(|source| SnapshotError::Map {
            path: path.clone(),
            source,
        })?;
        for r in coalesce(&snap.runs) {
            let len = r.pages * PAGE_SIZE;
            let region = mem
                .find_region(GuestAddress(r.gpa))
                .filter(|reg| r.gpa + len <= reg.start_addr().0 + reg.len())
                .ok_or_else(|| SnapshotError::State {
                    dir: snap.dir.clone(),
                    what: format!("memory run at {:#x} lies outside guest memory", r.gpa),
                })?;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(
                    r.gpa - region.start_addr().0,
                ))
                .map_err(|e| SnapshotError::State {
                    dir: snap.dir.clone(),
                    what: e.to_string(),
                })?;
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: [host, host+len) lies inside a guest memory mapping owned by the VM
            // being built (checked above); MAP_FIXED replaces those pages with a private
            // (copy-on-write) view of the file, or fresh zero pages. No vCPU runs yet.
            let p = unsafe {
                match r.data {
                    RunData::File { offset, .. } => libc::mmap(
                        host.cast(),
                        len as usize,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        file.as_raw_fd(),
                        offset as libc::off_t,
                    ),
                    RunData::Zero => libc::mmap(
                        host.cast(),
                        len as usize,
                        prot,
                        libc::MAP_PRIVATE
                            | libc::MAP_FIXED
                            | libc::MAP_ANONYMOUS
                            | libc::MAP_NORESERVE,
                        -1,
                        0,
                    ),
                }
            };
            if p == libc::MAP_FAILED {
                return Err(SnapshotError::Map {
                    path: path.clone(),
                    source: std::io::Error::last_os_error(),
                });
            }
            mapped.push((r.gpa, r.pages));
        }
    }
    Ok(())
}

/// How restore checks memory data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    /// Every run's CRC before anything starts (default).
    BeforeStart,
    /// After start, in the background; a bad run stops the VM with an error.
    Background,
}

/// Rebuilds a VM from the snapshot (chain) in `dir`. The VM is `created`; `start` runs it.
pub fn restore(
    dir: &Path,
    console: Box<dyn Write + Send>,
    check: MemoryCheck,
) -> Result<(Vm, RestoreReport), SnapshotError> {
    let t0 = Instant::now();
    let chain = Snapshot::chain(dir)?;
    tracing::debug!("restore: chain read in {:?}", t0.elapsed());
    if check == MemoryCheck::BeforeStart {
        for s in &chain {
            s.verify_memory()?;
        }
        tracing::debug!("restore: memory verified at {:?}", t0.elapsed());
    }
    let leaf = chain.last().ok_or_else(|| SnapshotError::State {
        dir: dir.into(),
        what: "empty chain".into(),
    })?;
    let state: VmState = postcard::from_bytes(&leaf.state).map_err(|e| SnapshotError::State {
        dir: dir.into(),
        what: format!("STATE does not decode: {e}"),
    })?;
    let mut mapped = Vec::new();
    let incoming = Vm::incoming(&state.config)?;
    if check == MemoryCheck::BeforeStart {
        map_chain(incoming.memory(), &chain, &mut mapped)?;
    }
    let vm = incoming.finish(&state, console)?;
    if check == MemoryCheck::Background {
        // Each run is checked when first touched, before the guest can read it.
        let lazy = crate::lazy::start(vm.memory(), &chain, vm.abort_handle())?;
        vm.snapshot_track().loading = Some(lazy.loading);
    }
    tracing::debug!("restore: VM rebuilt at {:?}", t0.elapsed());
    {
        let mut t = vm.snapshot_track();
        t.last = Some((leaf.meta.id, absolute(dir)));
        t.file_backed = mapped.clone();
    }
    vm.start_dirty_log()?;
    tracing::debug!("restore: dirty log on at {:?}", t0.elapsed());
    let report = RestoreReport {
        chain: chain.len(),
        runs_mapped: mapped.len() as u64,
        bytes_mapped: mapped.iter().map(|r| r.1 * PAGE_SIZE).sum(),
        memory_verified_before_start: check == MemoryCheck::BeforeStart,
        ready_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    Ok((vm, report))
}
