//! The virtio-mmio transport, version 2 ("modern"; virtio 1.2 §4.2.2): the register file a
//! driver programs, feature negotiation, queue setup, notifications and the interrupt status.
use crate::{Interrupt, VirtioDevice};
use std::sync::Arc;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5946_5246; // "FRFY"

/// Version of [`MmioState`].
pub const MMIO_STATE_VERSION: u32 = 1;

/// One queue's saved registers and ring positions (virtio-queue's `QueueState`, in serde form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

/// The transport's saved state (version 1): every register a driver can have set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    pub version: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioStateError {
    #[error("virtio-mmio state version {0} (this Ferry reads version {MMIO_STATE_VERSION})")]
    Version(u32),
    #[error("the saved state has {saved} queues, the device has {device}")]
    Queues { saved: usize, device: usize },
    #[error("queue {index}: {why}")]
    Queue { index: usize, why: String },
}

pub struct MmioTransport<M> {
    device: Box<dyn VirtioDevice<M>>,
    irq: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<M: GuestMemory> MmioTransport<M> {
    pub fn new(device: Box<dyn VirtioDevice<M>>, irq: Arc<dyn Interrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")))
            .collect();
        MmioTransport {
            device,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// Builds the transport from saved state around a device built from its own.
    pub fn from_state(
        s: &MmioState,
        device: Box<dyn VirtioDevice<M>>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioStateError> {
        if s.version != MMIO_STATE_VERSION {
            return Err(MmioStateError::Version(s.version));
        }
        let n = device.queue_max_sizes().len();
        if s.queues.len() != n {
            return Err(MmioStateError::Queues {
                saved: s.queues.len(),
                device: n,
            });
        }
        let mut queues = Vec::with_capacity(n);
        for (index, (q, &max)) in s.queues.iter().zip(device.queue_max_sizes()).enumerate() {
            let bad = |why: String| MmioStateError::Queue { index, why };
            if q.max_size != max {
                return Err(bad(format!("max size {} (device: {max})", q.max_size)));
            }
            queues.push(Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?);
        }
        let MmioState {
            version: _,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            status,
            interrupt_status,
            config_generation,
            queues: _,
        } = *s;
        Ok(MmioTransport {
            device,
            irq,
            queues,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            status,
            interrupt_status,
            config_generation,
        })
    }

    pub fn save(&self) -> MmioState {
        let MmioTransport {
            device: _,
            irq: _,
            queues,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            status,
            interrupt_status,
            config_generation,
        } = self;
        MmioState {
            version: MMIO_STATE_VERSION,
            device_features_sel: *device_features_sel,
            driver_features_sel: *driver_features_sel,
            driver_features: *driver_features,
            queue_sel: *queue_sel,
            status: *status,
            interrupt_status: *interrupt_status,
            config_generation: *config_generation,
            queues: queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice<M> {
        &*self.device
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice<M> {
        &mut *self.device
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn offered(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue registers may only change before the queue is ready, while the driver sets up.
    fn queue_mut(&mut self) -> Option<&mut Queue> {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        self.queues
            .get_mut(self.queue_sel as usize)
            .filter(|q| !q.ready())
    }

    /// A register read at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            data.fill(0);
            self.device
                .read_config(offset - VIRTIO_MMIO_CONFIG as u64, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.queue().map_or(0, |q| q.max_size() as u32),
            VIRTIO_MMIO_QUEUE_READY => self.queue().map_or(0, |q| q.ready() as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            VIRTIO_MMIO_QUEUE_NUM => self.queue().map_or(0, |q| q.size() as u32),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.queue().map_or(0, |q| q.desc_table() as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.queue().map_or(0, |q| (q.desc_table() >> 32) as u32)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.queue().map_or(0, |q| q.avail_ring() as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.queue().map_or(0, |q| (q.avail_ring() >> 32) as u32)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => self.queue().map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.queue().map_or(0, |q| (q.used_ring() >> 32) as u32),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A register write at `offset` in the window; a queue notification is served here.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &M) {
        if offset >= VIRTIO_MMIO_CONFIG as u64 {
            self.device
                .write_config(offset - VIRTIO_MMIO_CONFIG as u64, data);
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(b);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.queue_mut() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let event_idx = self.driver_features
                    & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                    != 0;
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
                        q.set_event_idx(event_idx);
                        q.set_ready(v == 1);
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), v)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), v)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), v)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), v)
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                self.notify(v as usize, mem);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v, mem),
            _ => {}
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.queue_mut() {
            f(q, v);
        }
    }

    fn set_status(&mut self, v: u32, mem: &M) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            // Accepted only for a subset of what was offered, and modern devices only.
            let ok = self.driver_features & !self.offered() == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                v |= VIRTIO_CONFIG_S_FAILED;
            } else {
                // Requests posted before DRIVER_OK are served now.
                self.status = v;
                for i in 0..self.queues.len() {
                    self.notify(i, mem);
                }
                return;
            }
        }
        // The device's own bit survives the driver's writes until reset.
        self.status = v | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// Tells the driver its device's configuration (or status) changed: a new configuration
    /// generation and a configuration interrupt.
    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        self.irq.trigger();
    }

    /// Announces where the VM is now: the device's own announcement (a NIC's RARP) and, for
    /// a driver that negotiated it, a request to the guest to announce itself (virtio-net's
    /// `GUEST_ANNOUNCE`: a status bit and a configuration interrupt). False: the device
    /// had nothing to announce.
    pub fn announce(&mut self) -> bool {
        let sent = self.device.announce();
        let live = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
        if live && self.device.guest_announce(self.driver_features) {
            self.config_changed();
        }
        sent
    }

    /// Serves queue `index`: on the driver's notification, or without one when the device's
    /// backend has data (the VMM's receive thread).
    pub fn notify(&mut self, index: usize, mem: &M) -> crate::Served {
        let none = crate::Served::default();
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
        {
            return none;
        }
        let Some(q) = self.queues.get_mut(index) else {
            return none;
        };
        if !q.ready() {
            return none;
        }
        let served = self.device.process(index, q, mem, self.driver_features);
        if served.broken {
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.config_changed();
            return served;
        }
        if served.completed > 0 && q.needs_notification(mem).unwrap_or(true) {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            self.irq.trigger();
        }
        served
    }
}
