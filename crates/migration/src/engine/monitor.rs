//! A migration seen from outside while it runs: progress figures for `GET /vm/migration` and
//! the progress bar, and the cancel switch.
use super::Report;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Setup,
    /// The disks' bulk copy (shared-nothing migration), before the memory passes.
    Storage,
    PreCopy,
    SwitchOver,
    /// The VM runs on the destination; the pages it lacks are still being sent.
    PostCopy,
    /// Post-copy with the link broken: reconnecting (the destination's vCPUs that touch a
    /// missing page wait).
    PostCopyPaused,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    /// After a post-copy switch-over: the VM runs on the destination, part of its memory is
    /// still here.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Phase::PostCopy | Phase::PostCopyPaused)
    }
}

/// Snapshot of a migration's progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub pass: u32,
    /// Pages of the current pass, and how many have been sent.
    pub pass_pages: u64,
    pub pass_sent: u64,
    /// Pages the next pass would carry (the last dirty count).
    pub dirty_pages: u64,
    pub wire_bytes: u64,
    pub bandwidth_bytes_per_s: f64,
    pub dirty_pages_per_s: f64,
    /// Time left for the current pass at the measured bandwidth.
    pub eta_ms: f64,
    pub throttle_percent: u8,
    /// Shared-nothing migration: the disks' total size, how far their copy has got, and
    /// the data it sent.
    #[serde(default)]
    pub disk_bytes: u64,
    #[serde(default)]
    pub disk_cursor: u64,
    #[serde(default)]
    pub disk_copied: u64,
    pub elapsed_ms: f64,
    pub report: Option<Report>,
    pub error: Option<String>,
}

/// Shared between the engine and whoever watches or cancels it.
pub struct Monitor {
    cancel: AtomicBool,
    started: Instant,
    pub(crate) pass_sent: AtomicU64,
    pub(crate) wire_bytes: AtomicU64,
    pub(crate) throttle: AtomicU8,
    status: Mutex<Status>,
    /// When the current pass began, and the bytes on the wire then (for its live rate).
    pass_start: Mutex<(Instant, u64)>,
    /// A broken post-copy should try to reconnect now (rather than at its next retry), to
    /// this address if one is given.
    resume: Mutex<(bool, Option<String>)>,
    resume_cv: Condvar,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            cancel: AtomicBool::new(false),
            started: Instant::now(),
            pass_sent: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            throttle: AtomicU8::new(0),
            status: Mutex::new(Status::default()),
            pass_start: Mutex::new((Instant::now(), 0)),
            resume: Mutex::new((false, None)),
            resume_cv: Condvar::new(),
        }
    }
}

impl Monitor {
    /// Asks the migration to stop; it rolls back unless it has already committed.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Asks a broken post-copy to reconnect now, to `to` if given (the address then holds for
    /// every later reconnect: see [`Monitor::target`]).
    pub fn resume_postcopy(&self, to: Option<String>) {
        let mut g = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = true;
        if to.is_some() {
            g.1 = to;
        }
        self.resume_cv.notify_all();
    }

    /// The address a resume request named, if any.
    pub fn target(&self) -> Option<String> {
        self.resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Waits up to `timeout` for a resume request; consumes it.
    pub(crate) fn wait_resume_request(&self, timeout: std::time::Duration) {
        let g = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = self
            .resume_cv
            .wait_timeout_while(g, timeout, |g| !g.0)
            .unwrap_or_else(|e| e.into_inner());
        g.0 = false;
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Starts pass `pass` of `pages` pages.
    pub(crate) fn begin_pass(&self, pass: u32, pages: u64, phase: Phase) {
        *self.pass_start.lock().unwrap_or_else(|e| e.into_inner()) =
            (Instant::now(), self.wire_bytes.load(Ordering::Relaxed));
        // Under the status lock, so a reader never sees the new pass with the old count.
        self.update(|s| {
            self.pass_sent.store(0, Ordering::SeqCst);
            s.pass = pass;
            s.pass_pages = pages;
            s.phase = phase;
        });
    }

    pub fn status(&self) -> Status {
        let (mut s, sent) = {
            let g = self.status.lock().unwrap_or_else(|e| e.into_inner());
            (g.clone(), self.pass_sent.load(Ordering::SeqCst))
        };
        if s.report.is_none() {
            s.pass_sent = sent.min(s.pass_pages);
            s.wire_bytes = self.wire_bytes.load(Ordering::Relaxed);
            s.throttle_percent = self.throttle.load(Ordering::Relaxed);
            s.elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;
            // While a pass runs long enough to measure, its own rate is the best estimate.
            let (t, w0) = *self.pass_start.lock().unwrap_or_else(|e| e.into_inner());
            let secs = t.elapsed().as_secs_f64();
            if secs > 0.2 && s.wire_bytes > w0 {
                s.bandwidth_bytes_per_s = (s.wire_bytes - w0) as f64 / secs;
            }
            if s.bandwidth_bytes_per_s > 0.0 {
                let left = (s.pass_pages - s.pass_sent) as f64 * 4096.0;
                s.eta_ms = left / s.bandwidth_bytes_per_s * 1e3;
            }
        }
        s
    }

    /// Records how the migration ended.
    pub(crate) fn finish(&self, r: &Result<Report, super::EngineError>) {
        self.update(|s| match r {
            Ok(rep) => {
                s.phase = Phase::Completed;
                s.wire_bytes = rep.wire_bytes;
                s.elapsed_ms = rep.total_ms;
                s.eta_ms = 0.0;
                s.pass_sent = s.pass_pages;
                s.report = Some(rep.clone());
            }
            Err(e) => {
                s.phase = if matches!(e, super::EngineError::Cancelled) {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                s.error = Some(e.to_string());
            }
        });
    }
}
