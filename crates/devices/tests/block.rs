//! virtio-blk through the virtio-mmio transport, driven by a test driver over crafted rings
//! in real guest memory (vm-memory with a dirty bitmap) and a real raw image file.
mod driver;
use driver::*;
use ferry_devices::block::{Block, BlockState, SECTOR};
use ferry_devices::{DeviceState, MmioTransport};
use ferry_storage::{Format, RawImage};
use std::path::PathBuf;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = BUF;
const STATUS: u64 = BUF + 0x100;
const DATA: u64 = 0x100000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const NEEDS_RESET: u32 = 64;
const VERSION_1: u64 = 1 << 32;

struct Disk {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn disk(len: u64) -> Disk {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    Disk { _dir: d, path }
}

fn block(d: &Disk, readonly: bool) -> Block {
    let img = RawImage::open(&d.path, readonly).unwrap();
    Block::new(
        Box::new(img),
        "ferry-disk0".into(),
        d.path.clone(),
        Format::Raw,
    )
}

fn ready(dev: Block, mem: &Mem) -> Driver {
    let mut drv = Driver::new(Box::new(dev));
    let f = drv.features();
    assert_eq!(drv.setup(f, mem) & 0xf, 0xf, "driver OK");
    drv
}

fn header(mem: &Mem, ty: u32, sector: u64) {
    mem.write_obj(ty, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// One request, data either out (device reads) or in (device writes `in_len` bytes);
/// returns (status, used length).
fn request(
    drv: &mut Driver,
    mem: &Mem,
    ty: u32,
    sector: u64,
    out: Option<&[u8]>,
    in_len: u32,
) -> (u8, u32) {
    header(mem, ty, sector);
    let mut descs = vec![(HDR, 16, 0)];
    if let Some(o) = out {
        mem.write_slice(o, GuestAddress(DATA)).unwrap();
        descs.push((DATA, o.len() as u32, 0));
    }
    if in_len > 0 {
        descs.push((DATA, in_len, F_WRITE));
    }
    descs.push((STATUS, 1, F_WRITE));
    let head = drv.post(mem, &descs);
    drv.notify(mem);
    let (id, len) = drv.next_used(mem).expect("a used entry");
    assert_eq!(id, head as u32);
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

fn pattern(sector: u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((sector * 7 + i as u64 / 512 * 13 + i as u64) % 251) as u8)
        .collect()
}

#[test]
fn every_request_type_reaches_the_image_and_dirties_what_it_writes() {
    let d = disk(16 << 20);
    let mem = memory();
    let mut drv = ready(block(&d, false), &mem);
    // Capacity in sectors in the config space.
    let mut cap = [0u8; 8];
    drv.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (16 << 20) / SECTOR);

    let data = pattern(100, 64 << 10);
    assert_eq!(
        request(&mut drv, &mem, T_OUT, 100, Some(&data), 0),
        (S_OK, 1)
    );
    assert!(
        RawImage::open(&d.path, true).is_err(),
        "the device holds the image locked"
    );
    let img = std::fs::read(&d.path).unwrap();
    assert_eq!(
        img[100 * 512..100 * 512 + data.len()],
        data[..],
        "written where the sector says"
    );

    clear_dirty(&mem);
    mem.write_slice(&vec![0u8; data.len()], GuestAddress(DATA))
        .unwrap();
    clear_dirty(&mem);
    let n = data.len() as u32;
    assert_eq!(request(&mut drv, &mem, T_IN, 100, None, n), (S_OK, n + 1));
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    for p in (DATA..DATA + n as u64).step_by(4096) {
        assert!(dirty(&mem, p), "read buffer page {p:#x} is dirty-tracked");
    }
    assert!(
        dirty(&mem, STATUS) && dirty(&mem, USED),
        "status and used ring tracked"
    );

    assert_eq!(request(&mut drv, &mem, T_FLUSH, 0, None, 0), (S_OK, 1));
    assert_eq!(request(&mut drv, &mem, T_GET_ID, 0, None, 20), (S_OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"ferry-disk0");

    // Write-zeroes over 8 sectors in place, then discard the rest.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend(n.to_le_bytes());
        s.extend(flags.to_le_bytes());
        s
    };
    assert_eq!(
        request(&mut drv, &mem, T_WRITE_ZEROES, 0, Some(&seg(100, 8, 0)), 0),
        (S_OK, 1)
    );
    assert_eq!(
        request(&mut drv, &mem, T_DISCARD, 0, Some(&seg(108, 120, 0)), 0),
        (S_OK, 1)
    );
    assert_eq!(request(&mut drv, &mem, T_IN, 100, None, n), (S_OK, n + 1));
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0), "zeroed and discarded");
    // Discard takes no flags; unknown types are unsupported.
    assert_eq!(
        request(&mut drv, &mem, T_DISCARD, 0, Some(&seg(0, 8, 1)), 0).0,
        S_UNSUPP
    );
    assert_eq!(request(&mut drv, &mem, 99, 0, None, 0).0, S_UNSUPP);
    assert!(
        drv.irq.0.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "interrupts raised"
    );
}

