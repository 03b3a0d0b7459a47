//! A KVM virtual machine: creation, boot, vCPU threads, pause/resume/shutdown, dirty logging.
use crate::boot::{self, cpu, linux, multiboot, BootError, Entry, ImageKind};
use crate::devices::{ConsoleOut, IoBus, Serial};
use crate::memory::{self, DirtyBitmap, GuestMem, MemoryError, RamRange, RangeBitmap, PAGE_SIZE};
use crate::vcpu::{self, Control, GuestExit, WANT_PAUSE, WANT_RUN};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
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

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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
}

struct Lifecycle {
    state: RunState,
    started: Option<Instant>,
    handles: Vec<std::thread::JoinHandle<VcpuFd>>,
    idle_vcpus: Vec<VcpuFd>,
}

/// A virtual machine on KVM.
pub struct Vm {
    config: VmConfig,
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMem,
    layout: Vec<RamRange>,
    bus: Arc<IoBus>,
    ctl: Arc<Control>,
    life: Mutex<Lifecycle>,
    logging: AtomicBool,
}

impl Vm {
    /// Creates the VM, loads what it boots and sets up its vCPUs (not yet running).
    /// Console output goes to `console`, one whole line per write.
    pub fn new(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(VmError::Cpus(config.cpus as u32));
        }
        let layout = memory::ram_layout(config.memory)?;
        let path = std::env::var("FERRY_KVM_DEVICE").unwrap_or_else(|_| KVM_DEVICE.to_string());
        let cpath = std::ffi::CString::new(path.clone()).unwrap_or_default();
        let kvm = Kvm::new_with_path(&cpath).map_err(|source| VmError::KvmOpen { path, source })?;
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
        for (slot, region) in mem.iter().enumerate() {
            set_slot(&vm, slot as u32, region, false)?;
        }

        let irq =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Thread)?;
        vm.register_irqfd(&irq, 4)
            .map_err(kvm_err("register serial irqfd"))?;
        let bus = Arc::new(IoBus::new(Serial::new(irq, ConsoleOut::new(console))));

        let entry = load_boot(&mem, &layout, &config.boot)?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..config.cpus {
            let v = vm.create_vcpu(i as u64).map_err(kvm_err("create vCPU"))?;
            setup_vcpu(&v, i, config.cpus, entry, &supported)?;
            vcpus.push(v);
        }
        memory::reset_vmm_dirty(&mem);
        vcpu::install_kick_handler().map_err(kvm_err("install signal handler"))?;
        Ok(Vm {
            config,
            _kvm: kvm,
            vm,
            mem,
            layout,
            bus,
            ctl: Arc::new(Control::new()),
            life: Mutex::new(Lifecycle {
                state: RunState::Created,
                started: None,
                handles: Vec::new(),
                idle_vcpus: vcpus,
            }),
            logging: AtomicBool::new(false),
        })
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
            config: self.config.clone(),
            uptime_ms: life
                .started
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
            exit: self.ctl.lock().exit.clone(),
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
        let vcpus = std::mem::take(&mut life.idle_vcpus);
        self.ctl.lock().alive = vcpus.len();
        for (i, v) in vcpus.into_iter().enumerate() {
            let (bus, ctl) = (self.bus.clone(), self.ctl.clone());
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run_loop(v, i as u8, bus, ctl))
                .map_err(VmError::Thread)?;
            self.ctl.lock().threads.push(h.as_pthread_t());
            life.handles.push(h);
        }
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
        let s = self.ctl.lock();
        self.ctl.want.store(WANT_RUN, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        drop(s);
        life.state = RunState::Running;
        Ok(())
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

    /// Blocks until every vCPU has stopped; returns how the VM ended.
    pub fn wait(&self) -> GuestExit {
        let mut s = self.ctl.lock();
        while s.alive > 0 {
            s = self.ctl.cv.wait(s).unwrap_or_else(|e| e.into_inner());
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

    /// Starts KVM dirty logging on every slot and clears the VMM-side write bitmap.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        memory::reset_vmm_dirty(&self.mem);
        for (slot, region) in self.mem.iter().enumerate() {
            set_slot(&self.vm, slot as u32, region, true)?;
        }
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops KVM dirty logging.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        for (slot, region) in self.mem.iter().enumerate() {
            set_slot(&self.vm, slot as u32, region, false)?;
        }
        self.logging.store(false, Ordering::SeqCst);
        Ok(())
    }

    pub fn dirty_logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }

    /// Pages dirtied since the last call (or since logging started): KVM's log for guest
    /// writes merged with the VMM's own writes. Fetching clears both.
    pub fn fetch_dirty(&self) -> Result<DirtyBitmap, VmError> {
        let logging = self.dirty_logging();
        let vmm = memory::take_vmm_dirty(&self.mem);
        let mut out = DirtyBitmap::default();
        for (slot, (region, vmm_bits)) in self.mem.iter().zip(vmm).enumerate() {
            let len = region.len() as usize;
            let pages = len as u64 / PAGE_SIZE;
            let mut bits = if logging {
                self.vm
                    .get_dirty_log(slot as u32, len)
                    .map_err(kvm_err("get dirty log"))?
            } else {
                vec![0; pages.div_ceil(64) as usize]
            };
            for (b, v) in bits.iter_mut().zip(vmm_bits) {
                *b |= v;
            }
            out.ranges.push(RangeBitmap {
                start: region.start_addr().0,
                pages,
                bits,
            });
        }
        Ok(out)
    }

    /// Host address of a guest physical page, for bulk access.
    pub fn host_address(&self, gpa: u64) -> Option<*mut u8> {
        let r = self.mem.find_region(GuestAddress(gpa))?;
        r.get_host_address(MemoryRegionAddress(gpa - r.start_addr().0))
            .ok()
    }
}

