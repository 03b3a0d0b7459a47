//! The VM slot an API server serves: filled at start (`ferry run`, `ferry restore`) or later
//! through `PUT /vm/restore` (an empty VMM: `ferry run --api-socket S` alone).
use ferry_migration::engine::Monitor;
use ferry_vmm::disk_move::MoveMonitor;
use ferry_vmm::Vm;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

pub struct Host {
    vm: Mutex<Option<Arc<Vm>>>,
    /// The running or last live migration, and whether it is still running.
    migration: Mutex<(Option<Arc<Monitor>>, bool)>,
    /// The running or last disk move, and whether it is still running. A disk move and a
    /// migration exclude each other (the migration releases the disk the move mirrors).
    disk_move: Mutex<(Option<Arc<MoveMonitor>>, bool)>,
    filled: Condvar,
    /// Where a VM created through the API writes its console (None: stdout).
    pub console_log: Option<PathBuf>,
    /// Set while the VM is still arriving by post-copy (some of its memory is elsewhere).
    incoming: Arc<AtomicBool>,
}

impl Host {
    pub fn new(vm: Option<Arc<Vm>>, console_log: Option<PathBuf>) -> Arc<Host> {
        Self::arriving(vm, console_log, Arc::default())
    }

    /// A host whose VM is still arriving by post-copy while `incoming` is true.
    pub fn arriving(
        vm: Option<Arc<Vm>>,
        console_log: Option<PathBuf>,
        incoming: Arc<AtomicBool>,
    ) -> Arc<Host> {
        Arc::new(Host {
            vm: Mutex::new(vm),
            migration: Mutex::new((None, false)),
            disk_move: Mutex::new((None, false)),
            filled: Condvar::new(),
            console_log,
            incoming,
        })
    }

    /// True while some of the VM's memory is still at the source (post-copy).
    pub fn arriving_now(&self) -> bool {
        self.incoming.load(Ordering::SeqCst)
    }

    pub fn vm(&self) -> Option<Arc<Vm>> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a VM in the empty slot; false when there already is one.
    pub fn fill(&self, vm: Arc<Vm>) -> bool {
        let mut g = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return false;
        }
        *g = Some(vm);
        self.filled.notify_all();
        true
    }

    /// Registers a new migration; refused (with the reason) while another one, or a disk
    /// move, runs.
    pub fn begin_migration(&self) -> Result<Arc<Monitor>, &'static str> {
        let moving = self.disk_move.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 {
            return Err("a migration of this VM is already running");
        }
        if moving.1 {
            return Err(
                "a disk move is running; wait for it or cancel it (PUT /vm/disk/move/cancel)",
            );
        }
        let m = Arc::new(Monitor::default());
        *g = (Some(m.clone()), true);
        Ok(m)
    }

    /// Registers a new disk move; refused while another one, or a migration, runs.
    pub fn begin_disk_move(&self) -> Result<Arc<MoveMonitor>, &'static str> {
        let mut g = self.disk_move.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 {
            return Err("a disk move is already running");
        }
        if self.migrating() {
            return Err("a migration of this VM is running; a disk moves before or after it");
        }
        let m = Arc::new(MoveMonitor::default());
        *g = (Some(m.clone()), true);
        Ok(m)
    }

    pub fn end_disk_move(&self) {
        self.disk_move.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
    }

    /// The running or last disk move, and whether it still runs.
    pub fn disk_move(&self) -> (Option<Arc<MoveMonitor>>, bool) {
        self.disk_move
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn end_migration(&self) {
        self.migration.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
    }

    pub fn migration(&self) -> Option<Arc<Monitor>> {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    pub fn migrating(&self) -> bool {
        self.migration.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Blocks until the slot holds a VM.
    pub fn wait_for_vm(&self) -> Arc<Vm> {
        let mut g = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(vm) = g.as_ref() {
                return vm.clone();
            }
            g = self.filled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}