#[test]
fn bad_requests_get_an_error_status_and_the_queue_goes_on() {
    let d = disk(1 << 20);
    let mem = memory();
    let mut drv = ready(block(&d, false), &mem);
    let sectors = (1 << 20) / SECTOR;
    // Past the end, straddling the end, a sector number that overflows.
    assert_eq!(request(&mut drv, &mem, T_IN, sectors, None, 512).0, S_IOERR);
    assert_eq!(
        request(&mut drv, &mem, T_OUT, sectors - 1, Some(&[1; 1024]), 0).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut drv, &mem, T_IN, u64::MAX / 2, None, 512).0,
        S_IOERR
    );
    // Not a whole sector.
    assert_eq!(
        request(&mut drv, &mem, T_OUT, 0, Some(&[1; 100]), 0).0,
        S_IOERR
    );
    // A header too short.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let h = drv.post(&mem, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]);
    drv.notify(&mem);
    assert_eq!(drv.next_used(&mem), Some((h as u32, 1)));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    // Data outside guest memory: no status can be trusted, the chain is returned empty.
    header(&mem, T_IN, 0);
    drv.post(
        &mem,
        &[
            (HDR, 16, 0),
            (0x7000_0000, 512, F_WRITE),
            (STATUS, 1, F_WRITE),
        ],
    );
    drv.notify(&mem);
    assert_eq!(drv.next_used(&mem).map(|u| u.1), Some(0));
    // The status byte in a device-readable descriptor (wrong direction): nowhere to write.
    header(&mem, T_FLUSH, 0);
    drv.post(&mem, &[(HDR, 16, 0), (STATUS, 1, 0)]);
    drv.notify(&mem);
    assert_eq!(drv.next_used(&mem).map(|u| u.1), Some(0));
    // A descriptor loop: virtio-queue stops after a queue's worth; the device answers.
    header(&mem, T_FLUSH, 0);
    let head = drv.post(&mem, &[(HDR, 16, 0)]);
    drv.raw_desc(&mem, head, HDR, 16, F_NEXT, head);
    drv.notify(&mem);
    assert!(
        drv.next_used(&mem).is_some(),
        "the looping chain was returned"
    );
    // And a good request still works after all that.
    assert_eq!(
        request(&mut drv, &mem, T_OUT, 0, Some(&[7; 512]), 0),
        (S_OK, 1)
    );
    // Read-only images refuse writes, discards and write-zeroes.
    drop(drv);
    let mut drv = ready(block(&d, true), &mem);
    assert_ne!(drv.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(
        request(&mut drv, &mem, T_OUT, 0, Some(&[1; 512]), 0).0,
        S_IOERR
    );
    assert_eq!(request(&mut drv, &mem, T_IN, 0, None, 512), (S_OK, 513));
}

#[test]
fn a_queue_the_device_cannot_use_needs_a_reset_and_never_panics() {
    let d = disk(1 << 20);
    let mem = memory();
    let mut drv = ready(block(&d, false), &mem);
    // The driver claims 100 new requests in a 16-entry queue.
    drv.set_avail_idx(&mem, 100);
    drv.notify(&mem);
    assert_ne!(drv.reg(0x70) & NEEDS_RESET, 0, "NEEDS_RESET set");
    assert_eq!(drv.reg(0x60) & 2, 2, "configuration-change interrupt");
    assert_eq!(drv.used_idx(&mem), 0, "nothing was served");
    // A reset and a fresh setup bring it back.
    drv.set(0x70, 0, &mem);
    assert_eq!(drv.reg(0x70), 0);
    // Rings outside guest memory.
    drv.set(0x70, 1 | 2, &mem);
    drv.set(0x24, 1, &mem);
    drv.set(0x20, 1, &mem); // VERSION_1
    drv.set(0x70, 1 | 2 | 8, &mem);
    drv.set(0x38, QSIZE as u32, &mem);
    drv.set(0x80, 0x7fff_0000, &mem);
    drv.set(0x90, AVAIL as u32, &mem);
    drv.set(0xa0, USED as u32, &mem);
    drv.set(0x44, 1, &mem);
    drv.set(0x70, 1 | 2 | 8 | 4, &mem);
    drv.notify(&mem);
    assert_ne!(
        drv.reg(0x70) & NEEDS_RESET,
        0,
        "NEEDS_RESET for rings outside memory"
    );
}

