//! Live migration of a KVM VM: the ferry-migration engine's `SourceVm` and `DestinationVm`
//! implemented on [`Vm`] and [`Incoming`].
use crate::memory::GuestMem;
use crate::uffd::MissingPages;
use crate::vm::{Incoming, RunState, Vm, VmConfig, VmState};
use ferry_migration::engine::{CommitHold, DestinationVm, PageSet, SourceVm};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// A running (or paused) VM as a migration source.
pub struct LiveSource<'a> {
    vm: &'a Vm,
    was_paused: bool,
    was_logging: bool,
    /// Disks and taps being let go since the pause (flushes overlap the last pass).
    releasing: Mutex<Option<crate::devices::Release>>,
    /// The disks' mirrors of a shared-nothing migration.
    disks: crate::live_storage::SourceDisks,
    before_commit: Option<BeforeCommit<'a>>,
    /// When the VM's devices let go of their backends for the switch-over (the taps read
    /// out: what reaches them after this never got into the VM's state).
    paused_at: Mutex<Option<Instant>>,
}

type BeforeCommit<'a> = Box<dyn Fn(Instant) -> Result<(), CommitHold> + Sync + 'a>;

impl<'a> LiveSource<'a> {
    pub fn new(vm: &'a Vm) -> Self {
        LiveSource {
            vm,
            was_paused: vm.state() == RunState::Paused,
            was_logging: vm.dirty_logging(),
            releasing: Mutex::new(None),
            disks: Default::default(),
            before_commit: None,
            paused_at: Mutex::new(None),
        }
    }

    /// Has `f` decide, at the switch-over right before Commit, whether the VM may go
    /// ([`SourceVm::before_commit`]): a cluster hands its ownership over there. `f` is told
    /// when the devices let go of their backends (what reached the NICs' taps before is in
    /// the VM's state; what reached them since never got to the guest).
    pub fn before_commit(
        mut self,
        f: impl Fn(Instant) -> Result<(), CommitHold> + Sync + 'a,
    ) -> Self {
        self.before_commit = Some(Box::new(f));
        self
    }

