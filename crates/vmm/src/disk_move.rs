//! Storage live migration on one host (`ferry disk move`): a running VM's disk moves to
//! another file, directory or format while the guest keeps using it, then the device pivots
//! to the new file.
//!
//! The disk's image is replaced by a [`Mirror`] of it onto a new, empty target image; the
//! bulk copy walks the allocated data once while every guest write behind it goes to both
//! (see `ferry_storage::mirror`), so the copy ends whatever the guest's write rate. Then the
//! target is flushed twice, the second time under the device's lock with no request in
//! flight, and the device pivots to the target: its state names the new file from then on.
//! The guest's vCPUs never stop; only its disk requests wait for that second flush (the
//! report's `pivot_us`). Cancel or any failure before the pivot puts the source image back
//! in place and deletes the target: the VM goes on with its old file, which has every write.
//! The old file is left where it was after a move (as QEMU leaves it; delete it yourself).
use crate::Vm;
use ferry_storage::mirror::{ImageSink, Mirror, Progress};
use ferry_storage::{Format, Image, StorageError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How much data one copy step moves (the longest a guest write waits for the copy).
const STEP: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("the VM has no disk {id:?} (its disks: {known})")]
    NoDisk { id: String, known: String },
    #[error("{0}")]
    Target(String),
    #[error("cannot create the target image: {0}")]
    Create(StorageError),
    #[error("disk {id}: {why}")]
    Device { id: String, why: String },
    #[error("moving disk {id} failed: {why}; the VM stays on {}", from.display())]
    Copy {
        id: String,
        from: PathBuf,
        why: String,
    },
    #[error("moving disk {id} was cancelled; the VM stays on {}", from.display())]
    Cancelled { id: String, from: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    Copying,
    Pivoting,
    Completed,
    Failed,
    Cancelled,
}

/// What `GET /vm/disk/move` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoveStatus {
    pub phase: MovePhase,
    pub disk: String,
    pub from: PathBuf,
    pub to: PathBuf,
    pub format: Format,
    #[serde(flatten)]
    pub progress: Progress,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

/// The outcome of a completed move.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoveReport {
    pub disk: String,
    pub from: PathBuf,
    pub to: PathBuf,
    pub format: Format,
    pub size: u64,
    /// Data the bulk copy moved (holes are skipped).
    pub copied_bytes: u64,
    /// Guest writes that went to both files during the move.
    pub mirrored_bytes: u64,
    pub total_ms: u64,
    /// How long the guest's disk requests waited at the pivot (the vCPUs never stopped).
    pub pivot_us: u64,
}

/// A move's progress and its cancel switch, shared with whoever watches it.
#[derive(Default)]
pub struct MoveMonitor {
    cancel: AtomicBool,
    status: Mutex<Option<MoveStatus>>,
}

impl MoveMonitor {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn status(&self) -> Option<MoveStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, f: impl FnOnce(&mut MoveStatus)) {
        if let Some(s) = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            f(s);
        }
    }
}

/// Where a move to `to` puts the image: `to` itself, or, for an existing directory, the
/// source's file name in it (with the new format's extension when the format changes).
/// The result must not exist yet and must not be the source.
pub fn target_path(
    to: &Path,
    from: &Path,
    from_format: Format,
    format: Format,
) -> Result<PathBuf, MoveError> {
    let p = if to.is_dir() {
        let name = match (from.file_stem(), from_format == format) {
            (Some(_), true) => from.file_name().map(PathBuf::from),
            (Some(stem), false) => Some(PathBuf::from(stem).with_extension(format.to_string())),
            (None, _) => None,
        }
        .ok_or_else(|| MoveError::Target(format!("{} has no file name", from.display())))?;
        to.join(name)
    } else {
        to.to_owned()
    };
    if p.exists() {
        return Err(MoveError::Target(format!(
            "{} exists; a disk moves to a new file (remove it, or name another)",
            p.display()
        )));
    }
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(MoveError::Target(format!(
            "{} is not a directory",
            parent.display()
        )));
    }
    Ok(p)
}

