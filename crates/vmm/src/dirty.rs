//! Dirty tracking of guest RAM: KVM's dirty log for the guest's writes, [`LazyBitmap`] for
//! the VMM's own writes through vm-memory.
//!
//! Two ways of using KVM's log, chosen when the VM is created:
//! * **manual protection** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, used when the host has it,
//!   unless `FERRY_DIRTY_LOG=legacy`): every slot logs from the moment it exists, when nothing
//!   is mapped yet, so turning the log on never write-protects anything. Reading the log
//!   (`KVM_GET_DIRTY_LOG`) neither clears nor protects; `KVM_CLEAR_DIRTY_LOG` re-protects the
//!   pages it names. The migration engine clears each small group of pages right before it
//!   reads them ([`DirtyLog::clear`]), so re-protecting memory is spread over the pass
//!   instead of stalling every vCPU for the whole of memory at once. And since nothing is
//!   cleared until a migration or a snapshot does it, the log plus the VMM's bits name every
//!   page written since the VM was created: finding the populated pages costs a read of the
//!   log, not a scan of the address space (`history`).
//! * **legacy**: the log is switched on when needed and `KVM_GET_DIRTY_LOG` clears and
//!   write-protects the whole slot at each harvest.
//!
//! Slots are at most [`SLOT_BYTES`] each, so a harvest reads a large VM's log in pieces
//! through one small buffer.
use crate::memory::{GuestMem, PAGE_SIZE};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Largest KVM memory slot: a region larger than this is registered as several slots.
pub const SLOT_BYTES: u64 = 4 << 30;
/// Words of [`LazyBitmap`] allocated together (32768 pages: 128 MiB of guest memory).
const CHUNK_WORDS: usize = 512;

/// VMM-side write bitmap of one RAM region, one bit per page, allocated in chunks on first
/// write: a 512 GiB region the VMM never writes costs a few KiB of pointers.
#[derive(Debug, Default)]
pub struct LazyBitmap {
    pages: usize,
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl LazyBitmap {
    fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE_SIZE as usize);
        let chunks = pages.div_ceil(64 * CHUNK_WORDS);
        LazyBitmap {
            pages,
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
        }
    }

    fn set_page(&self, page: usize) {
        if page >= self.pages {
            return;
        }
        let (word, bit) = (page / 64, page % 64);
        let chunk = self.chunks[word / CHUNK_WORDS]
            .get_or_init(|| (0..CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect());
        chunk[word % CHUNK_WORDS].fetch_or(1 << bit, Ordering::SeqCst);
    }

    fn word(&self, word: usize) -> Option<&AtomicU64> {
        let chunk = self.chunks.get(word / CHUNK_WORDS)?.get()?;
        chunk.get(word % CHUNK_WORDS)
    }

    /// ORs words `first..first + out.len()` (page bits from this region's start) into `out`
    /// and clears them here.
    pub fn take_into(&self, first: usize, out: &mut [u64]) {
        let mut w = first;
        let end = first + out.len();
        while w < end {
            let chunk_end = (w / CHUNK_WORDS + 1) * CHUNK_WORDS;
            match self.chunks.get(w / CHUNK_WORDS).and_then(|c| c.get()) {
                Some(chunk) => {
                    for i in w..chunk_end.min(end) {
                        let v = chunk[i % CHUNK_WORDS].swap(0, Ordering::SeqCst);
                        out[i - first] |= v;
                    }
                }
                None if w / CHUNK_WORDS >= self.chunks.len() => break,
                None => {}
            }
            w = chunk_end;
        }
    }

    /// Clears every bit.
    pub fn reset(&self) {
        for c in self.chunks.iter().filter_map(|c| c.get()) {
            for w in c.iter() {
                w.store(0, Ordering::SeqCst);
            }
        }
    }
}

impl<'a> WithBitmapSlice<'a> for LazyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for LazyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE as usize;
        let last = (offset + len - 1) / PAGE_SIZE as usize;
        for p in first..=last {
            self.set_page(p);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE_SIZE as usize;
        page < self.pages
            && self
                .word(page / 64)
                .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for LazyBitmap {
    fn with_len(len: usize) -> Self {
        LazyBitmap::new(len)
    }
}

/// One KVM memory slot: a piece of a RAM region.
#[derive(Debug, Clone)]
struct Slot {
    id: u32,
    /// Index of the RAM region, and this slot's page offset in it.
    region: usize,
    region_page: u64,
    gpa: u64,
    pages: u64,
    host: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("guest memory region without a host mapping")]
    NoMapping,
    #[error("word {0} is not in guest memory")]
    OutOfRange(usize),
}

/// The dirty log of one VM (see the module documentation).
pub struct DirtyLog {
    manual: bool,
    slots: Vec<Slot>,
    /// Manual mode: the log plus the VMM's bits name every page written since the VM was
    /// created (nothing has cleared them yet).
    history: AtomicBool,
    /// Legacy mode: KVM logs now.
    on: AtomicBool,
    scratch: Mutex<Vec<u64>>,
}

