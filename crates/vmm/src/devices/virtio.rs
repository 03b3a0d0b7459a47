//! The VM's virtio-mmio devices: where they sit (an MMIO window each from
//! [`VIRTIO_MMIO_BASE`], a GSI each from [`VIRTIO_GSI_BASE`], delivered through an irqfd), the
//! disks behind them, and their saved state.
use crate::memory::GuestMem;
use ferry_devices::block::{Block, BlockState};
use ferry_devices::net::Net;
use ferry_devices::tap::Tap;
use ferry_devices::{DeviceState, Interrupt, MmioState, MmioTransport, VirtioDevice, MMIO_WINDOW};
use ferry_storage::{Format, StorageError};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical address of the first device's window (in the hole below 4 GiB).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI (IOAPIC pin) of the first device; COM1 has 4.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// Devices a VM may have (IOAPIC pins 5..=23 minus room to spare).
pub const MAX_VIRTIO: usize = 16;

/// A disk as configured: `--disk path=FILE[,format=raw][,readonly=on][,id=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub format: Format,
    pub readonly: bool,
    /// What the guest reads with GET_ID (20 bytes at most); `disk<N>` by default.
    pub id: String,
}

/// A NIC as configured: `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=52:54:00:12:34:56]`; NIC `index` gets `52:54:00:12:34:(56+index)`
    /// when no MAC is given (QEMU's default range).
    pub fn parse(s: &str, index: usize) -> Result<NetConfig, String> {
        let (mut tap, mut mac) = (None, None);
        for kv in s.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("{kv:?}: expected key=value (tap=, mac=)"));
            };
            match k {
                "tap" if !v.is_empty() => tap = Some(v.to_string()),
                "mac" => {
                    let b: Vec<u8> = v
                        .split(':')
                        .map(|x| u8::from_str_radix(x, 16))
                        .collect::<Result<_, _>>()
                        .map_err(|_| format!("mac={v}: six hex bytes, e.g. 52:54:00:12:34:56"))?;
                    let m: [u8; 6] = b
                        .try_into()
                        .map_err(|_| format!("mac={v}: six hex bytes, e.g. 52:54:00:12:34:56"))?;
                    if m[0] & 1 != 0 {
                        return Err(format!("mac={v}: a multicast address"));
                    }
                    mac = Some(m);
                }
                _ => return Err(format!("{k}={v}: unknown key (tap=, mac=)")),
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or("tap=NAME is required")?,
            mac: mac.unwrap_or([0x52, 0x54, 0, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)]),
        })
    }
}

impl DiskConfig {
    /// Parses `path=FILE[,format=raw][,readonly=on|off][,id=NAME]`; `index` names the disk
    /// when no id is given (`disk0`, `disk1`, ...).
    pub fn parse(s: &str, index: usize) -> Result<DiskConfig, String> {
        let (mut path, mut format, mut readonly, mut id) = (None, Format::Raw, false, None);
        for kv in s.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!(
                    "{kv:?}: expected key=value (path=, format=, readonly=, id=)"
                ));
            };
            match k {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "format" => format = v.parse()?,
                "readonly" => {
                    readonly = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(format!("readonly={v}: expected on or off")),
                    }
                }
                "id" => {
                    if v.is_empty() || v.len() > 20 || !v.is_ascii() {
                        return Err(format!("id={v}: 1 to 20 ASCII characters"));
                    }
                    id = Some(v.to_string());
                }
                _ => {
                    return Err(format!(
                        "{k}={v}: unknown key (path=, format=, readonly=, id=)"
                    ))
                }
            }
        }
        Ok(DiskConfig {
            path: path.ok_or("path=FILE is required")?,
            format,
            readonly,
            id: id.unwrap_or_else(|| format!("disk{index}")),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("disk {id}: {err}")]
    Disk { id: String, err: StorageError },
    #[error("disk {id}: {why}")]
    DiskState { id: String, why: String },
    #[error(transparent)]
    Tap(#[from] ferry_devices::tap::TapError),
    #[error("NIC on {tap}: {why}")]
    NetState { tap: String, why: String },
    #[error("{0} virtio devices configured (at most {MAX_VIRTIO})")]
    TooMany(usize),
    #[error("virtio device at {base:#x}: {why}")]
    State { base: u64, why: String },
    #[error("cannot wire the interrupt of the device at {base:#x}: {why}")]
    Irq { base: u64, why: String },
    #[error("cannot wire the queue notifications of the device at {base:#x}: {why}")]
    Kick { base: u64, why: String },
}

/// Version of the per-device entry in the devices' state.
pub const VIRTIO_SLOT_STATE_VERSION: u32 = 1;

/// One device's saved state: where it sits, its transport, the device itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub version: u32,
    pub base: u64,
    pub gsi: u32,
    pub mmio: MmioState,
    pub device: DeviceState,
}

struct IrqFd(EventFd);

impl Interrupt for IrqFd {
    fn trigger(&self) {
        // A full counter still means "pending": nothing is lost by a failed write.
        let _ = self.0.write(1);
    }
}

