//! The pre-copy engine: source and destination of one migration over one control connection
//! and N data connections.
//!
//! Source: handshake on the control connection; N data connections join; dirty logging on;
//! pass 1 sends every populated page; each further pass sends the pages dirtied during the
//! previous one, spread over the data connections, while the engine measures bandwidth and
//! dirty rate and predicts the downtime of stopping now (pages left ÷ bandwidth). When the
//! prediction is under the limit (or the pass limit or the timeout with the switch-over policy
//! is reached) it pauses the VM, sends the last dirty pages and the VM's state, waits for
//! Ready, sends Commit, and waits for Resumed. With auto-converge, a pass that leaves more
//! than half of what it sent dirty again throttles the vCPUs one step further.
//!
//! Guarantees: any failure or cancel before Commit resumes (and unthrottles) the source as if
//! nothing happened, and the destination, which resumes only on Commit, discards everything.
//! After Commit the source never resumes by itself: without Resumed the outcome is in doubt
//! and the source VM stays paused (two running copies are worse than a stopped one).
//!
//! Order across connections: a page may travel in pass k on one connection and again in pass
//! k+1 on another. Each data connection ends its share of a pass with `EndOfPass`, and the
//! destination's receivers wait for each other there, so no page of pass k+1 is written before
//! every page of pass k.
mod acceptor;
mod destination;
mod monitor;
mod pageset;
mod postcopy_dst;
mod postcopy_src;
mod seeded;
mod sender;
mod source;
mod storage;

pub use acceptor::{Acceptor, Incoming};
pub use destination::{receive, Received};
pub use monitor::{Monitor, Phase, Status};
pub use pageset::PageSet;
pub use source::migrate;
pub use storage::{DiskCopy, DiskLink, StorageReport};

