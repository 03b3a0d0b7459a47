//! Restore with the memory check after start (`ferry restore --lazy-check`) that never lets
//! the guest read a corrupt page: guest RAM starts empty and registered with userfaultfd. The
//! first touch of a page (by a vCPU, or by the VMM) faults here; the memory run holding it is
//! read from its snapshot file, its CRC checked, and only then are its pages installed. A
//! background thread does the same for every run, newest snapshot of the chain first, so
//! memory is complete soon whatever the guest touches. A run that fails its CRC stops the VM
//! before anything of it is installed: the vCPU that touched it never runs another
//! instruction (its fault wait is interrupted by the stop's kick, and KVM does not re-enter
//! the guest with a signal pending). Pages no snapshot holds are zero.
use crate::uffd::MissingPages;
use crate::vcpu::GuestExit;
use crate::vm::AbortHandle;
use crate::GuestMem;
use ferry_snapshot::{Run, RunData, Snapshot, PAGE};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Pages installed per ioctl.
const CHUNK: u64 = 64;

/// One snapshot of the chain: its runs sorted by address and its memory file.
struct Layer {
    runs: Vec<Run>,
    file: std::fs::File,
    name: String,
}

struct Loader {
    layers: Vec<Layer>,
    pages: MissingPages,
    abort: AbortHandle,
    failed: AtomicBool,
    /// Keeps guest RAM mapped while the loader runs.
    _mem: GuestMem,
}

/// A lazy load in progress: `loading` stays true until every run is in (or the load failed).
pub struct LazyLoad {
    pub loading: Arc<AtomicBool>,
}

impl Loader {
    /// The newest layer with a run holding `gpa`, and that run's index.
    fn provider(&self, gpa: u64) -> Option<(usize, usize)> {
        self.provider_from(self.layers.len(), gpa)
    }

    fn provider_from(&self, below: usize, gpa: u64) -> Option<(usize, usize)> {
        (0..below).rev().find_map(|l| {
            let runs = &self.layers[l].runs;
            let i = runs.partition_point(|r| r.gpa <= gpa).checked_sub(1)?;
            let r = &runs[i];
            (gpa < r.gpa + r.pages as u64 * PAGE).then_some((l, i))
        })
    }

    /// True when no layer newer than `layer` holds `gpa` (this layer's copy is the one).
    fn current(&self, layer: usize, gpa: u64) -> bool {
        !((layer + 1)..self.layers.len()).any(|l| {
            let runs = &self.layers[l].runs;
            runs.partition_point(|r| r.gpa <= gpa)
                .checked_sub(1)
                .is_some_and(|i| gpa < runs[i].gpa + runs[i].pages as u64 * PAGE)
        })
    }