/// One device on the MMIO bus.
pub struct VirtioSlot {
    pub base: u64,
    pub gsi: u32,
    t: Mutex<MmioTransport<GuestMem>>,
    /// The backend descriptor the receive thread polls (-1: none, or released) and the queue
    /// it serves then; kept here so the thread does not take the device's lock to learn it.
    poll_fd: AtomicI32,
    poll_queue: usize,
    /// One eventfd per queue that KVM signals when the guest writes the queue's index to
    /// QueueNotify (an ioeventfd: the vCPU does not leave the kernel); the I/O thread serves.
    kicks: Vec<EventFd>,
}

/// QueueNotify's offset in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

fn kick_fds(vm: &VmFd, base: u64, queues: usize) -> Result<Vec<EventFd>, VirtioError> {
    let bad = |why: String| VirtioError::Kick { base, why };
    (0..queues)
        .map(|q| {
            let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| bad(e.to_string()))?;
            let at = kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY);
            vm.register_ioevent(&e, &at, q as u32)
                .map_err(|e| bad(format!("ioeventfd for queue {q}: {e}")))?;
            Ok(e)
        })
        .collect()
}

fn irqfd(vm: &VmFd, base: u64, gsi: u32) -> Result<Arc<IrqFd>, VirtioError> {
    let bad = |why: String| VirtioError::Irq { base, why };
    let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| bad(e.to_string()))?;
    vm.register_irqfd(&e, gsi).map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(IrqFd(e)))
}

fn open_image(
    path: &std::path::Path,
    format: Format,
    readonly: bool,
    id: &str,
) -> Result<Box<dyn ferry_storage::Image>, VirtioError> {
    ferry_storage::open(path, format, readonly).map_err(|err| VirtioError::Disk {
        id: id.to_string(),
        err,
    })
}

impl VirtioSlot {
    fn new(
        vm: &VmFd,
        base: u64,
        gsi: u32,
        t: MmioTransport<GuestMem>,
    ) -> Result<VirtioSlot, VirtioError> {
        let (fd, queue) = t.device().poll_fd().unwrap_or((-1, 0));
        let kicks = kick_fds(vm, base, t.device().queue_max_sizes().len())?;
        Ok(VirtioSlot {
            base,
            gsi,
            t: Mutex::new(t),
            poll_fd: AtomicI32::new(fd),
            poll_queue: queue,
            kicks,
        })
    }

    /// Reads the device's backend descriptor again (it changes on release and reacquire).
    fn refresh_poll_fd(&self, t: &MmioTransport<GuestMem>) {
        let fd = t.device().poll_fd().map_or(-1, |(fd, _)| fd);
        self.poll_fd.store(fd, Ordering::SeqCst);
    }

    /// The devices of a new VM: disks, then NICs, each in configuration order.
    pub fn create_all(
        vm: &VmFd,
        disks: &[DiskConfig],
        nets: &[NetConfig],
    ) -> Result<Vec<VirtioSlot>, VirtioError> {
        if disks.len() + nets.len() > MAX_VIRTIO {
            return Err(VirtioError::TooMany(disks.len() + nets.len()));
        }
        let mut devs: Vec<Box<dyn VirtioDevice<GuestMem>>> = Vec::new();
        for d in disks {
            let img = open_image(&d.path, d.format, d.readonly, &d.id)?;
            devs.push(Box::new(Block::new(
                img,
                d.id.clone(),
                d.path.clone(),
                d.format,
            )));
        }
        for n in nets {
            devs.push(Box::new(Net::new(Tap::open(&n.tap)?, n.mac)));
        }
        let mut v = Vec::new();
        for (i, dev) in devs.into_iter().enumerate() {
            let (base, gsi) = place(i);
            v.push(VirtioSlot::new(
                vm,
                base,
                gsi,
                MmioTransport::new(dev, irqfd(vm, base, gsi)?),
            )?);
        }
        Ok(v)
    }