#[test]
fn features_are_accepted_only_when_offered_and_modern() {
    let d = disk(1 << 20);
    let mem = memory();
    let mut drv = Driver::new(Box::new(block(&d, false)));
    let offered = drv.features();
    assert_ne!(offered & VERSION_1, 0);
    assert_eq!(drv.reg(0x0), 0x7472_6976, "magic");
    assert_eq!(drv.reg(0x4), 2, "version 2 (modern)");
    assert_eq!(drv.reg(0x8), 2, "block device");
    assert_eq!(
        drv.setup(offered & !VERSION_1, &mem) & 8,
        0,
        "legacy refused"
    );
    drv.set(0x70, 0, &mem);
    assert_eq!(
        drv.setup(offered | (1 << 40), &mem) & 8,
        0,
        "unoffered refused"
    );
    drv.set(0x70, 0, &mem);
    assert_eq!(drv.setup(offered, &mem) & 0xf, 0xf);
}

#[test]
fn state_saved_between_requests_restores_a_device_that_carries_on() {
    let d = disk(1 << 20);
    let mem = memory();
    let mut drv = ready(block(&d, false), &mem);
    for s in 0..5u64 {
        assert_eq!(
            request(&mut drv, &mem, T_OUT, s * 8, Some(&pattern(s, 4096)), 0).0,
            S_OK
        );
    }
    // Saved as the VMM saves at pause: flushed, transport and device state, then released
    // (as the source does before the destination opens the image); rebuilt from the state
    // while the guest's rings stay where they are in memory.
    let mut saved = String::new();
    let mut drv = drv.rebuild(|mut t| {
        t.device_mut().flush().unwrap();
        let DeviceState::Block(bs) = t.device().save() else {
            panic!("a block device saves block state")
        };
        saved = serde_json::to_string(&(t.save(), &bs)).unwrap();
        drop(t);
        let (ts, bs): (ferry_devices::MmioState, BlockState) =
            serde_json::from_str(&saved).unwrap();
        let img = RawImage::open(&bs.path, bs.readonly).unwrap();
        let dev = Block::from_state(&bs, Box::new(img)).unwrap();
        MmioTransport::from_state(&ts, Box::new(dev), Arc::new(Irq::default())).unwrap()
    });
    for s in 0..5u64 {
        let (st, _) = request(&mut drv, &mem, T_IN, s * 8, None, 4096);
        assert_eq!(st, S_OK);
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern(s, 4096), "sector {}", s * 8);
    }
    assert_eq!(drv.used_idx(&mem), 10, "the used index carried on");
    // A state whose image changed size is refused.
    let (_, bs): (ferry_devices::MmioState, BlockState) = serde_json::from_str(&saved).unwrap();
    let mut bad = bs.clone();
    bad.size += 512;
    drop(drv);
    let img = RawImage::open(&bad.path, false).unwrap();
    assert!(Block::from_state(&bad, Box::new(img)).is_err());
}

/// A raw image that counts its flushes.
struct Counting(RawImage, Arc<std::sync::atomic::AtomicUsize>);

impl ferry_storage::Image for Counting {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn readonly(&self) -> bool {
        self.0.readonly()
    }
    fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), ferry_storage::StorageError> {
        self.0.read_at(b, o)
    }
    fn write_at(&self, b: &[u8], o: u64) -> Result<(), ferry_storage::StorageError> {
        self.0.write_at(b, o)
    }
    fn flush(&self) -> Result<(), ferry_storage::StorageError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.flush()
    }
    fn discard(&self, o: u64, n: u64) -> Result<(), ferry_storage::StorageError> {
        self.0.discard(o, n)
    }
    fn write_zeroes(&self, o: u64, n: u64, u: bool) -> Result<(), ferry_storage::StorageError> {
        self.0.write_zeroes(o, n, u)
    }
    fn extents(
        &self,
        o: u64,
        n: u64,
    ) -> Result<Vec<ferry_storage::Extent>, ferry_storage::StorageError> {
        self.0.extents(o, n)
    }
}