    /// Waits for the backends' release begun at the pause, if one was.
    fn released(&self) -> Result<(), String> {
        let r = self.releasing.lock().map_err(|_| "lock poisoned")?.take();
        let Some(r) = r else { return Ok(()) };
        let at = r.wait()?;
        if let Ok(mut p) = self.paused_at.lock() {
            *p = Some(at);
        }
        Ok(())
    }
}

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl SourceVm for LiveSource<'_> {
    fn config(&self) -> Vec<u8> {
        // As the devices have it now (a disk moved since the start names its new file),
        // the same configuration the state carries.
        postcard::to_stdvec(&self.vm.config_now()).unwrap_or_default()
    }
    fn memory_end(&self) -> u64 {
        self.vm
            .layout()
            .iter()
            .map(|r| r.start + r.len)
            .max()
            .unwrap_or(0)
    }
    fn populated(&self, into: &PageSet) -> Result<(), String> {
        if self.vm.memory_loading() {
            return Err(crate::snapshot::SnapshotError::Loading.to_string());
        }
        if self.vm.manual_dirty_log() {
            // The log names what was written since it was last cleared; with its history
            // whole (nothing cleared since the VM was created) that is every populated page,
            // without a scan of the address space (mincore of 512 GiB takes ~0.2 s here).
            let history = self.vm.dirty_history();
            self.fetch_dirty(into)?;
            if history {
                return Ok(());
            }
        }
        let found = crate::snapshot::populated(self.vm).map_err(text)?;
        for r in &found.ranges {
            into.insert_words((r.start / 4096 / 64) as usize, &r.bits)?;
        }
        Ok(())
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.vm
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(text)
    }
    fn start_dirty_log(&self) -> Result<(), String> {
        if self.vm.manual_dirty_log() {
            return Ok(()); // it logs always
        }
        self.vm.start_dirty_log().map_err(text)
    }
    fn stop_dirty_log(&self) -> Result<(), String> {
        // The migration consumed the log: a diff snapshot baseline kept before it no longer
        // holds (the next diff is refused until a full snapshot is taken).
        if self.was_logging || !self.vm.manual_dirty_log() {
            self.vm.stop_dirty_log().map_err(text)?;
        }
        Ok(())
    }
    fn seed_baseline(&self) -> Option<u64> {
        self.vm.seed_baseline()
    }
    fn changed_since_seed(&self, into: &PageSet) -> Result<(), String> {
        if self.vm.seed_baseline().is_none() {
            return Err("the dirty log no longer runs from the seed".into());
        }
        // Manual protection: the log holds every page written since the seed's last harvest
        // cleared it; harvesting leaves it so, and the senders re-arm as they read.
        self.fetch_dirty(into)
    }
    fn fetch_dirty(&self, into: &PageSet) -> Result<(), String> {
        let mut bad = Ok(());
        self.vm
            .harvest_dirty(|first, words| {
                if bad.is_ok() {
                    bad = into.insert_words(first, words);
                }
            })
            .map_err(text)?;
        bad
    }
    fn rearm(&self, first: usize, words: &[u64]) -> Result<(), String> {
        self.vm.rearm_dirty(first, words).map_err(text)
    }
    fn before_commit(&self) -> Result<(), CommitHold> {
        let at = self
            .paused_at
            .lock()
            .ok()
            .and_then(|p| *p)
            .unwrap_or_else(Instant::now);
        self.before_commit.as_ref().map_or(Ok(()), |f| f(at))
    }
    fn before_pause(&self) -> Result<(), String> {
        // Write the disks' dirty data back while the guest still runs: the flush at the
        // hand-over, inside the downtime, then has only the last moments' writes to do. Not
        // when they are copied (shared-nothing): the destination's copies are synced by the
        // migration, and the source's images are not handed over (flushing them waited for
        // whatever the host had left unwritten in them: 0.6 s in a benchmark).
        if self.disks.mirrored() {
            return Ok(());
        }
        self.vm.flush_disks().map_err(text)
    }
    fn pause(&self) -> Result<(), String> {
        if self.vm.state() != RunState::Paused {
            self.vm.pause().map_err(text)?;
        }
        // Shared storage and taps: let go of them now, while the last pages travel; the
        // state is sent (and the destination opens them) only once that has finished.
        let r = self
            .vm
            .release_backends(!self.disks.mirrored())
            .map_err(text)?;
        *self.releasing.lock().map_err(|_| "lock poisoned")? = Some(r);
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        // The hand-over failed before commit: disks and taps come back to this host first
        // (a release still running is waited for; its failure does not matter now).
        let _ = self.released();
        self.vm
            .reacquire_backends(Duration::from_secs(5))
            .map_err(text)?;
        if self.was_paused {
            return Ok(());
        }
        self.vm.resume().map_err(text)
    }
    fn throttle(&self, percent: u8) -> Result<(), String> {
        self.vm.set_throttle(percent).map_err(text)
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        // Shared storage and taps: released (since the pause) before the destination opens
        // them, which it does when it loads this state.
        self.released()?;
        postcard::to_stdvec(&self.vm.save_state().map_err(text)?).map_err(text)
    }
    fn disks(&self) -> Vec<ferry_migration::disk_wire::DiskSpec> {
        crate::live_storage::SourceDisks::specs(self.vm.bus().virtio())
    }
    fn mirror_disks(&self, link: ferry_migration::engine::DiskLink) -> Result<(), String> {
        self.disks.mirror(self.vm.bus().virtio(), link)
    }
    fn copy_disks(&self) -> Result<ferry_migration::engine::DiskCopy, String> {
        self.disks.copy()
    }
    fn unmirror_disks(&self) {
        self.disks.unmirror(self.vm.bus().virtio())
    }
}

/// The receiving side: builds the VM from the source's configuration, fills its memory, loads
/// its state, and starts it on commit. In post-copy, guest RAM is registered with
/// userfaultfd from the switch-over until every page is in.
pub struct LiveDestination {
    /// Guest RAM (shared with the VM being built): pages are written from several threads
    /// while the rest of the destination changes under its locks.
    mem: Option<GuestMem>,
    incoming: Mutex<Option<Incoming>>,
    console: Mutex<Option<Box<dyn Write + Send>>>,
    vm: Mutex<Option<Arc<Vm>>>,
    missing: RwLock<Option<MissingPages>>,
    /// Called with the VM once it runs here (in post-copy, while pages still arrive).
    on_running: Mutex<Option<OnRunning>>,
    /// Called after Commit, before the VM first runs: an error keeps it from running.
    before_resume: Mutex<Option<BeforeResume>>,
    /// Pages were installed by userfaultfd, behind the dirty log's back.
    postcopy: AtomicBool,
    /// Disks made here for a shared-nothing migration.
    disks: crate::live_storage::DestDisks,
    /// A seed of the VM held here (`ferry receive --seed`), loaded when the source asks.
    seed: Option<crate::seed::Seed>,
    /// The arriving VM's configuration (what a seed must match).
    config: Option<VmConfig>,
    /// The seed's snapshot id, once loaded whole.
    seed_id: Option<u64>,
    /// Runs of the seed that failed their CRC and were not loaded.
    pub seed_bad_runs: std::sync::atomic::AtomicU64,
}