#[repr(C)]
struct KvmDirtyLog {
    slot: u32,
    padding: u32,
    bitmap: u64,
}

#[repr(C)]
struct KvmClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: u64,
}

// _IOW(KVMIO, 0x42, struct kvm_dirty_log), _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log).
const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_AE42;
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xC018_AEC0;

fn ioctl<T>(vm: &VmFd, nr: libc::c_ulong, arg: &T, what: &'static str) -> Result<(), DirtyError> {
    // SAFETY: `arg` is the #[repr(C)] struct this ioctl number names, alive for the call;
    // the bitmap pointer inside it points at a buffer of at least the slot's (or the
    // range's) pages in bits, owned by the caller for the duration of the call.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), nr as _, arg as *const T) };
    if r < 0 {
        return Err(DirtyError::Kvm {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl DirtyLog {
    /// Chooses the mode and registers every RAM region with KVM as slots of at most
    /// [`SLOT_BYTES`].
    pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<DirtyLog, DirtyError> {
        let want_legacy = std::env::var("FERRY_DIRTY_LOG").is_ok_and(|v| v == "legacy");
        let manual = !want_legacy
            && vm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as _)
                & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32
                != 0
            && {
                let mut cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
                vm.enable_cap(&cap).is_ok()
            };
        let mut slots = Vec::new();
        for (region_index, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| DirtyError::NoMapping)? as u64;
            let pages = region.len() / PAGE_SIZE;
            let per = SLOT_BYTES / PAGE_SIZE;
            let mut p = 0;
            while p < pages {
                let n = (pages - p).min(per);
                slots.push(Slot {
                    id: slots.len() as u32,
                    region: region_index,
                    region_page: p,
                    gpa: region.start_addr().0 + p * PAGE_SIZE,
                    pages: n,
                    host: host + p * PAGE_SIZE,
                });
                p += n;
            }
        }
        let log = DirtyLog {
            manual,
            slots,
            history: AtomicBool::new(manual),
            on: AtomicBool::new(false),
            scratch: Mutex::new(Vec::new()),
        };
        log.set_flags(vm, manual)?;
        Ok(log)
    }

    fn set_flags(&self, vm: &VmFd, log: bool) -> Result<(), DirtyError> {
        for s in &self.slots {
            let r = kvm_userspace_memory_region {
                slot: s.id,
                flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.gpa,
                memory_size: s.pages * PAGE_SIZE,
                userspace_addr: s.host,
            };
            // SAFETY: the mapping behind `host` lives as long as the VM (both are owned by
            // `Vm`, and the memory is dropped after the VM fd); slots do not overlap.
            unsafe { vm.set_user_memory_region(r) }.map_err(|e| DirtyError::Kvm {
                what: "set memory region",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        Ok(())
    }

    /// True with manual protection.
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// Manual mode and nothing cleared yet: [`DirtyLog::harvest`] names every page ever
    /// written.
    pub fn has_history(&self) -> bool {
        self.history.load(Ordering::SeqCst)
    }

    /// The log no longer names every written page (pages were cleared, or memory was filled
    /// behind KVM's and the VMM's back, e.g. by userfaultfd or a file mapping).
    pub fn forget_history(&self) {
        self.history.store(false, Ordering::SeqCst);
    }

    /// Legacy mode: switches KVM's log on or off (on write-protects every page). Manual mode
    /// logs always; nothing to do.
    pub fn set_logging(&self, vm: &VmFd, on: bool) -> Result<(), DirtyError> {
        if self.manual {
            return Ok(());
        }
        self.set_flags(vm, on)?;
        self.on.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Calls `f(first_word, words)` for every slot with its dirty pages (word `first_word + i`
    /// = pages `64 (first_word + i) ..`, counted from guest address 0): KVM's log merged with
    /// the VMM's own writes, which are taken (cleared). Legacy mode: KVM's log is cleared and
    /// re-protected too; manual mode: KVM's log is left as it is (see [`DirtyLog::clear`]).
    pub fn harvest(
        &self,
        vm: &VmFd,
        mem: &GuestMem,
        f: impl FnMut(usize, &[u64]),
    ) -> Result<(), DirtyError> {
        self.harvest_then(vm, mem, false, f)
    }

    /// As [`DirtyLog::harvest`], and in manual mode every page reported is cleared and
    /// write-protected again right after `f` has seen it (what a snapshot's fetch needs: each
    /// write reported once).
    pub fn harvest_clearing(
        &self,
        vm: &VmFd,
        mem: &GuestMem,
        f: impl FnMut(usize, &[u64]),
    ) -> Result<(), DirtyError> {
        self.harvest_then(vm, mem, true, f)
    }

    fn harvest_then(
        &self,
        vm: &VmFd,
        mem: &GuestMem,
        clear: bool,
        mut f: impl FnMut(usize, &[u64]),
    ) -> Result<(), DirtyError> {
        let kvm_on = self.manual || self.on.load(Ordering::SeqCst);
        let regions: Vec<_> = mem.iter().collect();
        let mut buf = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        for s in &self.slots {
            let words = s.pages.div_ceil(64) as usize;
            buf.clear();
            buf.resize(words, 0);
            if kvm_on {
                let arg = KvmDirtyLog {
                    slot: s.id,
                    padding: 0,
                    bitmap: buf.as_mut_ptr() as u64,
                };
                ioctl(vm, KVM_GET_DIRTY_LOG, &arg, "get dirty log")?;
            }
            if let Some(r) = regions.get(s.region) {
                std::ops::Deref::deref(*r)
                    .bitmap()
                    .take_into((s.region_page / 64) as usize, &mut buf);
            }
            f((s.gpa / PAGE_SIZE / 64) as usize, &buf);
            if clear && self.manual && buf.iter().any(|&w| w != 0) {
                self.history.store(false, Ordering::SeqCst);
                self.clear_in(vm, s, 0, &buf)?;
            }
        }
        Ok(())
    }

    /// Manual mode: clears (and write-protects again) the pages `words` name, word `first + i`
    /// holding pages `64 (first + i) ..` from guest address 0; a write from now on shows in
    /// the next harvest. Legacy mode: nothing to do.
    pub fn clear(&self, vm: &VmFd, first: usize, words: &[u64]) -> Result<(), DirtyError> {
        if !self.manual || words.iter().all(|&w| w == 0) {
            return Ok(());
        }
        self.history.store(false, Ordering::SeqCst);
        let (mut w, end) = (first, first + words.len());
        while w < end {
            let page = w as u64 * 64;
            // Slots are in ascending address order: the last one starting at or below `page`.
            let i = self.slots.partition_point(|s| s.gpa / PAGE_SIZE <= page);
            let s = i
                .checked_sub(1)
                .map(|i| &self.slots[i])
                .filter(|s| page < s.gpa / PAGE_SIZE + s.pages)
                .ok_or(DirtyError::OutOfRange(w))?;
            let first_page = page - s.gpa / PAGE_SIZE;
            let n = ((s.pages - first_page).div_ceil(64) as usize).min(end - w);
            self.clear_in(vm, s, first_page, &words[w - first..w - first + n])?;
            w += n;
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of `words` from page `first_page` of slot `s` (a whole number of
    /// words, or up to the slot's end).
    fn clear_in(
        &self,
        vm: &VmFd,
        s: &Slot,
        first_page: u64,
        words: &[u64],
    ) -> Result<(), DirtyError> {
        let arg = KvmClearDirtyLog {
            slot: s.id,
            num_pages: (words.len() as u64 * 64).min(s.pages - first_page) as u32,
            first_page,
            bitmap: words.as_ptr() as u64,
        };
        ioctl(vm, KVM_CLEAR_DIRTY_LOG, &arg, "clear dirty log")
    }

    /// Clears everything the log holds now (manual mode; what a snapshot baseline needs).
    pub fn clear_all(&self, vm: &VmFd, mem: &GuestMem) -> Result<(), DirtyError> {
        self.harvest_clearing(vm, mem, |_, _| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{allocate, ram_layout};

    /// Writes `data` at `gpa` through the VMM path (tracked as a VMM write).
    fn vmm_write(mem: &GuestMem, gpa: u64, data: &[u8]) {
        use vm_memory::Bytes;
        mem.write_slice(data, vm_memory::GuestAddress(gpa)).unwrap();
    }

    #[test]
    fn lazy_bitmap_allocates_only_what_is_written_and_takes_words() {
        let b = LazyBitmap::new(64 << 30);
        assert!(b.chunks.iter().all(|c| c.get().is_none()));
        b.mark_dirty(5 * 4096 + 100, 5000); // pages 5 and 6
        b.mark_dirty((40 << 30) + 4096, 1);
        assert_eq!(b.chunks.iter().filter(|c| c.get().is_some()).count(), 2);
        assert!(b.dirty_at(5 * 4096) && b.dirty_at(6 * 4096) && !b.dirty_at(7 * 4096));
        let mut out = vec![0u64; 2];
        b.take_into(0, &mut out);
        assert_eq!(out, vec![0b110_0000, 0]);
        assert!(!b.dirty_at(5 * 4096), "taken");
        let w = ((40u64 << 30) / 4096 + 1) as usize;
        let mut out = vec![0u64; 1];
        b.take_into(w / 64, &mut out);
        assert_eq!(out[0], 1 << (w % 64));
        b.mark_dirty(1 << 40, 4096); // beyond the region: ignored
    }

    #[test]
    fn vmm_writes_land_in_the_lazy_bitmap() {
        let mem = allocate(&ram_layout(8 << 30).unwrap()).unwrap();
        vmm_write(&mem, 0x5000, &[1, 2, 3]);
        vmm_write(&mem, (5 << 30) + 0x1000, &[1]);
        let r = mem.find_region(vm_memory::GuestAddress(5 << 30)).unwrap();
        let page = ((5u64 << 30) + 0x1000 - r.start_addr().0) / 4096;
        assert!(r.bitmap().dirty_at(page as usize * 4096));
    }
}