    /// The devices from saved state: every image opened again from the path it had.
    pub fn restore_all(vm: &VmFd, s: &[VirtioSlotState]) -> Result<Vec<VirtioSlot>, VirtioError> {
        if s.len() > MAX_VIRTIO {
            return Err(VirtioError::TooMany(s.len()));
        }
        let mut v = Vec::new();
        for (i, st) in s.iter().enumerate() {
            let bad = |why: String| VirtioError::State { base: st.base, why };
            if st.version != VIRTIO_SLOT_STATE_VERSION {
                return Err(bad(format!("state version {}", st.version)));
            }
            if (st.base, st.gsi) != place(i) {
                return Err(bad(format!("unexpected place (GSI {})", st.gsi)));
            }
            let dev: Box<dyn VirtioDevice<GuestMem>> = match &st.device {
                DeviceState::Block(b) => Box::new(restore_block(b)?),
                DeviceState::Net(n) => {
                    Box::new(Net::from_state(n).map_err(|why| VirtioError::NetState {
                        tap: n.tap.clone(),
                        why,
                    })?)
                }
            };
            let t = MmioTransport::from_state(&st.mmio, dev, irqfd(vm, st.base, st.gsi)?)
                .map_err(|e| bad(e.to_string()))?;
            v.push(VirtioSlot::new(vm, st.base, st.gsi, t)?);
        }
        Ok(v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport<GuestMem>> {
        self.t.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn save(&self) -> VirtioSlotState {
        let t = self.lock();
        VirtioSlotState {
            version: VIRTIO_SLOT_STATE_VERSION,
            base: self.base,
            gsi: self.gsi,
            mmio: t.save(),
            device: t.device().save(),
        }
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + MMIO_WINDOW).contains(&addr)
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        self.lock().read(addr - self.base, data);
    }

    pub fn write(&self, addr: u64, data: &[u8], mem: &GuestMem) {
        self.lock().write(addr - self.base, data, mem);
    }

    /// Makes what the device acknowledged durable; the guest's requests go on meanwhile
    /// where the device can flush apart from its lock (raw and qcow2 images can).
    pub fn flush(&self) -> Result<(), String> {
        let handle = self.lock().device().flush_handle();
        match handle {
            Some(f) => f(),
            None => self.lock().device_mut().flush(),
        }
    }

    /// The descriptor the receive thread polls and the queue it serves then, if any.
    /// The device holds data for the guest itself (see `VirtioDevice::holds_data`).
    pub fn holds_data(&self) -> bool {
        self.lock().device_mut().holds_data()
    }

    pub fn poll_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        let fd = self.poll_fd.load(Ordering::SeqCst);
        (fd >= 0).then_some((fd, self.poll_queue))
    }

    /// Serves queue `index` without a notification (backend data arrived), unless `running`
    /// is false — checked under the device's lock, so once [`quiesce`](Self::quiesce) has
    /// returned after `running` was cleared, nothing more is written into guest memory.
    /// Returns the requests completed.
    pub fn poll(&self, index: usize, mem: &GuestMem, running: &AtomicBool) -> u32 {
        let mut t = self.lock();
        if !running.load(Ordering::SeqCst) {
            return 0;
        }
        t.notify(index, mem).completed
    }

    /// The queues' kick eventfds, with their queue index.
    pub fn kick_fds(&self) -> impl Iterator<Item = (std::os::fd::RawFd, usize)> + '_ {
        use std::os::fd::AsRawFd;
        self.kicks
            .iter()
            .enumerate()
            .map(|(q, e)| (e.as_raw_fd(), q))
    }

    /// Consumes queue `index`'s pending kicks; whether there were any.
    pub fn take_kick(&self, index: usize) -> bool {
        self.kicks.get(index).is_some_and(|e| e.read().is_ok())
    }

    /// The queue the backend's data is served on (net: receive).
    pub fn data_queue(&self) -> usize {
        self.poll_queue
    }

    /// Serves every queue that was kicked and not served yet, whether or not the VM runs:
    /// a pause drains what the guest made available before the state is saved.
    pub fn drain(&self, mem: &GuestMem) {
        for q in 0..self.kicks.len() {
            if self.take_kick(q) {
                self.serve(q, mem);
            }
        }
    }

    /// Serves queue `index` as a notification would; returns the requests completed.
    pub fn serve(&self, index: usize, mem: &GuestMem) -> u32 {
        self.lock().notify(index, mem).completed
    }

    /// Waits until no one serves this device (a delivery in progress has finished).
    pub fn quiesce(&self) {
        drop(self.lock());
    }

    /// Flushes and lets go of the backend (its image lock) while the VM is paused for a
    /// hand-over to another host.
    pub fn release(&self) -> Result<(), String> {
        let mut t = self.lock();
        let r = t.device_mut().release();
        self.refresh_poll_fd(&t);
        r
    }

    /// The device announces where the VM is now (a NIC: a RARP on its tap, and a request to
    /// a guest that negotiated `GUEST_ANNOUNCE` to announce itself); false when it has
    /// nothing to announce.
    pub fn announce(&self) -> bool {
        self.lock().announce()
    }

    /// Takes the backend back (the hand-over failed before commit).
    pub fn reacquire(&self) -> Result<(), String> {
        let mut t = self.lock();
        let r = t.device_mut().reacquire();
        self.refresh_poll_fd(&t);
        r
    }

    /// Runs `f` on the block device under the device's lock (no request is being served
    /// meanwhile); None when this is not a block device.
    pub fn with_block<R>(
        &self,
        f: impl FnOnce(&mut ferry_devices::block::Block) -> R,
    ) -> Option<R> {
        let mut t = self.lock();
        t.device_mut().as_block().map(f)
    }

    /// The kernel command-line word Linux's virtio-mmio driver finds this device by.
    pub fn linux_cmdline(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

fn restore_block(b: &BlockState) -> Result<Block, VirtioError> {
    let img = open_image(&b.path, b.format, b.readonly, &b.id)?;
    Block::from_state(b, img).map_err(|why| VirtioError::DiskState {
        id: b.id.clone(),
        why,
    })
}

/// Window and GSI of device `i`.
pub fn place(i: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
        VIRTIO_GSI_BASE + i as u32,
    )
}