impl Vm {
    /// Moves disk `id` to `to` (a new file, or a directory) in `format` (default: the
    /// disk's own) while the VM runs; see the module's documentation.
    pub fn move_disk(
        &self,
        id: &str,
        to: &Path,
        format: Option<Format>,
        mon: &MoveMonitor,
    ) -> Result<MoveReport, MoveError> {
        let t0 = Instant::now();
        let slots = self.bus().virtio();
        let slot = slots
            .iter()
            .find(|s| s.with_block(|b| b.id() == id) == Some(true))
            .ok_or_else(|| MoveError::NoDisk {
                id: id.into(),
                known: slots
                    .iter()
                    .filter_map(|s| s.with_block(|b| b.id().to_string()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let device = |why: String| MoveError::Device { id: id.into(), why };
        let (from, from_format, src) = slot
            .with_block(|b| {
                let (p, f) = b.file();
                (p.to_owned(), f, b.image())
            })
            .ok_or_else(|| device("not a block device".into()))?;
        let src = src.ok_or_else(|| device("released (the VM is being handed over)".into()))?;
        if src.readonly() {
            return Err(device(
                "is read-only; a read-only disk can be copied while the VM runs".into(),
            ));
        }
        let format = format.unwrap_or(from_format);
        let to = target_path(to, &from, from_format, format)?;
        let to = std::path::absolute(&to).unwrap_or(to);
        let dst: Arc<dyn Image> =
            ferry_storage::create_for(&to, format, src.size(), src.sector_size())
                .map_err(MoveError::Create)?
                .into();
        let mirror = Arc::new(Mirror::new(src.clone(), Box::new(ImageSink(dst.clone()))));
        *mon.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(MoveStatus {
            phase: MovePhase::Copying,
            disk: id.into(),
            from: from.clone(),
            to: to.clone(),
            format,
            progress: mirror.progress(),
            elapsed_ms: 0,
            error: None,
        });
        let undo = |why: Option<String>| {
            // Back to the source for every request from now on; the target goes.
            let _ = slot.with_block(|b| b.replace_image(src.clone(), None));
            let _ = std::fs::remove_file(&to);
            mon.set(|s| {
                s.phase = if why.is_some() {
                    MovePhase::Failed
                } else {
                    MovePhase::Cancelled
                };
                s.error = why.clone();
                s.elapsed_ms = t0.elapsed().as_millis() as u64;
            });
            match why {
                Some(why) => MoveError::Copy {
                    id: id.into(),
                    from: from.clone(),
                    why,
                },
                None => MoveError::Cancelled {
                    id: id.into(),
                    from: from.clone(),
                },
            }
        };
        if let Some(Err(why)) = slot.with_block(|b| b.replace_image(mirror.clone(), None)) {
            let _ = std::fs::remove_file(&to);
            return Err(device(why));
        }
        let mut buf = Vec::new();
        let progress = loop {
            if mon.cancel.load(Ordering::SeqCst) {
                return Err(undo(None));
            }
            let p = match mirror.copy_step(STEP, &mut buf) {
                Ok(p) => p,
                Err(e) => return Err(undo(Some(mirror.failed().unwrap_or_else(|| e.to_string())))),
            };
            mon.set(|s| {
                s.progress = p;
                s.elapsed_ms = t0.elapsed().as_millis() as u64;
            });
            if p.done() {
                break p;
            }
        };
        mon.set(|s| s.phase = MovePhase::Pivoting);
        // Most of the target's data goes to disk here, with the guest's requests going on;
        // the flush under the device's lock then has only the last writes left.
        if let Err(e) = dst.flush() {
            return Err(undo(Some(format!("flushing {}: {e}", to.display()))));
        }
        if mon.cancel.load(Ordering::SeqCst) {
            return Err(undo(None));
        }
        let pivot = Instant::now();
        let pivoted = slot.with_block(|b| {
            dst.flush()
                .map_err(|e| format!("flushing {}: {e}", to.display()))?;
            if let Some(why) = mirror.failed() {
                return Err(why);
            }
            b.replace_image(dst.clone(), Some((to.clone(), format)))
        });
        let pivot_us = pivot.elapsed().as_micros() as u64;
        match pivoted {
            Some(Ok(_)) => {}
            Some(Err(why)) => return Err(undo(Some(why))),
            None => return Err(undo(Some("the device is gone".into()))),
        }
        let progress = Progress {
            mirrored: mirror.progress().mirrored,
            ..progress
        };
        let total_ms = t0.elapsed().as_millis() as u64;
        mon.set(|s| {
            s.phase = MovePhase::Completed;
            s.progress = progress;
            s.elapsed_ms = total_ms;
        });
        Ok(MoveReport {
            disk: id.into(),
            from,
            to,
            format,
            size: progress.size,
            copied_bytes: progress.copied,
            mirrored_bytes: progress.mirrored,
            total_ms,
            pivot_us,
        })
    }
}
