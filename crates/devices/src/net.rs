//! virtio-net (virtio 1.2 §5.1) on a tap: one receive and one transmit queue, the MAC in the
//! configuration space, no offloads. Transmit is served on the notifying vCPU; receive is
//! driven by the VMM's receive thread calling [`crate::MmioTransport::poll`] when the tap is
//! readable (and never while the VM is paused), and by the driver adding receive buffers.
use crate::tap::{Tap, TapError};
use crate::{Served, VirtioDevice};
use std::io::{Read, Write};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::bitmap::WithBitmapSlice;
use vm_memory::GuestMemory;

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `virtio_net_hdr_v1` before every frame.
pub const HDR: usize = 12;
/// Largest frame (no offloads: a full Ethernet frame without FCS, plus VLAN tag).
const MAX_FRAME: usize = 1518;
/// Frames read from the tap and waiting for a receive buffer.
const MAX_PENDING: usize = 64;
const RX: usize = 0;
const TX: usize = 1;

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
pub const NET_STATE_VERSION: u32 = 2;

/// A NIC's saved identity and the frames it holds for the guest (version 2; version 1 had
/// no frames); queue positions are in the transport's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub version: u32,
    pub tap: String,
    pub mac: [u8; 6],
    /// Frames that reached the NIC and not yet the guest (read from the tap while it waited
    /// for receive buffers, or drained from the tap when it was released for a move): the
    /// guest gets them first wherever it resumes, instead of losing them.
    pub pending: Vec<Vec<u8>>,
}

pub struct Net {
    /// None while released (hand-over to another host).
    tap: Option<Tap>,
    name: String,
    mac: [u8; 6],
    sizes: [u16; 2],
    /// Frames read from the tap that wait for a receive buffer.
    pending: std::collections::VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            name: tap.name().to_string(),
            tap: Some(tap),
            mac,
            sizes: [QUEUE_SIZE, QUEUE_SIZE],
            pending: Default::default(),
            buf: vec![0; 65536],
        }
    }

    pub fn from_state(s: &NetState) -> Result<Self, String> {
        let NetState {
            version,
            tap,
            mac,
            pending,
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
        Ok(n)
    }

    pub fn save(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            tap: self.name.clone(),
            mac: self.mac,
            pending: self.pending.iter().cloned().collect(),
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
        (1u64 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6] = 1; // VIRTIO_NET_S_LINK_UP
        let at = offset as usize;
        if let Some(src) = c.get(at..at.saturating_add(data.len())) {
            data.copy_from_slice(src);
        }
    }

    fn process(&mut self, index: usize, queue: &mut Queue, mem: &M, _features: u64) -> Served {
        if !queue.is_valid(mem) {
            return Served {
                broken: true,
                ..Served::default()
            };
        }
        match index {
            TX => self.transmit(queue, mem),
            RX => self.receive(queue, mem),
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