use crate::protocol::{Compression, PostCopyFigures, ProtocolError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the engine needs from the VM being sent. Errors are the VM layer's text. Several data
/// connections read pages at once, so the VM is shared between threads.
pub trait SourceVm: Sync {
    /// The VM's configuration, sent so the destination builds an identical VM.
    fn config(&self) -> Vec<u8>;
    /// Guest addresses end below this (sizes the engine's page sets).
    fn memory_end(&self) -> u64;
    /// Adds every page the guest may have written to `into` (the first pass sends these;
    /// the rest are zero).
    fn populated(&self, into: &PageSet) -> Result<(), String>;
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String>;
    fn start_dirty_log(&self) -> Result<(), String>;
    fn stop_dirty_log(&self) -> Result<(), String>;
    /// Adds the pages dirtied since the last call (or since logging started) to `into`.
    fn fetch_dirty(&self, into: &PageSet) -> Result<(), String>;
    /// Called right before the pages named by `words` (word `first + i` holds 64 pages from
    /// page `64 (first + i)`) are read for sending: a write from now on must show in the next
    /// [`SourceVm::fetch_dirty`]. With KVM's manual dirty-log protection this is where those
    /// pages are write-protected again, a few at a time over the pass instead of all at
    /// once at the harvest.
    fn rearm(&self, first: usize, words: &[u64]) -> Result<(), String>;
    /// Called just before the switch-over's pause, outside the downtime: work that shortens
    /// what the pause must do (a VMM writes its disks' dirty data back here).
    fn before_pause(&self) -> Result<(), String> {
        Ok(())
    }
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// Called at the switch-over once the destination is Ready, right before Commit: the
    /// last moment the VM is still only here (a cluster hands the VM's ownership over here).
    /// [`CommitHold::Refused`] aborts the migration (the VM runs on here);
    /// [`CommitHold::InDoubt`] leaves it paused here ([`EngineError::InDoubt`]).
    fn before_commit(&self) -> Result<(), CommitHold> {
        Ok(())
    }
    /// Slows the running vCPUs to `100 - percent` % of their time (0: full speed).
    fn throttle(&self, percent: u8) -> Result<(), String>;
    /// Every vCPU's and device's state (VM paused).
    fn save_state(&self) -> Result<Vec<u8>, String>;
    /// The disks a migration that copies storage moves (`Options::copy_storage`).
    fn disks(&self) -> Vec<crate::disk_wire::DiskSpec> {
        Vec::new()
    }
    /// Starts mirroring every disk to `link`: from now on a guest write to a part already
    /// copied goes there too before it completes.
    fn mirror_disks(&self, _link: DiskLink) -> Result<(), String> {
        Err("this VM cannot copy its disks".into())
    }
    /// One step of the disks' bulk copy (a MiB or so, sent through the link).
    fn copy_disks(&self) -> Result<DiskCopy, String> {
        Err("this VM cannot copy its disks".into())
    }
    /// Ends the mirrors (a migration that failed): the disks are the VM's own images again.
    fn unmirror_disks(&self) {}
    /// The snapshot id of this VM's last seed, when every page written since it is in the
    /// dirty log (taken here, logging without a break since): a seeded migration to a
    /// destination holding that seed then sends what changed, with no hashes.
    fn seed_baseline(&self) -> Option<u64> {
        None
    }
    /// Adds the pages written since the seed of [`SourceVm::seed_baseline`] to `into` (pass
    /// 1 of such a migration sends these).
    fn changed_since_seed(&self, _into: &PageSet) -> Result<(), String> {
        Err("this VM keeps no record of what changed since a seed".into())
    }
}

/// What the engine needs from the VM being received. Pages arrive on several connections at
/// once, and in post-copy keep arriving while the VM runs, so everything after `prepare`
/// takes `&self`.
pub trait DestinationVm: Sync {
    /// Builds the VM from the source's configuration (not started).
    fn prepare(&mut self, config: &[u8]) -> Result<(), String>;
    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), String>;
    /// Maps `len` bytes from `gpa` that the source will send, ahead of the pages (a hint;
    /// called from a thread of its own while pages arrive).
    fn prefault(&self, gpa: u64, len: u64) -> Result<(), String>;
    fn load_state(&self, state: &[u8]) -> Result<(), String>;
    /// Called after Commit, before the VM first runs here: an error keeps it from running
    /// (a cluster checks here that ownership came to this host, and takes its epoch).
    fn before_resume(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self) -> Result<(), String>;
    /// Post-copy (VM not started, no page being written): drops the pages of `runs` (stale
    /// copies from earlier passes, or pages mapped ahead), so the next touch finds them
    /// missing.
    fn discard(&self, runs: &[(u64, u64)]) -> Result<(), String>;
    /// Post-copy switch-over (VM not started): from now on any touch of a page that is not
    /// present waits until it is installed; [`DestinationVm::next_fault`] names the pages
    /// waited for.
    fn begin_postcopy(&self) -> Result<(), String>;
    /// The next page a vCPU (or the VMM) waits for; None when none within `timeout`.
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, String>;
    /// Installs up to 64 consecutive pages from `gpa` (`data`: a whole number of pages) and
    /// wakes their waiters. Returns a mask of those installed by this call (bit k: page k);
    /// pages present already are left as they are.
    fn install_pages(&self, gpa: u64, data: &[u8]) -> Result<u64, String>;
    /// Installs a zero page (one the source never had); false when present already.
    fn install_zero(&self, gpa: u64) -> Result<bool, String>;
    /// Every page is in: memory behaves as ordinary memory again.
    fn end_postcopy(&self) -> Result<(), String>;
    /// Creates the disks the source sends (empty), before their data arrives.
    fn create_disks(&mut self, _disks: &[crate::disk_wire::DiskSpec]) -> Result<(), String> {
        Err("this receiver does not take disks".into())
    }
    /// Writes disk data the source sent (disk: index in the `Disks` list).
    fn disk_write(&self, _disk: u32, _offset: u64, _data: &[u8]) -> Result<(), String> {
        Err("no disks here".into())
    }
    /// The range of the disk reads as zeroes.
    fn disk_zero(&self, _disk: u32, _offset: u64, _len: u64) -> Result<(), String> {
        Err("no disks here".into())
    }
    /// Makes what was written durable; `last`: nothing follows, close the images (the VM's
    /// devices open them when the state is loaded).
    fn disk_sync(&self, _last: bool) -> Result<(), String> {
        Ok(())
    }
    /// The migration failed before commit: deletes the disks created for it.
    fn remove_disks(&self) {}
    /// Seeded migration (the source asked for it; after `prepare`): loads this host's seed
    /// of the VM into its memory and returns every page it loaded (not zero) with its
    /// content hash ([`crate::seed::page_hash`]). An error (no seed here, a seed of another
    /// VM, one that cannot be read) refuses the migration before anything is loaded.
    fn load_seed(&mut self) -> Result<Vec<(u64, crate::seed::PageHash)>, String> {
        Err("this destination holds no seed (ferry receive --seed DIR)".into())
    }
    /// After [`DestinationVm::load_seed`]: the seed's snapshot id, if it was loaded whole
    /// (every run); None when parts were left out.
    fn seed_id(&self) -> Option<u64> {
        None
    }
}