/// A driver that did not accept VIRTIO_BLK_F_FLUSH cannot flush and takes the disk for
/// write-through (Linux does): each write is durable before it completes. One that accepted
/// it gets a write cache and flushes when it asks.
#[test]
fn writes_are_durable_on_completion_unless_the_driver_accepted_flush() {
    const F_FLUSH: u64 = 1 << 9;
    for accept_flush in [false, true] {
        let d = disk(1 << 20);
        let flushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let img = Counting(RawImage::open(&d.path, false).unwrap(), flushes.clone());
        let dev = Block::new(Box::new(img), "d".into(), d.path.clone(), Format::Raw);
        let mem = memory();
        let mut drv = Driver::new(Box::new(dev));
        let offered = drv.features();
        assert_ne!(offered & F_FLUSH, 0, "the device offers FLUSH");
        let f = if accept_flush {
            offered
        } else {
            offered & !F_FLUSH
        };
        assert_eq!(drv.setup(f, &mem) & 0xf, 0xf);
        let n =
            |f: &Arc<std::sync::atomic::AtomicUsize>| f.load(std::sync::atomic::Ordering::SeqCst);
        let (st, _) = request(&mut drv, &mem, T_OUT, 0, Some(&pattern(0, 4096)), 0);
        assert_eq!(st, S_OK);
        assert_eq!(
            n(&flushes),
            usize::from(!accept_flush),
            "after a write (flush accepted: {accept_flush})"
        );
        let zero = [0u8; 16]; // one write-zeroes segment: sector 0, 1 sector, no flags
        let mut seg = zero;
        seg[8] = 1;
        let (st, _) = request(&mut drv, &mem, T_WRITE_ZEROES, 0, Some(&seg), 0);
        assert_eq!(st, S_OK);
        assert_eq!(n(&flushes), 2 * usize::from(!accept_flush));
        let (st, _) = request(&mut drv, &mem, T_FLUSH, 0, None, 0);
        assert_eq!(st, S_OK);
        assert_eq!(n(&flushes), 2 * usize::from(!accept_flush) + 1);
        let (st, _) = request(&mut drv, &mem, T_IN, 0, None, 4096);
        assert_eq!(st, S_OK);
        assert_eq!(
            n(&flushes),
            2 * usize::from(!accept_flush) + 1,
            "reads never flush"
        );
    }
}

/// A write refused because the VMM is fenced (its lease ran out: another host may own the
/// disk) is held, not failed: no status, no used entry, the request stays on the ring, so
/// the guest never sees an I/O error its next owner would not see. Saved in that state, a
/// device on the next owner's unfenced image serves it.
#[test]
fn a_write_refused_by_the_fence_is_held_on_the_ring_for_the_next_owner() {
    use ferry_storage::fence::{Fence, FencedImage};
    let d = disk(1 << 20);
    let mem = memory();
    let fence = Fence::new(3, Some(u64::MAX));
    let img = RawImage::open(&d.path, false).unwrap();
    let fenced = FencedImage::new(Box::new(img), &d.path, fence.clone()).unwrap();
    let dev = Block::new(
        Box::new(fenced),
        "ferry-disk0".into(),
        d.path.clone(),
        Format::Raw,
    );
    let mut drv = ready(dev, &mem);
    assert_eq!(
        request(&mut drv, &mem, T_OUT, 0, Some(&pattern(0, 4096)), 0).0,
        S_OK
    );
    fence.set_deadline(0); // the lease ran out
    header(&mem, T_OUT, 8);
    mem.write_slice(&pattern(1, 4096), GuestAddress(DATA))
        .unwrap();
    drv.post(&mem, &[(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, F_WRITE)]);
    drv.notify(&mem);
    assert_eq!(drv.next_used(&mem), None, "a fenced write completed");
    assert_eq!(drv.used_idx(&mem), 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0xff,
        "a status was written"
    );
    assert!(fence.refused() >= 1);
    let on_disk = std::fs::read(&d.path).unwrap();
    assert_eq!(
        &on_disk[4096..8192],
        &[0u8; 4096][..],
        "the fenced write reached the disk"
    );
    // Another notification does not complete it either.
    drv.notify(&mem);
    assert_eq!(drv.next_used(&mem), None);
    // The next owner: the state saved now, restored over an image without the fence.
    let mut drv = drv.rebuild(|t| {
        let DeviceState::Block(bs) = t.device().save() else {
            panic!("a block device saves block state")
        };
        let ts = t.save();
        drop(t);
        let img = RawImage::open(&bs.path, false).unwrap();
        let dev = Block::from_state(&bs, Box::new(img)).unwrap();
        MmioTransport::from_state(&ts, Box::new(dev), Arc::new(Irq::default())).unwrap()
    });
    drv.notify(&mem);
    let (_, len) = drv
        .next_used(&mem)
        .expect("the held write completed on the next owner");
    assert_eq!(len, 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    let on_disk = std::fs::read(&d.path).unwrap();
    assert_eq!(&on_disk[4096..8192], &pattern(1, 4096)[..]);
}
