//! Live migration of a KVM VM: the ferry-migration engine's `SourceVm` and `DestinationVm`
//! implemented on [`Vm`] and [`Incoming`].
use crate::vm::{Incoming, RunState, Vm, VmConfig, VmState};
use ferry_migration::engine::{DestinationVm, SourceVm};
use std::io::Write;
use vm_memory::{Bytes, GuestAddress};

/// A running (or paused) VM as a migration source.
pub struct LiveSource<'a> {
    vm: &'a Vm,
    was_paused: bool,
    was_logging: bool,
}

impl<'a> LiveSource<'a> {
    pub fn new(vm: &'a Vm) -> Self {
        LiveSource {
            vm,
            was_paused: vm.state() == RunState::Paused,
            was_logging: vm.dirty_logging(),
        }
    }
}

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl SourceVm for LiveSource<'_> {
    fn config(&self) -> Vec<u8> {
        postcard::to_stdvec(self.vm.config()).unwrap_or_default()
    }
    fn populated(&self) -> Result<Vec<u64>, String> {
        Ok(crate::snapshot::populated(self.vm)
            .map_err(text)?
            .pages()
            .collect())
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.vm
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(text)
    }
    fn start_dirty_log(&self) -> Result<(), String> {
        self.vm.start_dirty_log().map_err(text)
    }
    fn stop_dirty_log(&self) -> Result<(), String> {
        // A VM that logged before (for diff snapshots) keeps logging.
        if self.was_logging {
            return Ok(());
        }
        self.vm.stop_dirty_log().map_err(text)
    }
    fn fetch_dirty(&self) -> Result<Vec<u64>, String> {
        Ok(self.vm.fetch_dirty().map_err(text)?.pages().collect())
    }
    fn pause(&self) -> Result<(), String> {
        if self.vm.state() == RunState::Paused {
            return Ok(());
        }
        self.vm.pause().map_err(text)
    }
    fn resume(&self) -> Result<(), String> {
        if self.was_paused {
            return Ok(());
        }
        self.vm.resume().map_err(text)
    }
    fn throttle(&self, percent: u8) -> Result<(), String> {
        self.vm.set_throttle(percent).map_err(text)
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        postcard::to_stdvec(&self.vm.save_state().map_err(text)?).map_err(text)
    }
}

/// The receiving side: builds the VM from the source's configuration, fills its memory, loads
/// its state, and starts it on commit.
pub struct LiveDestination {
    incoming: Option<Incoming>,
    /// In a Mutex only so the destination is `Sync` (pages are written from several threads).
    console: std::sync::Mutex<Option<Box<dyn Write + Send>>>,
    vm: Option<Vm>,
}

impl LiveDestination {
    pub fn new(console: Box<dyn Write + Send>) -> Self {
        LiveDestination {
            incoming: None,
            console: std::sync::Mutex::new(Some(console)),
            vm: None,
        }
    }

    /// The VM, once the migration has committed (running).
    pub fn into_vm(self) -> Option<Vm> {
        self.vm
    }
}

impl DestinationVm for LiveDestination {
    fn prepare(&mut self, config: &[u8]) -> Result<(), String> {
        let config: VmConfig =
            postcard::from_bytes(config).map_err(|e| format!("VM configuration: {e}"))?;
        self.incoming = Some(Vm::incoming(&config).map_err(text)?);
        Ok(())
    }
    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let inc = self
            .incoming
            .as_ref()
            .ok_or("pages before the VM was built")?;
        inc.memory()
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| format!("page {gpa:#x}: {e}"))
    }
    fn prefault(&self, gpa: u64, len: u64) -> Result<(), String> {
        let inc = self
            .incoming
            .as_ref()
            .ok_or("prefault before the VM was built")?;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mem = inc.memory();
        let region = mem
            .find_region(GuestAddress(gpa))
            .ok_or_else(|| format!("{gpa:#x} is not guest RAM"))?;
        let offset = gpa - region.start_addr().0;
        let len = len.min(region.len() - offset) as usize;
        // SAFETY: [offset, offset + len) lies inside this region's anonymous mapping (clamped
        // to its length just above), which lives as long as `inc`. MADV_POPULATE_WRITE only
        // maps its pages (zero-filled where absent, untouched where present); it never changes
        // their contents.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().add(offset as usize) as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }
    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        let state: VmState = postcard::from_bytes(state).map_err(|e| format!("VM state: {e}"))?;
        let inc = self
            .incoming
            .take()
            .ok_or("state before the VM was built")?;
        let console = self
            .console
            .get_mut()
            .map_err(|_| "console lock poisoned")?
            .take()
            .ok_or("state loaded twice")?;
        self.vm = Some(inc.finish(&state, console).map_err(text)?);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.vm
            .as_ref()
            .ok_or("no VM to resume")?
            .start()
            .map_err(text)
    }
}
