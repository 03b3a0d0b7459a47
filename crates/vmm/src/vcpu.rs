//! vCPU threads: the KVM_RUN loop, exit handling, and pause/resume at instruction boundaries.
//!
//! Pause: the controller sets `want = Pause` and interrupts KVM_RUN with a signal (repeated
//! until every vCPU has parked, so a signal that lands just before KVM_RUN is not lost). A
//! parking vCPU first completes any port I/O in flight with a KVM_RUN under immediate_exit, so
//! its registers are exactly at an instruction boundary while paused.
use crate::devices::{IoAction, IoBus};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Throttling period: a throttled vCPU is kicked out of KVM_RUN once per slice and sleeps
/// `slice × p / (100 − p)` for a throttle of p % (as QEMU's auto-converge does).
pub(crate) const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How the guest (or the VMM) ended the VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestExit {
    /// The guest wrote `code` to the power-off port.
    PowerOff { code: u8 },
    /// The guest asked for a reset (i8042 0xFE); Ferry stops the VM.
    Reset,
    /// Triple fault, failed entry or a KVM internal error.
    Crashed { reason: String },
    /// Stopped from the host (API shutdown).
    Stopped,
}

pub(crate) const WANT_RUN: u8 = 0;
pub(crate) const WANT_PAUSE: u8 = 1;
pub(crate) const WANT_STOP: u8 = 2;

/// State shared by the controller and the vCPU threads.
pub(crate) struct Control {
    pub want: AtomicU8,
    /// Share of time the vCPUs sleep, in percent (0: not throttled).
    pub throttle: AtomicU8,
    /// A kicker thread is running for the throttle (changed under `m`).
    pub kicker: AtomicBool,
    pub m: Mutex<Shared>,
    pub cv: Condvar,
}

#[derive(Default)]
pub(crate) struct Shared {
    /// vCPU threads still running their loop.
    pub alive: usize,
    /// vCPU threads parked for a pause.
    pub parked: usize,
    pub exit: Option<GuestExit>,
    /// pthread ids of the vCPU threads, to interrupt KVM_RUN.
    pub threads: Vec<libc::pthread_t>,
}

impl Control {
    pub fn new() -> Self {
        Control {
            want: AtomicU8::new(WANT_RUN),
            throttle: AtomicU8::new(0),
            kicker: AtomicBool::new(false),
            m: Mutex::new(Shared::default()),
            cv: Condvar::new(),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first exit reason and asks every vCPU to stop.
    pub fn stop(&self, exit: GuestExit) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(exit);
        }
        self.want.store(WANT_STOP, Ordering::SeqCst);
        self.cv.notify_all();
        kick(&s.threads);
    }
}

/// Where each thread of this process is in the kernel (name, state, wait channel), for a
/// report when vCPUs do not stop.
pub(crate) fn thread_report() -> String {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return "no /proc/self/task".into();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let comm = read("comm");
        let state = read("stat")
            .rsplit(") ")
            .next()
            .and_then(|r| r.split(' ').next().map(str::to_string))
            .unwrap_or_default();
        out.push(format!(
            "{}[{}:{}]",
            comm.trim(),
            state,
            read("wchan").trim()
        ));
    }
    out.join(" ")
}

/// Signal used to interrupt KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

pub(crate) fn kick(threads: &[libc::pthread_t]) {
    for &t in threads {
        // SAFETY: t is the id of a vCPU thread that is joined only after `alive` drops to 0;
        // pthread_kill on it with a handled signal has no other effect than interrupting.
        unsafe { libc::pthread_kill(t, kick_signal()) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal, once per process.
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    })
    .map_err(vmm_sys_util::errno::Error::new)
}

/// A vCPU shared between its thread (which holds the lock only while in KVM_RUN and handling
/// the exit) and the controller (which reads and writes state while the vCPU is parked).
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

pub(crate) fn lock_vcpu(v: &SharedVcpu) -> std::sync::MutexGuard<'_, VcpuFd> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

