//! Port-I/O devices and the bus that routes vCPU exits to them.
//!
//! The PIC, IOAPIC, LAPIC and PIT live in KVM (in-kernel irqchip); the VMM emulates:
//! COM1 (16550, vm-superio), the power-off port 0xf4 (isa-debug-exit compatible, as QEMU's
//! `-device isa-debug-exit,iobase=0xf4`), the i8042 reset line, and empty PCI config space.
mod serial;
mod virtio;

pub use serial::{ConsoleOut, Serial, SerialState, SerialStateError, COM1_BASE};
pub use virtio::{
    place, DiskConfig, NetConfig, VirtioError, VirtioSlot, VirtioSlotState, MAX_VIRTIO,
    VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE,
};

use crate::memory::GuestMem;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Port of the power-off device: a byte written here powers the VM off with that code.
pub const EXIT_PORT: u16 = 0xf4;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Backends being released (flushed and closed) in the background.
pub struct Release(std::thread::JoinHandle<Result<std::time::Instant, String>>);

impl Release {
    /// Waits until every backend is flushed and closed; the first failure. Ok: when the
    /// NICs had let go of their taps (they go first, before any disk's flush).
    pub fn wait(self) -> Result<std::time::Instant, String> {
        self.0
            .join()
            .unwrap_or_else(|_| Err("the release thread panicked".into()))
    }
}

/// What a port write asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    None,
    PowerOff(u8),
    Reset,
}

/// Routes port I/O and MMIO to the VMM's devices.
pub struct IoBus {
    serial: Mutex<Serial>,
    virtio: Vec<VirtioSlot>,
    /// Guest memory, for the devices' DMA (shared with the VM; writes are dirty-tracked).
    mem: GuestMem,
    /// Devices may act on their own (receive) only while the vCPUs run.
    running: AtomicBool,
    /// Held by the I/O thread while it polls and serves: a backend it polls stays open in
    /// the kernel until poll returns (a tap stays attached), so a hand-over waits for it.
    receiving: Mutex<()>,
    /// Written to cut the I/O thread's poll short (a pause).
    wake: vmm_sys_util::eventfd::EventFd,
    /// The I/O thread is to end (its [`IoThread`] was dropped).
    closed: AtomicBool,
}

fn wake_fd() -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
}

/// State of every VMM-emulated device (version 2: virtio devices). `IoBus::save`
/// destructures the bus exhaustively: a device added to the bus without a state here does
/// not compile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub version: u32,
    pub serial: SerialState,
    pub virtio: Vec<VirtioSlotState>,
}

/// Gaps between a NIC's announcements of the VM after a move (a RARP from its MAC each):
/// the first at once, then QEMU's `announce-self` defaults (initial 50 ms, step 100 ms, five
/// rounds in all).
pub const ANNOUNCE_GAPS_MS: [u64; 5] = [0, 50, 150, 250, 350];

/// Version of [`DevicesState`].
pub const DEVICES_STATE_VERSION: u32 = 2;

/// Why the devices could not be built from their state.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("device state version {0} (this Ferry reads version {DEVICES_STATE_VERSION})")]
    Version(u32),
    #[error(transparent)]
    Serial(#[from] SerialStateError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error("cannot make the I/O thread's wake-up eventfd: {0}")]
    Wake(std::io::Error),
}

impl IoBus {
    pub fn new(serial: Serial, virtio: Vec<VirtioSlot>, mem: GuestMem) -> std::io::Result<Self> {
        Ok(IoBus {
            serial: Mutex::new(serial),
            virtio,
            mem,
            running: AtomicBool::new(false),
            receiving: Mutex::new(()),
            wake: wake_fd()?,
            closed: AtomicBool::new(false),
        })
    }

    pub fn save(&self) -> DevicesState {
        let IoBus {
            serial,
            virtio,
            mem: _,
            running: _,
            receiving: _,
            wake: _,
            closed: _,
        } = self;
        let serial = serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        DevicesState {
            version: DEVICES_STATE_VERSION,
            serial,
            virtio: virtio.iter().map(VirtioSlot::save).collect(),
        }
    }

