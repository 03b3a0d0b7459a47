//! A KVM virtual machine: creation, boot, vCPU threads, pause/resume/shutdown, dirty logging.
use crate::boot::{self, cpu, BootError, Entry};
use crate::devices::{ConsoleOut, DiskConfig, IoBus, NetConfig, Serial, VirtioSlot};
use crate::devices::{DevicesError, DevicesState, VirtioError};
use crate::dirty::{DirtyError, DirtyLog};
use crate::memory::{self, DirtyBitmap, GuestMem, MemoryError, RamRange, RangeBitmap, PAGE_SIZE};
use crate::vcpu::{self, Control, GuestExit, SharedVcpu, WANT_PAUSE, WANT_RUN, WANT_STOP};
use crate::vcpu_state::{self, Capabilities, StateError, VcpuState};
use crate::vm_state::{self, KvmVmState};
use kvm_bindings::kvm_pit_config;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Most vCPUs a VM may have.
pub const MAX_CPUS: u8 = 32;
/// Default KVM device; `FERRY_KVM_DEVICE` overrides it (used by tests).
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What to boot. (Externally tagged: the state format, postcard, cannot read internally
/// tagged enums.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootSource {
    /// Ferry's test guest (embedded image) with this workload command line.
    TestGuest { args: String },
    /// A kernel file: Linux bzImage or ELF vmlinux, or a multiboot ELF.
    Kernel {
        path: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: u8,
    /// Bytes of RAM.
    pub memory: u64,
    pub boot: BootSource,
    /// virtio-blk disks, in order (their MMIO windows and GSIs follow this order).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs on taps, after the disks.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

/// Lifecycle state, as reported by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shut down",
        };
        f.write_str(s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source} (is KVM enabled, and may this user open it?)")]
    KvmOpen {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU count {0} is out of range (1..={MAX_CPUS})")]
    Cpus(u32),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot {op}: the VM is {state}")]
    State { op: &'static str, state: RunState },
    #[error("vCPUs did not stop within {0:?}")]
    PauseTimeout(Duration),
    #[error("cannot create vCPU thread or event: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Saved(#[from] StateError),
    #[error("device state: {0}")]
    Devices(#[from] DevicesError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error("device backend: {0}")]
    Backend(String),
    #[error("dirty log: {0}")]
    Dirty(#[from] DirtyError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What `GET /vm` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: RunState,
    pub config: VmConfig,
    pub uptime_ms: u64,
    pub exit: Option<GuestExit>,
    /// Optional KVM state this host cannot save (it would be lost by a snapshot or migration).
    pub host_lacks: Vec<String>,
}

struct Lifecycle {
    state: RunState,
    started: Option<Instant>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

/// Everything that makes up a VM's state (version 2: virtio devices): configuration, memory layout, KVM's
/// VM-wide devices, every vCPU, every VMM device. Guest RAM is saved beside it by the caller
/// (snapshot file, migration stream). The struct names every component, so a component
/// cannot be left out without a compile error.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub config: VmConfig,
    pub layout: Vec<RamRange>,
    pub kvm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Version of [`VmState`].
pub const VM_STATE_VERSION: u32 = 2;

/// The parts every VM has, before its vCPUs exist.
struct Base {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMem,
    layout: Vec<RamRange>,
    serial_irq: vmm_sys_util::eventfd::EventFd,
    caps: Capabilities,
    dirty: DirtyLog,
}

/// A virtual machine on KVM.
pub struct Vm {
    /// Dropped first: stops the I/O thread and waits for it, so the devices' backends (and
    /// their image locks) go with the VM, not a poll timeout later.
    _io: Option<crate::devices::IoThread>,
    config: VmConfig,
    _kvm: Kvm,
    caps: Capabilities,
    vm: VmFd,
    vcpus: Vec<SharedVcpu>,
    mem: GuestMem,
    layout: Vec<RamRange>,
    bus: Arc<IoBus>,
    ctl: Arc<Control>,
    life: Mutex<Lifecycle>,
    /// A dirty-tracking baseline is kept (snapshots: `fetch_dirty` reports what changed).
    logging: AtomicBool,
    dirty: DirtyLog,
    snap: Mutex<crate::snapshot::SnapshotTrack>,
}

/// Stops a VM from another thread with a given reason (e.g. a background check failed).
#[derive(Clone)]
pub struct AbortHandle(Arc<Control>);

impl AbortHandle {
    pub fn abort(&self, exit: GuestExit) {
        self.0.stop(exit);
    }
}

impl Vm {
    /// Creates the VM, loads what it boots and sets up its vCPUs (not yet running).
    /// Console output goes to `console`, one whole line per write.
    pub fn new(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(VmError::Cpus(config.cpus as u32));
        }
        let layout = memory::ram_layout(config.memory)?;
        let base = Base::create(layout)?;
        let virtio = VirtioSlot::create_all(&base.vm, &config.disks, &config.nets)?;
        let extra: Vec<String> = virtio.iter().map(VirtioSlot::linux_cmdline).collect();
        let bus = IoBus::new(
            Serial::new(
                base.serial_irq.try_clone().map_err(VmError::Thread)?,
                ConsoleOut::new(console),
            ),
            virtio,
            base.mem.clone(),
        )
        .map_err(VmError::Thread)?;
        let entry = boot::load_source(&base.mem, &base.layout, &config.boot, &extra)?;
        let supported = base
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..config.cpus {
            let v = base
                .vm
                .create_vcpu(i as u64)
                .map_err(kvm_err("create vCPU"))?;
            setup_vcpu(&v, i, config.cpus, entry, &supported)?;
            vcpus.push(v);
        }
        Vm::assemble(config, base, vcpus, bus)
    }

    /// Rebuilds a VM from saved state. `load_memory` fills guest RAM (it runs before any vCPU
    /// exists). The VM is left `created`: `start` resumes the guest where it was saved.
    pub fn restore(
        state: &VmState,
        console: Box<dyn Write + Send>,
        load_memory: impl FnOnce(&GuestMem) -> Result<(), VmError>,
    ) -> Result<Vm, VmError> {
        check_state(state)?;
        let t0 = Instant::now();
        let incoming = Vm::incoming(&state.config)?;
        tracing::debug!("restore: KVM VM created in {:?}", t0.elapsed());
        load_memory(incoming.memory())?;
        tracing::debug!("restore: memory loaded at {:?}", t0.elapsed());
        incoming.finish(state, console)
    }

    /// The first half of a restore, for a VM whose memory arrives before its state (live
    /// migration): the KVM VM and its RAM, built from the configuration.
    pub fn incoming(config: &VmConfig) -> Result<Incoming, VmError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(VmError::Cpus(config.cpus as u32));
        }
        let base = Base::create(memory::ram_layout(config.memory)?)?;
        Ok(Incoming {
            config: config.clone(),
            base,
        })
    }

    fn assemble(
        config: VmConfig,
        base: Base,
        vcpus: Vec<VcpuFd>,
        bus: IoBus,
    ) -> Result<Vm, VmError> {
        vcpu::install_kick_handler().map_err(kvm_err("install signal handler"))?;
        if !base.dirty.manual() {
            // The VM starts clean. With manual protection the VMM's writes so far (the loader's,
            // or the pages received into it) stay marked: they are part of what the dirty log
            // knows the guest's memory holds.
            memory::reset_vmm_dirty(&base.mem);
        }
        let bus = Arc::new(bus);
        let io = IoBus::spawn_io_thread(&bus).map_err(VmError::Thread)?;
        Ok(Vm {
            _io: io,
            config,
            _kvm: base.kvm,
            caps: base.caps,
            vm: base.vm,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            mem: base.mem,
            layout: base.layout,
            bus,
            ctl: Arc::new(Control::new()),
            life: Mutex::new(Lifecycle {
                state: RunState::Created,
                started: None,
                handles: Vec::new(),
            }),
            logging: AtomicBool::new(false),
            dirty: base.dirty,
            snap: Mutex::new(Default::default()),
        })
    }

    /// Saves every component's state. The VM must be paused (or not yet started).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let state = self.state();
        if !matches!(state, RunState::Paused | RunState::Created) {
            return Err(VmError::State {
                op: "save state",
                state,
            });
        }
        let mut vcpus = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            vcpus.push(vcpu_state::save(&vcpu::lock_vcpu(v), i as u8, &self.caps)?);
        }
        Ok(VmState {
            version: VM_STATE_VERSION,
            config: self.config_now(),
            layout: self.layout.clone(),
            kvm: vm_state::save(&self.vm)?,
            vcpus,
            devices: self.bus.save(),
        })
    }

    /// Lets go of every device's backend — each disk flushed and its image (and lock)
    /// released, each NIC's tap detached — for a hand-over to another host, on a thread of
    /// its own (a flush can take milliseconds: the caller does other work of the pause
    /// meanwhile); [`Release::wait`] for it. The VM must be paused;
    /// [`reacquire_backends`](Self::reacquire_backends) undoes it. `disks: false` keeps the
    /// disks (a shared-nothing migration: the destination has copies of its own, and the
    /// source's images need neither a flush nor a hand-over).
    pub fn release_backends(&self, disks: bool) -> Result<crate::devices::Release, VmError> {
        let state = self.state();
        if !matches!(state, RunState::Paused | RunState::Created) {
            return Err(VmError::State {
                op: "release device backends",
                state,
            });
        }
        IoBus::release_backends(&self.bus, disks).map_err(VmError::Thread)
    }

    /// Opens the released images and taps again. Another host that opened them meanwhile (a hand-over
    /// that failed late) may still be closing them: retried for up to `patience`.
    pub fn reacquire_backends(&self, patience: Duration) -> Result<(), VmError> {
        let until = Instant::now() + patience;
        for d in self.bus.virtio() {
            loop {
                match d.reacquire() {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= until => return Err(VmError::Backend(e)),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    }

    /// The VM runs here after a move: its NICs announce it (`IoBus::announce_after_move`).
    pub fn announce_after_move(&self) {
        IoBus::announce_after_move(&self.bus)
    }

    /// Makes every disk's acknowledged writes durable.
    pub fn flush_disks(&self) -> Result<(), VmError> {
        for d in self.bus.virtio() {
            d.flush().map_err(VmError::Backend)?;
        }
        Ok(())
    }

    pub(crate) fn snapshot_track(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::snapshot::SnapshotTrack> {
        self.snap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that stops this VM from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(self.ctl.clone())
    }

    /// Optional KVM state this host cannot save or load.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn life(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest RAM (reads and writes through it; VMM writes are tracked as dirty).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// RAM ranges of the guest physical address space.
    pub fn layout(&self) -> &[RamRange] {
        &self.layout
    }

    pub fn state(&self) -> RunState {
        self.life().state
    }

    pub fn info(&self) -> VmInfo {
        let life = self.life();
        VmInfo {
            state: life.state,
            config: self.config_now(),
            uptime_ms: life
                .started
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
            exit: self.ctl.lock().exit.clone(),
            host_lacks: self.caps.lacking().iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts one thread per vCPU.
    pub fn start(&self) -> Result<(), VmError> {
        let mut life = self.life();
        if life.state != RunState::Created {
            return Err(VmError::State {
                op: "start",
                state: life.state,
            });
        }
        self.ctl.lock().alive = self.vcpus.len();
        for (i, v) in self.vcpus.iter().cloned().enumerate() {
            let (bus, ctl) = (self.bus.clone(), self.ctl.clone());
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run_loop(v, i as u8, bus, ctl))
                .map_err(VmError::Thread)?;
            self.ctl.lock().threads.push(h.as_pthread_t());
            life.handles.push(h);
        }
        self.bus.resume_devices();
        life.state = RunState::Running;
        life.started = Some(Instant::now());
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary; returns once all are parked.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut life = self.life();
        if life.state != RunState::Running {
            return Err(VmError::State {
                op: "pause",
                state: life.state,
            });
        }
        self.ctl.want.store(WANT_PAUSE, Ordering::SeqCst);
        self.ctl.cv.notify_all(); // wakes throttled vCPUs from their sleep
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = self.ctl.lock();
        while s.parked < s.alive {
            vcpu::kick(&s.threads);
            let (g, _) = self
                .ctl
                .cv
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
            if Instant::now() > deadline {
                drop(s);
                self.ctl.want.store(WANT_RUN, Ordering::SeqCst);
                self.ctl.cv.notify_all();
                return Err(VmError::PauseTimeout(Duration::from_secs(5)));
            }
        }
        drop(s);
        if self.ctl.want.load(Ordering::SeqCst) == WANT_PAUSE {
            // Devices stop too: nothing writes guest memory while the VM is paused.
            self.bus.quiesce();
            life.state = RunState::Paused;
        }
        Ok(())
    }

    /// Lets paused vCPUs continue exactly where they stopped.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut life = self.life();
        if life.state != RunState::Paused {
            return Err(VmError::State {
                op: "resume",
                state: life.state,
            });
        }
        self.bus.resume_devices();
        let s = self.ctl.lock();
        self.ctl.want.store(WANT_RUN, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        drop(s);
        life.state = RunState::Running;
        Ok(())
    }

    /// Throttles the vCPUs: each sleeps `percent` % of the time (0..=99; 0 ends throttling).
    /// Used by live migration's auto-converge.
    pub fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        let percent = percent.min(99);
        let _s = self.ctl.lock();
        self.ctl.throttle.store(percent, Ordering::SeqCst);
        if percent > 0 && !self.ctl.kicker.load(Ordering::SeqCst) {
            let ctl = self.ctl.clone();
            std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || vcpu::throttle_kicker(ctl))
                .map_err(VmError::Thread)?;
            self.ctl.kicker.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The vCPU throttle in force (percent).
    pub fn throttle(&self) -> u8 {
        self.ctl.throttle.load(Ordering::SeqCst)
    }

    /// The configuration, with each disk's file as its device has it now (a disk move
    /// changes it).
    pub fn config_now(&self) -> VmConfig {
        let mut c = self.config.clone();
        for d in &mut c.disks {
            let now = self.bus.virtio().iter().find_map(|s| {
                s.with_block(|b| (b.id() == d.id).then(|| (b.file().0.to_owned(), b.file().1)))
                    .flatten()
            });
            if let Some((path, format)) = now {
                d.path = path;
                d.format = format;
            }
        }
        c
    }

    /// The VM's devices.
    pub(crate) fn bus(&self) -> &IoBus {
        &self.bus
    }

    /// Stops the VM from the host side.
    pub fn shutdown(&self) -> Result<(), VmError> {
        let state = self.state();
        if state == RunState::Shutdown {
            return Err(VmError::State {
                op: "shut down",
                state,
            });
        }
        self.ctl.stop(GuestExit::Stopped);
        Ok(())
    }

    /// Stops a VM whose state has been handed to another host (quick or live migration): an
    /// unfinished console line is not printed here, since the other host prints it whole.
    pub fn shutdown_after_handoff(&self) -> Result<(), VmError> {
        self.bus.discard_console_partial();
        self.shutdown()
    }

    /// Blocks until every vCPU has stopped; returns how the VM ended.
    pub fn wait(&self) -> GuestExit {
        let mut s = self.ctl.lock();
        let mut stopping_since: Option<Instant> = None;
        let mut reported = false;
        while s.alive > 0 {
            if self.ctl.want.load(Ordering::SeqCst) == WANT_STOP {
                // A kick that lands between a vCPU's check of `want` and its KVM_RUN is lost;
                // kick again until every vCPU has left its loop (as pause does).
                vcpu::kick(&s.threads);
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if !reported && since.elapsed() > Duration::from_secs(20) {
                    reported = true;
                    // stderr, not only tracing: this is the report a hung test or user needs.
                    eprintln!(
                        "ferry: {} vCPU(s) still running 20 s after stop: {}",
                        s.alive,
                        vcpu::thread_report()
                    );
                }
            }
            s = self
                .ctl
                .cv
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let exit = s.exit.clone().unwrap_or(GuestExit::Stopped);
        drop(s);
        let mut life = self.life();
        for h in life.handles.drain(..) {
            let _ = h.join();
        }
        life.state = RunState::Shutdown;
        self.bus.flush_console();
        exit
    }

    /// Starts a dirty-tracking baseline: from now on [`Vm::fetch_dirty`] reports the pages
    /// written after this call. Legacy log: switches KVM's log on (write-protecting every
    /// page); manual protection: clears what the log holds.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        memory::reset_vmm_dirty(&self.mem);
        if self.dirty.manual() {
            self.dirty.clear_all(&self.vm, &self.mem)?;
            self.dirty.forget_history();
        } else {
            self.dirty.set_logging(&self.vm, true)?;
        }
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Ends the baseline (legacy log: KVM stops logging; manual protection logs always).
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.dirty.set_logging(&self.vm, false)?;
        self.logging.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// A baseline is kept ([`Vm::start_dirty_log`]).
    pub fn dirty_logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }

    /// Pages dirtied since the last call (or since the baseline started): KVM's log for
    /// guest writes merged with the VMM's own writes. Fetching clears both (with manual
    /// protection, every page reported is write-protected again).
    pub fn fetch_dirty(&self) -> Result<DirtyBitmap, VmError> {
        let mut out = DirtyBitmap::default();
        for region in self.mem.iter() {
            let pages = region.len() / PAGE_SIZE;
            out.ranges.push(RangeBitmap {
                start: region.start_addr().0,
                pages,
                bits: vec![0; pages.div_ceil(64) as usize],
            });
        }
        self.dirty
            .harvest_clearing(&self.vm, &self.mem, |first, words| {
                let gpa = first as u64 * 64 * PAGE_SIZE;
                if let Some(r) = out
                    .ranges
                    .iter_mut()
                    .find(|r| gpa >= r.start && gpa < r.start + r.pages * PAGE_SIZE)
                {
                    let at = ((gpa - r.start) / PAGE_SIZE / 64) as usize;
                    for (b, w) in r.bits[at..].iter_mut().zip(words) {
                        *b |= w;
                    }
                }
            })?;
        Ok(out)
    }

    /// For the migration engine: calls `f(first_word, words)` with the pages dirtied since
    /// they were last re-armed ([`Vm::rearm_dirty`]; legacy log: since the last harvest),
    /// word `first_word + i` holding pages `64 (first_word + i) ..` from guest address 0.
    /// Manual protection leaves KVM's log as it is; the VMM's own bits are taken.
    pub fn harvest_dirty(&self, f: impl FnMut(usize, &[u64])) -> Result<(), VmError> {
        Ok(self.dirty.harvest(&self.vm, &self.mem, f)?)
    }

    /// For the migration engine, right before reading the pages `words` names: clears them
    /// from KVM's log and write-protects them again (manual protection; a no-op otherwise).
    pub fn rearm_dirty(&self, first: usize, words: &[u64]) -> Result<(), VmError> {
        Ok(self.dirty.clear(&self.vm, first, words)?)
    }

    /// KVM's manual dirty-log protection is in use.
    pub fn manual_dirty_log(&self) -> bool {
        self.dirty.manual()
    }

    /// [`Vm::harvest_dirty`] names every page written since the VM was created (manual
    /// protection, nothing cleared yet): the populated pages without scanning memory.
    pub fn dirty_history(&self) -> bool {
        self.dirty.has_history()
    }

    /// Memory was filled behind the dirty log's back (userfaultfd, file mappings): the log no
    /// longer names every populated page.
    pub fn forget_dirty_history(&self) {
        self.dirty.forget_history()
    }

    /// Host address of a guest physical page, for bulk access.
    pub fn host_address(&self, gpa: u64) -> Option<*mut u8> {
        let r = self.mem.find_region(GuestAddress(gpa))?;
        r.get_host_address(MemoryRegionAddress(gpa - r.start_addr().0))
            .ok()
    }
}

fn check_state(state: &VmState) -> Result<(), VmError> {
    if state.version != VM_STATE_VERSION {
        let v = state.version;
        return Err(StateError::Invalid(format!("VM state version {v} is not supported")).into());
    }
    let config = &state.config;
    if state.vcpus.len() != config.cpus as usize || config.cpus == 0 || config.cpus > MAX_CPUS {
        return Err(StateError::Invalid(format!(
            "state has {} vCPUs for a {}-vCPU configuration",
            state.vcpus.len(),
            config.cpus
        ))
        .into());
    }
    if memory::ram_layout(config.memory)? != state.layout {
        return Err(
            StateError::Invalid("memory layout does not match the configuration".into()).into(),
        );
    }
    Ok(())
}

/// A VM being received: KVM VM and RAM exist, vCPUs and devices come with its state.
pub struct Incoming {
    config: VmConfig,
    base: Base,
}

impl Incoming {
    /// Guest RAM, to be filled.
    pub fn memory(&self) -> &GuestMem {
        &self.base.mem
    }

    /// Completes the VM from its state (which must describe the same configuration).
    pub fn finish(self, state: &VmState, console: Box<dyn Write + Send>) -> Result<Vm, VmError> {
        check_state(state)?;
        if state.config != self.config {
            return Err(StateError::Invalid("state is for another VM configuration".into()).into());
        }
        let base = self.base;
        let bus = IoBus::from_state(
            &state.devices,
            base.serial_irq.try_clone().map_err(VmError::Thread)?,
            ConsoleOut::new(console),
            &base.vm,
            base.mem.clone(),
        )?;
        vm_state::restore(&base.vm, &state.kvm)?;
        let mut vcpus = Vec::new();
        for (i, s) in state.vcpus.iter().enumerate() {
            let v = base
                .vm
                .create_vcpu(i as u64)
                .map_err(kvm_err("create vCPU"))?;
            vcpu_state::restore(&v, s, &base.caps)?;
            vcpus.push(v);
        }
        Vm::assemble(self.config, base, vcpus, bus)
    }
}

impl Base {
    fn create(layout: Vec<RamRange>) -> Result<Base, VmError> {
        let path = std::env::var("FERRY_KVM_DEVICE").unwrap_or_else(|_| KVM_DEVICE.to_string());
        let cpath = std::ffi::CString::new(path.clone()).unwrap_or_default();
        let kvm = Kvm::new_with_path(&cpath).map_err(|source| VmError::KvmOpen { path, source })?;
        let caps = Capabilities::probe(&kvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        let mem = memory::allocate(&layout)?;
        let dirty = DirtyLog::register(&vm, &mem)?;
        let serial_irq =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Thread)?;
        vm.register_irqfd(&serial_irq, 4)
            .map_err(kvm_err("register serial irqfd"))?;
        Ok(Base {
            kvm,
            vm,
            mem,
            layout,
            serial_irq,
            caps,
            dirty,
        })
    }
}

fn setup_vcpu(
    v: &VcpuFd,
    index: u8,
    count: u8,
    entry: Entry,
    supported: &kvm_bindings::CpuId,
) -> Result<(), VmError> {
    v.set_cpuid2(&crate::cpuid::for_vcpu(supported, index, count))
        .map_err(kvm_err("set CPUID"))?;
    let mut lapic = v.get_lapic().map_err(kvm_err("get LAPIC"))?;
    set_lint(&mut lapic, 0x350, 7); // LINT0: ExtINT (PIC)
    set_lint(&mut lapic, 0x360, 4); // LINT1: NMI
    v.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
    let sregs = v.get_sregs().map_err(kvm_err("get sregs"))?;
    let (regs, sregs) = cpu::boot_registers(entry, index, count, sregs);
    v.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    v.set_regs(&regs).map_err(kvm_err("set regs"))?;
    v.set_fpu(&cpu::boot_fpu()).map_err(kvm_err("set FPU"))?;
    // The test guest starts every vCPU itself; Linux brings its APs up with INIT/SIPI.
    if matches!(entry, Entry::Multiboot32 { .. }) && index > 0 {
        let mp = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        v.set_mp_state(mp).map_err(kvm_err("set MP state"))?;
    }
    Ok(())
}

fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, mode: u32) {
    let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
        .iter()
        .map(|&b| b as u8)
        .collect();
    let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let v = (v & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}