type OnRunning = Box<dyn FnOnce(Arc<Vm>) + Send>;
type BeforeResume = Box<dyn FnOnce() -> Result<(), String> + Send>;

impl LiveDestination {
    pub fn new(console: Box<dyn Write + Send>) -> Self {
        LiveDestination {
            mem: None,
            incoming: Mutex::new(None),
            console: Mutex::new(Some(console)),
            vm: Mutex::new(None),
            missing: RwLock::new(None),
            on_running: Mutex::new(None),
            before_resume: Mutex::new(None),
            postcopy: AtomicBool::new(false),
            disks: Default::default(),
            seed: None,
            config: None,
            seed_id: None,
            seed_bad_runs: Default::default(),
        }
    }

    /// Holds `seed` for a seeded migration (used only when the source asks for one).
    pub fn seed(mut self, seed: crate::seed::Seed) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Where disks that come with the VM (shared-nothing migration) go unless the source
    /// maps them elsewhere (`ferry receive --storage-dir`).
    pub fn storage_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.disks.dir = Some(dir);
        self
    }

    /// Has `f` called with the VM as soon as it runs here: at the switch-over, before a
    /// post-copy has brought every page (the caller can serve it meanwhile).
    pub fn on_running(&self, f: impl FnOnce(Arc<Vm>) + Send + 'static) {
        *self.on_running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Has `f` run after Commit, before the VM first runs here; its error keeps the VM from
    /// running (a cluster checks the ownership came here and takes its epoch).
    pub fn before_resume(&self, f: impl FnOnce() -> Result<(), String> + Send + 'static) {
        *self.before_resume.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// The VM, once the migration has committed (running); None also when an `on_running`
    /// callback still holds it.
    pub fn into_vm(self) -> Option<Vm> {
        let vm = self.vm.into_inner().unwrap_or_else(|e| e.into_inner())?;
        Arc::try_unwrap(vm).ok()
    }

    fn mem(&self) -> Result<&GuestMem, String> {
        self.mem
            .as_ref()
            .ok_or_else(|| "the VM was not built yet".to_string())
    }

    /// `madvise(advice)` over `[gpa, gpa + len)`, clamped to the end of the RAM region `gpa`
    /// lies in; returns the bytes advised.
    fn advise(&self, gpa: u64, len: u64, advice: libc::c_int) -> Result<u64, String> {
        let mem = self.mem()?;
        let region = mem
            .find_region(GuestAddress(gpa))
            .ok_or_else(|| format!("{gpa:#x} is not guest RAM"))?;
        let offset = gpa - region.start_addr().0;
        let len = len.min(region.len() - offset);
        // SAFETY: [offset, offset + len) lies inside this region's anonymous private mapping
        // (offset < region.len(), len clamped to the rest), which lives as long as
        // `self.mem`. madvise changes no mapping, only what backs its pages; which advice is
        // right when is the callers' contract (`prefault`, `discard`).
        let r = unsafe {
            libc::madvise(
                region.as_ptr().add(offset as usize) as *mut libc::c_void,
                len as usize,
                advice,
            )
        };
        if r != 0 {
            return Err(format!(
                "{gpa:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(len)
    }

    fn with_missing<T>(
        &self,
        f: impl FnOnce(&MissingPages) -> Result<T, crate::uffd::UffdError>,
    ) -> Result<T, String> {
        let g = self
            .missing
            .read()
            .map_err(|_| "userfaultfd lock poisoned")?;
        let m = g.as_ref().ok_or("post-copy has not begun")?;
        f(m).map_err(text)
    }
}

impl DestinationVm for LiveDestination {
    fn prepare(&mut self, config: &[u8]) -> Result<(), String> {
        let config: VmConfig =
            postcard::from_bytes(config).map_err(|e| format!("VM configuration: {e}"))?;
        let inc = Vm::incoming(&config).map_err(text)?;
        self.mem = Some(inc.memory().clone());
        self.config = Some(config);
        *self.incoming.get_mut().map_err(|_| "lock poisoned")? = Some(inc);
        Ok(())
    }
    fn load_seed(&mut self) -> Result<Vec<(u64, ferry_migration::seed::PageHash)>, String> {
        let seed = self.seed.as_ref().ok_or(
            "the source asked for a seeded migration, but this destination holds no seed \
             (ferry receive --seed DIR)",
        )?;
        let config = self.config.as_ref().ok_or("the VM was not built yet")?;
        let got = seed.load(self.mem()?, config)?;
        self.seed_bad_runs
            .store(got.bad_runs, std::sync::atomic::Ordering::Relaxed);
        self.seed_id = (got.bad_runs == 0).then_some(seed.id());
        Ok(got.pages)
    }
    fn seed_id(&self) -> Option<u64> {
        self.seed_id
    }
    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        self.mem()?
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| format!("page {gpa:#x}: {e}"))
    }
    fn prefault(&self, gpa: u64, len: u64) -> Result<(), String> {
        // MADV_POPULATE_WRITE only maps pages (zero-filled where absent, untouched where
        // present); it never changes contents.
        self.advise(gpa, len, libc::MADV_POPULATE_WRITE).map(|_| ())
    }
    fn before_resume(&self) -> Result<(), String> {
        let f = self
            .before_resume
            .lock()
            .map_err(|_| "lock poisoned")?
            .take();
        f.map_or(Ok(()), |f| f())
    }
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        let mut state: VmState =
            postcard::from_bytes(state).map_err(|e| format!("VM state: {e}"))?;
        self.disks.rewrite(&mut state);
        let inc = self
            .incoming
            .lock()
            .map_err(|_| "lock poisoned")?
            .take()
            .ok_or("state before the VM was built, or loaded twice")?;
        let console = self
            .console
            .lock()
            .map_err(|_| "console lock poisoned")?
            .take()
            .ok_or("state loaded twice")?;
        let vm = inc.finish(&state, console).map_err(text)?;
        *self.vm.lock().map_err(|_| "lock poisoned")? = Some(Arc::new(vm));
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        let vm = self
            .vm
            .lock()
            .map_err(|_| "lock poisoned")?
            .clone()
            .ok_or("no VM to resume")?;
        if self.postcopy.load(Ordering::SeqCst) {
            vm.forget_dirty_history();
        }
        vm.start().map_err(text)?;
        vm.announce_after_move();
        if let Some(f) = self.on_running.lock().map_err(|_| "lock poisoned")?.take() {
            f(vm);
        }
        Ok(())
    }
    fn discard(&self, runs: &[(u64, u64)]) -> Result<(), String> {
        // Nothing runs in the VM yet: MADV_DONTNEED drops these pages (stale copies from
        // earlier passes, or pages mapped ahead), so the next touch of each finds it missing.
        for &(gpa, pages) in runs {
            let len = pages * 4096;
            let done = self
                .advise(gpa, len, libc::MADV_DONTNEED)
                .map_err(|e| format!("dropping pages: {e}"))?;
            if done != len {
                return Err(format!("{gpa:#x}+{pages} pages run past their RAM region"));
            }
        }
        Ok(())
    }
    fn begin_postcopy(&self) -> Result<(), String> {
        self.postcopy.store(true, Ordering::SeqCst);
        let m = MissingPages::register(self.mem()?).map_err(text)?;
        *self.missing.write().map_err(|_| "lock poisoned")? = Some(m);
        Ok(())
    }
    fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<u64>, String> {
        self.with_missing(|m| m.next_fault(timeout))
    }
    fn install_pages(&self, gpa: u64, data: &[u8]) -> Result<u64, String> {
        self.with_missing(|m| m.install_run(gpa, data))
    }
    fn install_zero(&self, gpa: u64) -> Result<bool, String> {
        self.with_missing(|m| m.install_zero(gpa))
    }
    fn end_postcopy(&self) -> Result<(), String> {
        // Unregistering wakes anything still waiting; it finds its page present or faults it
        // in as ordinary (zero) memory.
        drop(self.missing.write().map_err(|_| "lock poisoned")?.take());
        Ok(())
    }
    fn create_disks(
        &mut self,
        disks: &[ferry_migration::disk_wire::DiskSpec],
    ) -> Result<(), String> {
        self.disks.create(disks)
    }
    fn disk_write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        self.disks.write(disk, offset, data)
    }
    fn disk_zero(&self, disk: u32, offset: u64, len: u64) -> Result<(), String> {
        self.disks.zero(disk, offset, len)
    }
    fn disk_sync(&self, last: bool) -> Result<(), String> {
        self.disks.sync(last)
    }
    fn remove_disks(&self) {
        self.disks.remove()
    }
}