/// The run loop of one vCPU thread.
pub(crate) fn run_loop(shared: SharedVcpu, index: u8, bus: Arc<IoBus>, ctl: Arc<Control>) {
    let mut interrupted = false;
    loop {
        match ctl.want.load(Ordering::SeqCst) {
            WANT_STOP => break,
            WANT_PAUSE => {
                park(&shared, &ctl);
                continue;
            }
            _ => {}
        }
        let mut vcpu = lock_vcpu(&shared);
        let outcome: Result<Option<GuestExit>, String> = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok(match bus.write(port, data) {
                IoAction::None => None,
                IoAction::PowerOff(code) => Some(GuestExit::PowerOff { code }),
                IoAction::Reset => Some(GuestExit::Reset),
            }),
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                Ok(None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                Ok(None)
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => Ok(None),
            Ok(VcpuExit::Shutdown) => Err("triple fault".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(format!(
                "KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
            )),
            Ok(VcpuExit::InternalError) => {
                Err("KVM internal error (instruction not emulated)".into())
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Ok(Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                _ => GuestExit::PowerOff { code: 0 },
            })),
            Ok(other) => Err(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                interrupted = true;
                Ok(None)
            }
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        let exit = outcome.unwrap_or_else(|what| Some(crashed(&vcpu, index, &what)));
        if let Some(exit) = exit {
            ctl.stop(exit);
            break;
        }
        drop(vcpu);
        if std::mem::take(&mut interrupted) {
            throttle_sleep(&ctl);
        }
    }
    let mut s = ctl.lock();
    s.alive -= 1;
    ctl.cv.notify_all();
}

fn crashed(vcpu: &VcpuFd, index: u8, what: &str) -> GuestExit {
    let rip = vcpu
        .get_regs()
        .map(|r| format!(" at rip {:#x}", r.rip))
        .unwrap_or_default();
    GuestExit::Crashed {
        reason: format!("vCPU {index}: {what}{rip}"),
    }
}

/// A throttled vCPU's sleep after a kick; a pause or stop ends it at once.
fn throttle_sleep(ctl: &Control) {
    let p = ctl.throttle.load(Ordering::Relaxed) as u32;
    if p == 0 {
        return;
    }
    let until = Instant::now() + THROTTLE_SLICE * p / (100 - p.min(99));
    let mut s = ctl.lock();
    while ctl.want.load(Ordering::SeqCst) == WANT_RUN {
        let now = Instant::now();
        if now >= until {
            break;
        }
        s = ctl
            .cv
            .wait_timeout(s, until - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Kicks every vCPU out of KVM_RUN once per slice while a throttle is set; ends when the
/// throttle goes back to 0 or the VM stops.
pub(crate) fn throttle_kicker(ctl: Arc<Control>) {
    loop {
        std::thread::sleep(THROTTLE_SLICE);
        let s = ctl.lock();
        if ctl.throttle.load(Ordering::SeqCst) == 0 || ctl.want.load(Ordering::SeqCst) == WANT_STOP
        {
            ctl.kicker.store(false, Ordering::SeqCst);
            return;
        }
        if ctl.want.load(Ordering::SeqCst) == WANT_RUN {
            kick(&s.threads);
        }
    }
}

/// Completes in-flight I/O, then waits until the controller no longer wants a pause.
fn park(shared: &SharedVcpu, ctl: &Control) {
    {
        let mut vcpu = lock_vcpu(shared);
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run(); // returns EINTR at once, after finishing a pending IN/OUT
        vcpu.set_kvm_immediate_exit(0);
    }
    let mut s = ctl.lock();
    s.parked += 1;
    ctl.cv.notify_all();
    while ctl.want.load(Ordering::SeqCst) == WANT_PAUSE {
        s = ctl.cv.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    s.parked -= 1;
    ctl.cv.notify_all();
}