    /// Builds the bus and its devices from saved state (disk images are opened again).
    pub fn from_state(
        s: &DevicesState,
        serial_irq: vmm_sys_util::eventfd::EventFd,
        console: ConsoleOut,
        vm: &kvm_ioctls::VmFd,
        mem: GuestMem,
    ) -> Result<Self, DevicesError> {
        if s.version != DEVICES_STATE_VERSION {
            return Err(DevicesError::Version(s.version));
        }
        let DevicesState {
            version: _,
            serial,
            virtio,
        } = s;
        Ok(IoBus {
            serial: Mutex::new(Serial::from_state(serial, serial_irq, console)?),
            virtio: VirtioSlot::restore_all(vm, virtio)?,
            mem,
            running: AtomicBool::new(false),
            receiving: Mutex::new(()),
            wake: wake_fd().map_err(DevicesError::Wake)?,
            closed: AtomicBool::new(false),
        })
    }

    /// Stops devices from acting on their own, waits out any service in progress and serves
    /// what the guest made available and the I/O thread had not reached yet (the vCPUs are
    /// stopped): after this returns, no device writes guest memory until
    /// [`resume_devices`](Self::resume_devices), and nothing is in flight.
    pub fn quiesce(&self) {
        self.running.store(false, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let _gate = self.receiving.lock().unwrap_or_else(|e| e.into_inner());
        for s in &self.virtio {
            s.quiesce();
            s.drain(&self.mem);
        }
    }

    pub fn resume_devices(&self) {
        self.running.store(true, Ordering::SeqCst);
    }

    /// Starts the I/O thread if there is a virtio device. It ends when the returned handle
    /// is dropped (and the drop waits for it: the backends it was serving, and their image
    /// locks, are not held by it any more once the VM is gone).
    pub fn spawn_io_thread(bus: &Arc<IoBus>) -> std::io::Result<Option<IoThread>> {
        if bus.virtio.is_empty() {
            return Ok(None);
        }
        let weak = Arc::downgrade(bus);
        let w = weak.clone();
        std::thread::Builder::new()
            .name("virtio-io".into())
            .spawn(move || io_loop(w))
            .map(|handle| {
                Some(IoThread {
                    bus: weak,
                    handle: Some(handle),
                })
            })
    }

    /// Has every NIC announce the VM ([`ANNOUNCE_GAPS_MS`] apart) on a thread of its own
    /// that holds the bus only while it announces (the VM's end is not held up), and stops
    /// when the VM is not running or is gone.
    pub fn announce_after_move(bus: &Arc<IoBus>) {
        let weak = Arc::downgrade(bus);
        let r = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                for gap in ANNOUNCE_GAPS_MS {
                    std::thread::sleep(std::time::Duration::from_millis(gap));
                    let Some(b) = weak.upgrade() else { return };
                    if !b.running.load(Ordering::SeqCst)
                        || b.virtio.iter().filter(|d| d.announce()).count() == 0
                    {
                        return;
                    }
                }
            });
        if let Err(e) = r {
            tracing::warn!("no thread to announce the VM's NICs: {e}");
        }
    }

    /// Releases every device's backend on a thread of its own (see `Vm::release_backends`).
    pub fn release_backends(bus: &Arc<IoBus>, disks: bool) -> std::io::Result<Release> {
        let bus = bus.clone();
        std::thread::Builder::new()
            .name("release".into())
            .spawn(move || {
                let is_disk = |s: &&VirtioSlot| s.with_block(|_| ()).is_some();
                bus.virtio
                    .iter()
                    .filter(|s| !is_disk(s))
                    .try_for_each(VirtioSlot::release)?;
                let nics_released = std::time::Instant::now();
                bus.virtio
                    .iter()
                    .filter(|s| disks && is_disk(s))
                    .try_for_each(VirtioSlot::release)?;
                Ok(nics_released)
            })
            .map(Release)
    }

    /// The virtio devices, in order.
    pub fn virtio(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    fn slot(&self, addr: u64) -> Option<&VirtioSlot> {
        self.virtio.iter().find(|s| s.contains(addr))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some(s) => s.read(addr, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(s) = self.slot(addr) {
            s.write(addr, data, &self.mem);
        }
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, Serial> {
        // A poisoned lock means a vCPU thread panicked mid-write; the device state is still
        // usable for output, so keep going rather than take the VM down.
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        let Some(&v) = data.first() else {
            return IoAction::None;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                self.serial().write((p - COM1_BASE) as u8, v);
                IoAction::None
            }
            EXIT_PORT => IoAction::PowerOff(v),
            I8042_CMD if v == I8042_RESET => IoAction::Reset,
            _ => IoAction::None,
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let v = self.serial().read((p - COM1_BASE) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            I8042_DATA | I8042_CMD => data.fill(0),
            // Nothing here: floating bus.
            _ => data.fill(0xff),
        }
    }

    /// Drops an unfinished console line (the VM continues elsewhere and prints it there).
    pub fn discard_console_partial(&self) {
        self.serial().discard_partial();
    }

    /// Writes any partial console line out (on VM exit).
    pub fn flush_console(&self) {
        self.serial().flush();
    }
}

/// The running I/O thread of a bus; dropping it stops the thread and waits for it.
pub struct IoThread {
    bus: Weak<IoBus>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(b) = self.bus.upgrade() {
            b.closed.store(true, Ordering::SeqCst);
            let _ = b.wake.write(1);
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The I/O thread: serves queues the guest kicked (ioeventfds) and backends with data (a
/// tap's received frames).
fn io_loop(bus: Weak<IoBus>) {
    let mut poll = PollSet::default();
    while let Some(b) = bus.upgrade() {
        if b.closed.load(Ordering::SeqCst) {
            break;
        }
        poll.starved.resize(b.virtio.len(), false);
        let pause = io_once(&b, &mut poll);
        drop(b);
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
    }
}

/// What the I/O thread polls, kept from round to round so a round allocates nothing.
/// `starved[i]`: device i's backend has data but the guest posted no buffer; it is not
/// watched until the guest kicks.
#[derive(Default)]
struct PollSet {
    watch: Vec<Source>,
    fds: Vec<libc::pollfd>,
    starved: Vec<bool>,
}

impl PollSet {
    fn add(&mut self, fd: std::os::fd::RawFd, src: Source) {
        self.watch.push(src);
        self.fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
}

#[derive(Clone, Copy)]
enum Source {
    Wake,
    Kick(usize, usize),
    Data(usize, usize),
}

/// One poll of every kick, backend and the wake-up, and one serving of those ready; returns
/// how long to wait before the next (None: at once). The set is rebuilt each round (a
/// backend may have been released and reacquired since), into the vectors of the last.
fn io_once(b: &IoBus, p: &mut PollSet) -> Option<std::time::Duration> {
    if !b.running.load(Ordering::SeqCst) {
        return Some(std::time::Duration::from_millis(2));
    }
    use std::os::fd::AsRawFd;
    p.watch.clear();
    p.fds.clear();
    p.add(b.wake.as_raw_fd(), Source::Wake);
    for (i, s) in b.virtio.iter().enumerate() {
        for (fd, q) in s.kick_fds() {
            p.add(fd, Source::Kick(i, q));
        }
        if let Some((fd, q)) = s.poll_fd().filter(|_| !p.starved[i]) {
            p.add(fd, Source::Data(i, q));
        }
    }
    // The gate is held across the poll: a backend polled stays open in the kernel until
    // poll returns, and a hand-over must not find the tap still attached. A pause writes
    // the wake-up, so it does not wait out the timeout.
    let _gate = b.receiving.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `p.fds` is a valid array of pollfd for the duration of the call.
    let n = unsafe { libc::poll(p.fds.as_mut_ptr(), p.fds.len() as libc::nfds_t, 10) };
    if n == 0 {
        p.starved.fill(false); // a lost kick costs at most one timeout
    }
    // Frames a NIC brought from another host (its state) go to the guest without waiting
    // for the tap to have more.
    for (i, s) in b.virtio.iter().enumerate() {
        if let Some((_, q)) = s.poll_fd().filter(|_| !p.starved[i]) {
            if s.holds_data() {
                p.starved[i] = s.poll(q, &b.mem, &b.running) == 0;
            }
        }
    }
    if n <= 0 {
        return None;
    }
    for (fd, &src) in p.fds.iter().zip(&p.watch) {
        if fd.revents & libc::POLLIN == 0 {
            continue;
        }
        match src {
            Source::Wake => {
                let _ = b.wake.read();
            }
            // A kick taken is served even if a pause has begun: the pause waits for the gate
            // and drains only the kicks still pending.
            Source::Kick(i, q) => {
                let s = &b.virtio[i];
                if s.take_kick(q) {
                    s.serve(q, &b.mem);
                }
                if q == s.data_queue() {
                    p.starved[i] = false;
                }
            }
            Source::Data(i, q) => {
                p.starved[i] = b.virtio[i].poll(q, &b.mem, &b.running) == 0;
            }
        }
    }
    None
}
