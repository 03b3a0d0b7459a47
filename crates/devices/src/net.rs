//! virtio-net (virtio 1.2 §5.1) on a tap: one receive and one transmit queue, the MAC in the
//! configuration space, no offloads, and a control queue for one command class: the guest's
//! acknowledgement of an announcement (`VIRTIO_NET_F_GUEST_ANNOUNCE`, §5.1.6.5.4). Transmit
//! and control are served on the notifying vCPU; receive is driven by the VMM's receive
//! thread calling [`crate::MmioTransport::notify`] when the tap is readable (and never while
//! the VM is paused), and by the driver adding receive buffers.
//!
//! After a move the VMM announces the VM ([`crate::MmioTransport::announce`]): the NIC sends
//! a RARP from its MAC itself, as QEMU's `announce-self` does, and, when the driver
//! negotiated `GUEST_ANNOUNCE`, sets `VIRTIO_NET_S_ANNOUNCE` in its status and raises a
//! configuration interrupt, so the guest sends its own gratuitous ARPs (which carry its IP
//! addresses, which a RARP cannot) and acknowledges with `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
use crate::tap::{Tap, TapError};
use crate::{Served, VirtioDevice};
use std::io::{Read, Write};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::bitmap::WithBitmapSlice;
use vm_memory::GuestMemory;

/// Descriptors per data queue.
pub const QUEUE_SIZE: u16 = 256;
/// Descriptors of the control queue (one command at a time is what drivers do).
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// Bytes of `virtio_net_hdr_v1` before every frame.
pub const HDR: usize = 12;
/// Largest frame (no offloads: a full Ethernet frame without FCS, plus VLAN tag).
const MAX_FRAME: usize = 1518;
/// Frames read from the tap and waiting for a receive buffer.
const MAX_PENDING: usize = 64;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
/// Bytes of a control command's header (class, command) a device reads before its data.
const CTRL_HDR: usize = 2;

/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;

/// The frame a NIC announces itself with after a move: a RARP request ("reverse request",
/// opcode 3) from and about `mac`, broadcast, padded to Ethernet's 60-byte minimum — the
/// frame QEMU's `announce-self` sends.
pub fn rarp(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac); // sender hardware address; sender IP 0
    f[32..38].copy_from_slice(&mac); // target hardware address; target IP 0
    f
}

/// Version of [`NetState`].
pub const NET_STATE_VERSION: u32 = 3;

/// A NIC's saved identity, the frames it holds for the guest and whether it waits for the
/// guest to acknowledge an announcement (version 3; version 2 had no control queue and no
/// announcement, version 1 no frames); queue positions are in the transport's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub version: u32,
    pub tap: String,
    pub mac: [u8; 6],
    /// Frames that reached the NIC and not yet the guest (read from the tap while it waited
    /// for receive buffers, or drained from the tap when it was released for a move): the
    /// guest gets them first wherever it resumes, instead of losing them.
    pub pending: Vec<Vec<u8>>,
    /// `VIRTIO_NET_S_ANNOUNCE` is set: the guest was asked to announce itself and has not
    /// acknowledged yet (a move in between carries the request on).
    pub announcing: bool,
}