/// Why [`SourceVm::before_commit`] holds the VM back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitHold {
    /// The VM must not move (it stays here, running).
    Refused(String),
    /// Whether it may move is unknown: it must run nowhere until that is settled.
    InDoubt(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("VM: {0}")]
    Vm(String),
    #[error("cancelled")]
    Cancelled,
    #[error("stopped: another connection of this migration failed")]
    Aborted,
    /// The destination turned this host away before the migration began.
    #[error("the destination refused this host before the migration began: {0}; its log says why")]
    Refused(String),
    /// The peer went quiet, or a step it had to take did not come in time.
    #[error("{0}")]
    Stalled(String),
    #[error("timed out after {0:?} (policy: cancel)")]
    Timeout(Duration),
    #[error("migration committed, but the destination did not confirm it runs the VM ({0}); the source VM stays paused: check the destination before resuming it")]
    InDoubt(String),
    /// The hand-over before Commit could not be settled (`SourceVm::before_commit`).
    #[error("the switch-over could not be settled ({0}); the source VM stays paused")]
    HandOverInDoubt(String),
    /// After a post-copy switch-over the VM runs on the destination with part of its memory
    /// still here: neither side may drop its half.
    #[error("post-copy failed after switch-over ({0}); the VM runs on the destination with part of its memory still here: keep this host's VM paused")]
    PostCopy(String),
}

impl EngineError {
    /// True when the destination may run the VM: the source must never resume it.
    pub fn committed(&self) -> bool {
        matches!(
            self,
            EngineError::InDoubt(_) | EngineError::PostCopy(_) | EngineError::HandOverInDoubt(_)
        )
    }
}

/// What happens when `timeout` expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutPolicy {
    /// Give up; the source keeps running.
    #[default]
    Cancel,
    /// Stop the current pass and switch over now, whatever the downtime.
    SwitchOver,
}

/// Tuning of the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Switch over once the predicted downtime is under this.
    pub downtime_limit: Duration,
    /// Switch over after this many passes whatever the prediction (0: no limit).
    pub max_passes: u32,
    pub compression: Compression,
    /// Bytes per second on the wire, all connections together (None: as fast as it goes).
    pub max_bandwidth: Option<u64>,
    /// Data connections (1..=64).
    pub connections: u32,
    /// Throttle the vCPUs when the guest dirties memory faster than the link carries it.
    pub auto_converge: bool,
    pub timeout: Option<Duration>,
    pub on_timeout: TimeoutPolicy,
    /// Post-copy after this many pre-copy passes (0: at once, before any page is sent).
    pub postcopy_after: Option<u32>,
    /// Switch to post-copy when pre-copy does not converge (instead of a long pause at the
    /// pass limit or timeout, and before throttling).
    pub auto_postcopy: bool,
    /// CPU priority of the page-copying threads against the vCPUs.
    #[serde(default)]
    pub copy_priority: CopyPriority,
    /// A send or receive that makes no progress for this long fails the migration (a
    /// destination that stopped reading, or answering, without closing).
    #[serde(default = "default_io_timeout")]
    pub io_timeout: Duration,
    /// Copy the VM's disks too (shared-nothing migration): the destination creates them.
    #[serde(default)]
    pub copy_storage: bool,
    /// Where the destination puts disks, by id: (path, format); the others go to its
    /// storage directory.
    #[serde(default)]
    pub disk_map: Vec<(String, String, Option<String>)>,
    /// The destination holds a seed of this VM: pass 1 sends only the pages whose content
    /// differs from the seed's (docs/seeding.md).
    #[serde(default)]
    pub seeded: bool,
}

/// Default of [`Options::io_timeout`] and [`Limits::io_timeout`].
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn default_io_timeout() -> Duration {
    IO_TIMEOUT
}