    fn fail(&self, why: String) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!("{why}");
            self.abort.abort(GuestExit::Crashed { reason: why });
        }
    }

    /// Reads, checks and installs run `ri` of `layer` (the pages of it no newer layer has).
    fn load(&self, layer: usize, ri: usize, buf: &mut Vec<u8>) -> Result<(), String> {
        let l = &self.layers[layer];
        let r = l.runs[ri];
        let len = r.pages as u64 * PAGE;
        let only_here = |p: u64| self.current(layer, p);
        match r.data {
            RunData::Zero => {
                for k in 0..r.pages as u64 {
                    let p = r.gpa + k * PAGE;
                    if only_here(p) {
                        self.pages.install_zero(p).map_err(|e| e.to_string())?;
                    }
                }
            }
            RunData::File { offset, crc } => {
                buf.resize(len as usize, 0);
                l.file
                    .read_exact_at(buf, offset)
                    .map_err(|e| format!("reading {}: {e}", l.name))?;
                if crc32c::crc32c(buf) != crc {
                    return Err(format!(
                        "snapshot memory is corrupt: CRC mismatch in the memory run at gpa \
                         {:#x} of {}; the VM was stopped before reading it",
                        r.gpa, l.name
                    ));
                }
                if self.failed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let mut k = 0;
                while k < r.pages as u64 {
                    let n = CHUNK.min(r.pages as u64 - k);
                    let gpa = r.gpa + k * PAGE;
                    let data = &buf[(k * PAGE) as usize..((k + n) * PAGE) as usize];
                    if (0..n).all(|j| only_here(gpa + j * PAGE)) {
                        self.pages
                            .install_run(gpa, data)
                            .map_err(|e| e.to_string())?;
                    } else {
                        for j in 0..n {
                            if only_here(gpa + j * PAGE) {
                                let page = &data[(j * PAGE) as usize..((j + 1) * PAGE) as usize];
                                self.pages
                                    .install(gpa + j * PAGE, page)
                                    .map_err(|e| e.to_string())?;
                            }
                        }
                    }
                    k += n;
                }
            }
        }
        Ok(())
    }

    /// Serves faults until `stop`.
    fn faults(&self, stop: &AtomicBool) {
        let mut buf = Vec::new();
        while !stop.load(Ordering::SeqCst) && !self.failed.load(Ordering::SeqCst) {
            let gpa = match self.pages.next_fault(Duration::from_millis(20)) {
                Ok(Some(g)) => g & !(PAGE - 1),
                Ok(None) => continue,
                Err(e) => return self.fail(format!("lazy restore: {e}")),
            };
            let r = match self.provider(gpa) {
                Some((l, i)) => self.load(l, i, &mut buf),
                None => self
                    .pages
                    .install_zero(gpa)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = r {
                return self.fail(e);
            }
        }
    }

    /// Loads every run, newest layer first; true when all are in.
    fn background(&self) -> bool {
        let mut buf = Vec::new();
        for layer in (0..self.layers.len()).rev() {
            for ri in 0..self.layers[layer].runs.len() {
                if self.failed.load(Ordering::SeqCst) {
                    return false;
                }
                if let Err(e) = self.load(layer, ri, &mut buf) {
                    self.fail(e);
                    return false;
                }
            }
        }
        true
    }
}

/// Registers `mem` (empty, VM not started) and starts loading `chain` into it as described
/// above.
pub(crate) fn start(
    mem: &GuestMem,
    chain: &[Snapshot],
    abort: AbortHandle,
) -> Result<LazyLoad, crate::snapshot::SnapshotError> {
    let mut layers = Vec::new();
    for s in chain {
        let path = s.memory_path();
        let file =
            std::fs::File::open(&path).map_err(|source| crate::snapshot::SnapshotError::Map {
                path: path.clone(),
                source,
            })?;
        let mut runs = s.runs.clone();
        runs.sort_by_key(|r| r.gpa);
        layers.push(Layer {
            runs,
            file,
            name: path.display().to_string(),
        });
    }
    let pages = MissingPages::register(mem)
        .map_err(|e| crate::snapshot::SnapshotError::Io(std::io::Error::other(e.to_string())))?;
    let loader = Arc::new(Loader {
        layers,
        pages,
        abort,
        failed: AtomicBool::new(false),
        _mem: mem.clone(),
    });
    let loading = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let (l, s) = (loader.clone(), stop.clone());
    let faults = std::thread::Builder::new()
        .name("lazy-faults".into())
        .spawn(move || l.faults(&s))?;
    let done = loading.clone();
    std::thread::Builder::new()
        .name("lazy-load".into())
        .spawn(move || {
            let complete = loader.background();
            if complete {
                tracing::debug!("lazy restore: memory complete and verified");
            } else {
                // The VM is being stopped: its kick interrupts a vCPU waiting at its fault,
                // and a vCPU with the kick pending does not re-enter the guest. Give it a
                // moment before the registration goes.
                std::thread::sleep(Duration::from_millis(50));
            }
            // Unregistered from here: what still faults are pages no snapshot holds (zero).
            stop.store(true, Ordering::SeqCst);
            let _ = faults.join();
            drop(loader);
            done.store(false, Ordering::SeqCst);
        })?;
    Ok(LazyLoad { loading })
}
