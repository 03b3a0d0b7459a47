//! Ferry's virtio devices: the virtio-mmio version 2 transport ([`mmio::MmioTransport`]) and
//! the devices behind it ([`block::Block`]), over guest memory reached through vm-memory.
//! Nothing here knows KVM: the VMM routes MMIO exits to [`mmio::MmioTransport::read`] /
//! [`write`](mmio::MmioTransport::write) and delivers [`Interrupt`]s (an irqfd); tests drive
//! the same code with crafted rings in plain memory.
//!
//! Guarantees:
//! - A request is handled to its end inside the queue notification that carried it: when a
//!   vCPU's MMIO write returns, every request it made available is complete and in the used
//!   ring. So a paused VM has nothing in flight, and a device's saved state (transport
//!   registers, queue addresses and indexes, backend identity) is all there is to it.
//! - Every byte a device writes into guest memory goes through vm-memory (virtio-queue's
//!   `Writer` and used-ring updates), whose bitmap marks the page dirty.
//! - A malformed request (addresses outside memory, a descriptor loop, a chain with the wrong
//!   directions or too short) gets an error status when it has somewhere to put one; a queue
//!   the device cannot use at all sets `NEEDS_RESET`. Guest input never panics the VMM.
pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;

pub use mmio::{MmioState, MmioTransport, QueueSnapshot};

/// Window of one virtio-mmio device in guest-physical space.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Signals the guest (an irqfd in the VMM; a counter in tests).
pub trait Interrupt: Send + Sync {
    fn trigger(&self);
}

/// What a device did with a notification.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Requests completed (used entries added).
    pub completed: u32,
    /// The queue is unusable (its rings lie outside memory): the device needs a reset.
    pub broken: bool,
    /// A request was held back, not completed: the disk is fenced (another host may own
    /// it). It stays on the ring, as QEMU's `werror=stop` keeps it, so the guest never sees
    /// an error for it; the VMM stops the vCPUs.
    pub held: bool,
}

/// A device's saved state, by kind. Every device returns one from
/// [`VirtioDevice::save`] (a required method: a device without state does not compile).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
    Net(net::NetState),
}

/// A virtio device model behind a transport. `M` is the guest memory type.
/// A flush that runs apart from its device (see [`VirtioDevice::flush_handle`]).
pub type FlushHandle = Box<dyn FnOnce() -> Result<(), String> + Send>;

pub trait VirtioDevice<M>: Send {
    /// The device's own state (its transport saves queues and registers).
    fn save(&self) -> DeviceState;
    /// Virtio device ID (2 block, 1 net).
    fn device_type(&self) -> u32;
    /// Feature bits offered (`VIRTIO_F_VERSION_1` is added by the transport).
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes it (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Serves queue `index` after the driver notified it (or at activation); `features` are
    /// the ones the driver accepted.
    fn process(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        mem: &M,
        features: u64,
    ) -> Served;
    /// Makes everything the device acknowledged durable (before state is saved, before the
    /// image is handed to another host).
    fn flush(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// What [`flush`](Self::flush) does, as a job that runs without the device (the
    /// VMM's device lock): a write-back while the guest's I/O goes on. None: only `flush`.
    fn flush_handle(&self) -> Option<FlushHandle> {
        None
    }
    /// Flushes and lets go of the backend (its image lock), so another host may open it;
    /// only while the VM is paused.
    fn release(&mut self) -> Result<(), String> {
        self.flush()
    }
    /// Takes the backend back after [`release`](Self::release) (a migration that failed
    /// before commit).
    fn reacquire(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Data for the guest is held in the device itself (a NIC's frames carried over from
    /// another host): the poll queue has work though its descriptor may stay quiet.
    fn holds_data(&self) -> bool {
        false
    }
    /// A descriptor whose readability means queue `.1` has work without a notification
    /// (a NIC's receive side); the VMM's receive thread polls it.
    fn poll_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// The block device, if this is one (a storage move replaces its image).
    fn as_block(&mut self) -> Option<&mut block::Block> {
        None
    }
    /// Tells the network where the VM is now (a NIC sends a RARP from its MAC, as QEMU's
    /// `announce-self` does, so switches and bridges learn its new port). False: nothing
    /// to announce.
    fn announce(&mut self) -> bool {
        false
    }
    /// Asks the guest to announce itself (virtio-net's `GUEST_ANNOUNCE`): true when the
    /// device's configuration changed for it, and the transport raises a configuration
    /// interrupt. `features` are the ones the driver accepted.
    fn guest_announce(&mut self, _features: u64) -> bool {
        false
    }
}