pub struct Net {
    /// None while released (hand-over to another host).
    tap: Option<Tap>,
    name: String,
    mac: [u8; 6],
    sizes: [u16; 3],
    /// Frames read from the tap that wait for a receive buffer.
    pending: std::collections::VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    announcing: bool,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            name: tap.name().to_string(),
            tap: Some(tap),
            mac,
            sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
            pending: Default::default(),
            buf: vec![0; 65536],
            announcing: false,
        }
    }

    pub fn from_state(s: &NetState) -> Result<Self, String> {
        let NetState {
            version,
            tap,
            mac,
            pending,
            announcing,
        } = s;
        if *version != NET_STATE_VERSION {
            return Err(format!(
                "virtio-net state version {version} (this Ferry reads {NET_STATE_VERSION})"
            ));
        }
        if pending.len() > MAX_PENDING || pending.iter().any(|f| f.len() > MAX_FRAME) {
            return Err(format!(
                "virtio-net state holds {} frames (at most {MAX_PENDING} of at most {MAX_FRAME} bytes)",
                pending.len()
            ));
        }
        let t = Tap::open(tap).map_err(|e| e.to_string())?;
        let mut n = Net::new(t, *mac);
        n.pending = pending.iter().cloned().collect();
        n.announcing = *announcing;
        Ok(n)
    }

    pub fn save(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            tap: self.name.clone(),
            mac: self.mac,
            pending: self.pending.iter().cloned().collect(),
            announcing: self.announcing,
        }
    }

    /// The tap's descriptor, for the receive thread's poll.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.tap.as_ref().map(Tap::fd)
    }

    fn transmit<M>(&mut self, q: &mut Queue, mem: &M) -> Served
    where
        M: GuestMemory,
        for<'a> <M as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let mut served = Served::default();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // A chain that is unreadable or not one frame is returned unsent (dropped, as
            // a NIC drops a bad frame); so is a frame the tap cannot take.
            if let Ok(mut r) = Reader::new(mem, chain) {
                let n = r.available_bytes();
                if n > HDR && n - HDR <= MAX_FRAME {
                    self.buf.resize(n, 0);
                    if let (Ok(()), Some(tap)) = (r.read_exact(&mut self.buf), &self.tap) {
                        let _ = tap.send(&self.buf[HDR..]);
                    }
                }
            }
            if q.add_used(mem, head, 0).is_err() {
                served.broken = true;
                return served;
            }
            served.completed += 1;
        }
        served
    }

    /// Serves the control queue: a command is a device-readable class and command byte (and
    /// data), then a device-writable ack byte. The one class this device offers is
    /// `VIRTIO_NET_CTRL_ANNOUNCE` (its `ACK` clears `VIRTIO_NET_S_ANNOUNCE`); anything else
    /// gets `VIRTIO_NET_ERR`, as the specification asks of a command a device does not know.
    fn control<M>(&mut self, q: &mut Queue, mem: &M, features: u64) -> Served
    where
        M: GuestMemory,
        for<'a> <M as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let mut served = Served::default();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut hdr = [0u8; CTRL_HDR];
            let read =
                Reader::new(mem, chain.clone()).is_ok_and(|mut r| r.read_exact(&mut hdr).is_ok());
            let ack = hdr
                == [
                    VIRTIO_NET_CTRL_ANNOUNCE as u8,
                    VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
                ];
            let ok = read && ack && features & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) != 0;
            if ok {
                self.announcing = false;
            }
            let status = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
            // No writable byte: nowhere to answer (the chain is returned, nothing written).
            let written = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= 1 => w.write_all(&[status]).is_ok() as u32,
                _ => 0,
            };
            if q.add_used(mem, head, written).is_err() {
                served.broken = true;
                return served;
            }
            served.completed += 1;
        }
        served
    }

    fn receive<M>(&mut self, q: &mut Queue, mem: &M) -> Served
    where
        M: GuestMemory,
        for<'a> <M as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let mut served = Served::default();
        loop {
            if self.pending.is_empty() {
                let Some(tap) = self.tap.as_ref() else { break };
                self.buf.resize(65536, 0);
                match tap.recv(&mut self.buf) {
                    Ok(Some(n)) if n <= MAX_FRAME => self.pending.push_back(self.buf[..n].to_vec()),
                    Ok(Some(_)) => continue, // larger than any frame: dropped
                    Ok(None) | Err(_) => break,
                }
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffer: keep what was read for the driver's next refill.
                while self.pending.len() > MAX_PENDING {
                    self.pending.pop_front();
                }
                break;
            };
            let head = chain.head_index();
            let frame = self.pending.pop_front().unwrap_or_default();
            let mut hdr = [0u8; HDR];
            hdr[10] = 1; // num_buffers
            let delivered = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= HDR + frame.len() => {
                    w.write_all(&hdr).is_ok() && w.write_all(&frame).is_ok()
                }
                _ => false,
            };
            // A buffer too small or outside memory gets the frame dropped and comes back empty.
            let len = if delivered {
                (HDR + frame.len()) as u32
            } else {
                0
            };
            if q.add_used(mem, head, len).is_err() {
                served.broken = true;
                return served;
            }
            served.completed += 1;
        }
        served
    }
}

impl<M> VirtioDevice<M> for Net
where
    M: GuestMemory,
    for<'a> <M as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    fn save(&self) -> crate::DeviceState {
        crate::DeviceState::Net(Net::save(self))
    }

    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_CTRL_VQ)
            | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        let mut status = VIRTIO_NET_S_LINK_UP as u16;
        if self.announcing {
            status |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        c[6..8].copy_from_slice(&status.to_le_bytes());
        let at = offset as usize;
        if let Some(src) = c.get(at..at.saturating_add(data.len())) {
            data.copy_from_slice(src);
        }
    }

    fn process(&mut self, index: usize, queue: &mut Queue, mem: &M, features: u64) -> Served {
        if !queue.is_valid(mem) {
            return Served {
                broken: true,
                ..Served::default()
            };
        }
        match index {
            TX => self.transmit(queue, mem),
            RX => self.receive(queue, mem),
            CTRL => self.control(queue, mem, features),
            _ => Served::default(),
        }
    }

    fn poll_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        self.fd().map(|fd| (fd, RX))
    }

    fn holds_data(&self) -> bool {
        self.tap.is_some() && !self.pending.is_empty()
    }

    fn announce(&mut self) -> bool {
        self.tap
            .as_ref()
            .is_some_and(|t| t.send(&rarp(self.mac)).is_ok())
    }

    /// Asks the guest to announce itself, if its driver negotiated `GUEST_ANNOUNCE` (which
    /// needs the control queue) and is not still busy with the last request.
    fn guest_announce(&mut self, features: u64) -> bool {
        let want = (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) | (1 << VIRTIO_NET_F_CTRL_VQ);
        if features & want != want || self.announcing || self.tap.is_none() {
            return false;
        }
        self.announcing = true;
        true
    }

    /// Lets go of the tap for a move (the VM is paused): what the tap still holds for the
    /// guest is read out first and kept with the frames already waiting, so the state carries
    /// them to wherever the guest resumes (or they are delivered here if the move fails).
    fn release(&mut self) -> Result<(), String> {
        if let Some(tap) = self.tap.take() {
            self.buf.resize(65536, 0);
            while let Ok(Some(n)) = tap.recv(&mut self.buf) {
                if n <= MAX_FRAME {
                    self.pending.push_back(self.buf[..n].to_vec());
                }
            }
            while self.pending.len() > MAX_PENDING {
                self.pending.pop_front();
            }
        }
        Ok(())
    }

    fn reacquire(&mut self) -> Result<(), String> {
        if self.tap.is_none() {
            self.tap = Some(Tap::open(&self.name).map_err(|e: TapError| e.to_string())?);
        }
        Ok(())
    }
}