/// What the destination tolerates from the connections it accepts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A migration whose connections all stay silent this long is given up; so is a send
    /// the source does not read.
    pub io_timeout: Duration,
    /// A new connection must have sent its first frame (Hello or Join) within this.
    pub hello_timeout: Duration,
    /// New connections waiting for their first frame at once; more are closed at once.
    pub max_pending: usize,
    /// How long the data connections have to join after Welcome.
    pub join_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            io_timeout: IO_TIMEOUT,
            hello_timeout: Duration::from_secs(5),
            max_pending: 16,
            join_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            downtime_limit: Duration::from_millis(30),
            max_passes: 30,
            compression: Compression::None,
            max_bandwidth: None,
            connections: 1,
            auto_converge: false,
            timeout: None,
            on_timeout: TimeoutPolicy::Cancel,
            postcopy_after: None,
            auto_postcopy: false,
            copy_priority: CopyPriority::Normal,
            io_timeout: IO_TIMEOUT,
            copy_storage: false,
            disk_map: Vec::new(),
            seeded: false,
        }
    }
}

/// One pass of the source.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pass {
    pub pages: u64,
    pub zero_pages: u64,
    pub wire_bytes: u64,
    /// Bytes not sent thanks to zero pages and compression.
    pub saved_bytes: u64,
    pub ms: f64,
    /// Time taken to collect the pages dirtied during the pass (the dirty-log harvest); for
    /// the switch-over, the pause and the last harvest.
    #[serde(default)]
    pub harvest_ms: f64,
    /// Pages per second the guest dirtied during this pass (what the next pass must carry).
    pub dirty_pages_per_s: f64,
    /// vCPU throttle in force during the pass (percent).
    pub throttle_percent: u8,
    /// Pages not sent because the destination's seed holds them as they are (pass 1 of a
    /// seeded migration).
    #[serde(default)]
    pub seeded_pages: u64,
}

/// What a migration did, source side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub passes: Vec<Pass>,
    /// Downtime the engine predicted when it decided to switch over.
    pub predicted_downtime_ms: f64,
    /// Source pause to the destination's Resumed.
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub wire_bytes: u64,
    /// Bytes not sent thanks to zero pages and compression.
    pub saved_bytes: u64,
    /// Bytes per second over all live (pre-copy) passes.
    pub bandwidth_bytes_per_s: f64,
    pub connections: u32,
    /// Why it switched over: "converged", "max passes", "timeout", "post-copy requested",
    /// "not converging" (automatic post-copy).
    pub switch_reason: String,
    pub max_throttle_percent: u8,
    /// Present when the migration finished by post-copy.
    pub postcopy: Option<PostCopyReport>,
    /// Present when the disks came too.
    #[serde(default)]
    pub storage: Option<StorageReport>,
    /// Pages the destination's seed offered, and those of them that matched (not sent).
    #[serde(default)]
    pub seed_offered_pages: u64,
    #[serde(default)]
    pub seeded_pages: u64,
    /// What changed since the seed came from this host's dirty log (no hashes were sent).
    #[serde(default)]
    pub seed_by_dirty_log: bool,
}

/// The post-copy phase of a migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostCopyReport {
    /// Pages the destination lacked when the VM resumed there.
    pub pages: u64,
    /// Pages the source sent in the background, and in answer to demand requests.
    pub pushed: u64,
    pub demanded: u64,
    /// The destination's own figures (faults, latency, pages installed by each path).
    pub destination: PostCopyFigures,
    /// Source pause to the destination holding every page (the source may then go).
    pub released_ms: f64,
    /// Destination resume to every page in.
    pub postcopy_ms: f64,
    /// Times the link broke and was re-established.
    pub recoveries: u32,
}

/// CPU priority of the source's pre-copy senders, the threads that copy pages while the
/// guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyPriority {
    /// The vCPUs' own priority: where senders and vCPUs compete for cores they share them.
    /// Measured here (two "hosts" on two cores): the test guest's vCPU spent 40 % of a 1 GiB
    /// pre-copy waiting on the run queue, in stalls of up to 35 ms.
    #[default]
    Normal,
    /// Behind every vCPU (nice 19): the vCPU runs and its guest does not stall (run-queue
    /// wait 1-2 %, stalls ~2 ms in the same case); the copy gets only what the vCPUs leave,
    /// so on a host whose cores are all busy running guests it can take very long. Not the
    /// default for that reason: an evacuation must finish.
    Low,
}

impl CopyPriority {
    /// Applies this priority to the calling thread (Linux: nice is per thread).
    pub(crate) fn apply(self) {
        let nice = match self {
            CopyPriority::Low => 19,
            CopyPriority::Normal => return,
        };
        // SAFETY: setpriority has no memory effects; `who` = 0 is the calling thread.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
}

fn ok<T>(r: Result<T, String>) -> Result<T, EngineError> {
    r.map_err(EngineError::Vm)
}
