//! virtio-blk (virtio 1.2 §5.2): read, write, flush, get-id, discard and write-zeroes on a
//! [`ferry_storage::Image`], one request queue, served synchronously on notification.
use crate::{Served, VirtioDevice};
use ferry_storage::{Format, Image, StorageError};
use std::io::{Read, Write};
use std::path::PathBuf;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use virtio_queue::{Reader, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::GuestMemory;

pub const SECTOR: u64 = 512;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (config `seg_max`).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of an ID (`GET_ID`).
const ID_BYTES: usize = 20;
/// Largest range one discard or write-zeroes segment may cover, in sectors.
const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Segments one discard or write-zeroes request may carry.
const MAX_RANGE_SEGS: u32 = 64;
/// I/O is done through a bounce buffer of this size at most.
const CHUNK: usize = 128 << 10;

/// Version of [`BlockState`].
pub const BLOCK_STATE_VERSION: u32 = 1;

/// A block device's saved identity (version 1): which image, how. The queue positions are in
/// the transport's state; nothing is in flight when it is saved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub version: u32,
    pub id: String,
    pub path: PathBuf,
    pub format: Format,
    pub readonly: bool,
    /// Size in bytes when saved: the image must still have it.
    pub size: u64,
}

pub struct Block {
    /// None while released (the VM is paused and another host may own the image).
    image: Option<std::sync::Arc<dyn Image>>,
    id: String,
    path: PathBuf,
    format: Format,
    size: u64,
    readonly: bool,
    /// The image's logical sector (512, or 4096 for a 4K-native VHDX): offered to the
    /// driver as `blk_size` when it is not 512.
    sector: u32,
    sizes: [u16; 1],
    buf: Vec<u8>,
    /// The driver did not accept VIRTIO_BLK_F_FLUSH: writes are synced before completing.
    writethrough: bool,
}

/// How a request ended (the status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok = VIRTIO_BLK_S_OK as isize,
    IoErr = VIRTIO_BLK_S_IOERR as isize,
    Unsupp = VIRTIO_BLK_S_UNSUPP as isize,
    /// Not completed: the image refused it because this VMM is fenced. No status is
    /// written; the request stays on the ring.
    Held = 0x100,
}

/// The status a storage error ends a request with: held when the VMM is fenced (the VM
/// stops rather than see an I/O error its new owner would not see), else an I/O error.
fn failed(id: &str, e: StorageError) -> Status {
    match e {
        StorageError::Fenced { .. } | StorageError::StaleEpoch { .. } => Status::Held,
        e => {
            tracing::warn!("virtio-blk {id}: {e}");
            Status::IoErr
        }
    }
}

impl Block {
    pub fn new(image: Box<dyn Image>, id: String, path: PathBuf, format: Format) -> Self {
        Block {
            size: image.size(),
            readonly: image.readonly(),
            sector: image.sector_size(),
            image: Some(image.into()),
            id,
            path,
            format,
            sizes: [QUEUE_SIZE],
            buf: Vec::new(),
            writethrough: true,
        }
    }

    /// Rebuilds the device around `image` (opened by the caller from `s.path`).
    pub fn from_state(s: &BlockState, image: Box<dyn Image>) -> Result<Self, String> {
        let BlockState {
            version,
            id,
            path,
            format,
            readonly,
            size,
        } = s;
        if *version != BLOCK_STATE_VERSION {
            return Err(format!(
                "virtio-blk state version {version} (this Ferry reads {BLOCK_STATE_VERSION})"
            ));
        }
        if image.size() != *size || image.readonly() != *readonly {
            return Err(format!(
                "{}: the image is {} bytes{}, the VM had it as {size} bytes{}",
                path.display(),
                image.size(),
                if image.readonly() { " read-only" } else { "" },
                if *readonly { " read-only" } else { "" },
            ));
        }
        Ok(Block::new(image, id.clone(), path.clone(), *format))
    }