fn set_slot(
    vm: &VmFd,
    slot: u32,
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
    log: bool,
) -> Result<(), VmError> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|_| VmError::Memory(MemoryError::BadSize("region without host mapping".into())))?;
    let r = kvm_userspace_memory_region {
        slot,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping behind `host` lives as long as the VM (both are owned by `Vm`, and
    // the memory is dropped after the VM fd); the range does not overlap other slots.
    unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))
}

fn load_boot(mem: &GuestMem, layout: &[RamRange], boot: &BootSource) -> Result<Entry, VmError> {
    match boot {
        BootSource::TestGuest { args } => {
            let mut img = std::io::Cursor::new(ferry_guest_image());
            Ok(multiboot::load(mem, layout, &mut img, "test guest", args)?)
        }
        BootSource::Kernel {
            path,
            initrd,
            cmdline,
        } => {
            let name = path.display().to_string();
            let io = |what: &str| {
                let what = what.to_string();
                move |source| BootError::Io { what, source }
            };
            let mut f = std::fs::File::open(path).map_err(io(&name))?;
            let kind = boot::detect(&mut f, &name)?;
            if kind == ImageKind::Multiboot {
                if initrd.is_some() {
                    return Err(BootError::Cmdline(
                        "--initrd is for Linux kernels, not multiboot images".into(),
                    )
                    .into());
                }
                return Ok(multiboot::load(mem, layout, &mut f, &name, cmdline)?);
            }
            let iname = initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let mut ifile = match initrd {
                Some(p) => Some(std::fs::File::open(p).map_err(io(&iname))?),
                None => None,
            };
            let b = linux::LinuxBoot {
                kernel: &mut f,
                kernel_name: &name,
                bzimage: kind == ImageKind::BzImage,
                initrd: ifile.as_mut().map(|f| (f, iname.as_str())),
                cmdline,
            };
            Ok(linux::load(mem, layout, b)?)
        }
    }
}

fn ferry_guest_image() -> &'static [u8] {
    crate::TEST_GUEST_IMAGE
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
    let (regs, sregs) = cpu::boot_registers(entry, index, sregs);
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