    pub fn save(&self) -> BlockState {
        BlockState {
            version: BLOCK_STATE_VERSION,
            id: self.id.clone(),
            path: self.path.clone(),
            format: self.format,
            readonly: self.readonly,
            size: self.size,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The image file and format the device names (in its state).
    pub fn file(&self) -> (&std::path::Path, Format) {
        (&self.path, self.format)
    }

    /// The image requests go to; None while released (a hand-over to another host).
    pub fn image(&self) -> Option<std::sync::Arc<dyn Image>> {
        self.image.clone()
    }

    /// Puts `image` (of the same size) in place of the current one, for every request from
    /// now on (a storage move installs its mirror, then pivots to the target), and names
    /// `file` in the device's state if given. Refused while released, or if the size
    /// differs. Returns the image replaced.
    pub fn replace_image(
        &mut self,
        image: std::sync::Arc<dyn Image>,
        file: Option<(PathBuf, Format)>,
    ) -> Result<std::sync::Arc<dyn Image>, String> {
        if image.size() != self.size {
            return Err(format!(
                "the new image is {} bytes, the disk {} bytes",
                image.size(),
                self.size
            ));
        }
        if image.sector_size() != self.sector {
            return Err(format!(
                "the new image has {}-byte sectors, the disk {}-byte ones",
                image.sector_size(),
                self.sector
            ));
        }
        let old = self
            .image
            .take()
            .ok_or_else(|| format!("disk {} is released (the VM is being handed over)", self.id))?;
        self.image = Some(image);
        if let Some((path, format)) = file {
            self.path = path;
            self.format = format;
        }
        Ok(old)
    }

    fn img(&self) -> Result<&dyn Image, StorageError> {
        self.image.as_deref().ok_or(StorageError::Released)
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&(self.size / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.sector.to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_RANGE_SEGS.to_le_bytes());
        let align = (u64::from(self.sector) / SECTOR) as u32;
        c[44..48].copy_from_slice(&align.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_RANGE_SEGS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Handles one request; returns the bytes written into its device-writable part, or
    /// None when it is held (not completed: [`Status::Held`]).
    fn handle<'a, B: BitmapSlice, Mm>(
        &mut self,
        chain: DescriptorChain<&'a Mm>,
        mem: &'a Mm,
    ) -> Option<u32>
    where
        Mm: GuestMemory,
        <Mm as GuestMemory>::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        let (Ok(mut r), Ok(mut w)) = (
            Reader::<B>::new(mem, chain.clone()),
            Writer::<B>::new(mem, chain),
        ) else {
            return Some(0); // an address outside memory: nowhere safe to put a status
        };
        // The status byte is the last device-writable one; without it, nothing is written.
        let Some(data_len) = w.available_bytes().checked_sub(1) else {
            return Some(0);
        };
        let Ok(mut status_w) = w.split_at(data_len) else {
            return Some(0);
        };
        let mut head = [0u8; 16];
        let status = match r.read_exact(&mut head) {
            Err(_) => Status::IoErr,
            Ok(()) => {
                let ty = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
                let sector = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
                self.request(ty, sector, &mut r, &mut w, data_len)
            }
        };
        if status == Status::Held {
            return None;
        }
        let written = w.bytes_written();
        if status_w.write_all(&[status as u8]).is_err() {
            return Some(written as u32);
        }
        Some((written + 1) as u32)
    }

    fn request<B: BitmapSlice>(
        &mut self,
        ty: u32,
        sector: u64,
        r: &mut Reader<'_, B>,
        w: &mut Writer<'_, B>,
        data_len: usize,
    ) -> Status {
        let id = self.id.clone();
        let io = |e: StorageError| failed(&id, e);
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return Status::IoErr;
        };
        match ty {
            VIRTIO_BLK_T_IN => {
                if !(data_len as u64).is_multiple_of(SECTOR) {
                    return Status::IoErr;
                }
                let mut done = 0usize;
                while done < data_len {
                    let n = (data_len - done).min(CHUNK);
                    self.buf.resize(n, 0);
                    let r = match self.image.as_deref() {
                        Some(i) => i.read_at(&mut self.buf, offset + done as u64),
                        None => Err(StorageError::Released),
                    };
                    if let Err(e) = r {
                        return io(e);
                    }
                    if w.write_all(&self.buf).is_err() {
                        return Status::IoErr;
                    }
                    done += n;
                }
                Status::Ok
            }
            VIRTIO_BLK_T_OUT => {
                let len = r.available_bytes();
                if !(len as u64).is_multiple_of(SECTOR) {
                    return Status::IoErr;
                }
                if self.readonly {
                    return Status::IoErr;
                }
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    self.buf.resize(n, 0);
                    if r.read_exact(&mut self.buf).is_err() {
                        return Status::IoErr;
                    }
                    let r = self
                        .img()
                        .and_then(|i| i.write_at(&self.buf, offset + done as u64));
                    if let Err(e) = r {
                        return io(e);
                    }
                    done += n;
                }
                self.durable()
            }
            VIRTIO_BLK_T_FLUSH => match self.img().and_then(|i| i.flush()) {
                Ok(()) => Status::Ok,
                Err(e) => io(e),
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let b = self.id.as_bytes();
                let n = b.len().min(ID_BYTES);
                id[..n].copy_from_slice(&b[..n]);
                let n = data_len.min(ID_BYTES);
                match w.write_all(&id[..n]) {
                    Ok(()) => Status::Ok,
                    Err(_) => Status::IoErr,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.ranges(ty, r),
            _ => Status::Unsupp,
        }
    }

    /// The end of a write: Ok, once it is durable when the disk is write-through.
    fn durable(&self) -> Status {
        if !self.writethrough {
            return Status::Ok;
        }
        match self.img().and_then(|i| i.flush()) {
            Ok(()) => Status::Ok,
            Err(e) => failed(&self.id, e),
        }
    }

    /// Discard and write-zeroes: a list of {sector u64, sectors u32, flags u32} segments.
    fn ranges<B: BitmapSlice>(&mut self, ty: u32, r: &mut Reader<'_, B>) -> Status {
        let len = r.available_bytes();
        if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_RANGE_SEGS as usize {
            return Status::IoErr;
        }
        if self.readonly {
            return Status::IoErr;
        }
        let mut segs = Vec::with_capacity(len / 16);
        for _ in 0..len / 16 {
            let mut s = [0u8; 16];
            if r.read_exact(&mut s).is_err() {
                return Status::IoErr;
            }
            let sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (ty == VIRTIO_BLK_T_DISCARD && flags != 0)
            {
                return Status::Unsupp;
            }
            if count > MAX_RANGE_SECTORS {
                return Status::IoErr;
            }
            let Some(offset) = sector.checked_mul(SECTOR) else {
                return Status::IoErr;
            };
            let n = count as u64 * SECTOR;
            if offset.checked_add(n).is_none_or(|end| end > self.size) {
                return Status::IoErr;
            }
            segs.push((offset, n, unmap));
        }
        for (offset, n, unmap) in segs {
            let r = self.img().and_then(|i| {
                if ty == VIRTIO_BLK_T_DISCARD {
                    i.discard(offset, n)
                } else {
                    i.write_zeroes(offset, n, unmap)
                }
            });
            if let Err(e) = r {
                return failed(&self.id, e);
            }
        }
        self.durable()
    }
}

impl<M> VirtioDevice<M> for Block
where
    M: GuestMemory,
    for<'a> <M as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
{
    fn save(&self) -> crate::DeviceState {
        crate::DeviceState::Block(Block::save(self))
    }

    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if u64::from(self.sector) != SECTOR {
            f |= 1 << VIRTIO_BLK_F_BLK_SIZE;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        let at = offset as usize;
        if let Some(src) = c.get(at..at.saturating_add(data.len())) {
            data.copy_from_slice(src);
        }
    }

    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &M, features: u64) -> Served {
        // A driver without VIRTIO_BLK_F_FLUSH cannot ask for a flush and takes the disk to
        // have no write cache (Linux does): every write is made durable before it completes.
        self.writethrough = features & (1 << VIRTIO_BLK_F_FLUSH) == 0;
        let mut served = Served::default();
        if !queue.is_valid(mem) {
            served.broken = true;
            return served;
        }
        loop {
            // An avail index more than a queue ahead is a broken driver, not work to do.
            let Ok(avail) = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) else {
                served.broken = true;
                return served;
            };
            if avail.0.wrapping_sub(queue.next_avail()) > queue.size() {
                served.broken = true;
                return served;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Some(len) = self.handle(chain, mem) else {
                // Fenced: back on the ring, and nothing more from this queue.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                served.held = true;
                break;
            };
            if queue.add_used(mem, head, len).is_err() {
                served.broken = true;
                break;
            }
            served.completed += 1;
        }
        served
    }

    fn as_block(&mut self) -> Option<&mut Block> {
        Some(self)
    }

    fn flush_handle(&self) -> Option<crate::FlushHandle> {
        let image = self.image.clone()?;
        let path = self.path.clone();
        Some(Box::new(move || {
            image
                .flush()
                .map_err(|e| format!("{}: {e}", path.display()))
        }))
    }

    fn flush(&mut self) -> Result<(), String> {
        match &self.image {
            Some(i) => i
                .flush()
                .map_err(|e| format!("{}: {e}", self.path.display())),
            None => Ok(()),
        }
    }

    fn release(&mut self) -> Result<(), String> {
        VirtioDevice::<M>::flush(self)?;
        self.image = None;
        Ok(())
    }

    fn reacquire(&mut self) -> Result<(), String> {
        if self.image.is_some() {
            return Ok(());
        }
        let img = ferry_storage::open(&self.path, self.format, self.readonly)
            .map_err(|e| e.to_string())?;
        if img.size() != self.size {
            return Err(format!(
                "{}: the image is now {} bytes, the VM had {}",
                self.path.display(),
                img.size(),
                self.size
            ));
        }
        self.image = Some(img.into());
        Ok(())
    }
}
