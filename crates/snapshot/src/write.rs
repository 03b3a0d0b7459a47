//! Writing a snapshot: memory runs stream into `memory.bin.tmp`; `finish` makes everything
//! durable (fsync), reads the memory back to check every CRC, and only then renames the files
//! into place, so a crash or a failed check never leaves a half-written snapshot that reads as
//! valid.
use crate::format::*;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes written between starts of background writeback.
const WRITEBACK_CHUNK: u64 = 64 << 20;

/// A finished snapshot: its META and where the time went.
#[derive(Debug, Clone)]
pub struct Written {
    pub meta: Meta,
    /// Waiting for memory.bin to reach the disk.
    pub sync_ms: f64,
    /// Reading memory.bin back and checking every CRC.
    pub verify_ms: f64,
}

pub struct Writer {
    dir: PathBuf,
    mem: File,
    /// Bytes written since writeback was last started.
    unsynced: u64,
    offset: u64,
    runs: Vec<Run>,
    id: u64,
}

fn tmp(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.tmp"))
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let v = u64::from_le_bytes(b);
    if n == 8 && v != 0 {
        v
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        (t as u64) | 1
    }
}

impl Writer {
    /// Starts a snapshot in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<Writer, FormatError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let p = tmp(dir, MEMORY_FILE);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .map_err(io(&p))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            mem: f,
            unsynced: 0,
            offset: 0,
            runs: Vec::new(),
            id: random_id(),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Stores `data` (whole pages, at most MAX_RUN_PAGES) as the guest memory at `gpa`.
    pub fn add_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), FormatError> {
        let pages = (data.len() as u64 / PAGE) as u32;
        assert!(
            (data.len() as u64).is_multiple_of(PAGE) && pages > 0 && pages <= MAX_RUN_PAGES,
            "whole pages, one run"
        );
        let p = tmp(&self.dir, MEMORY_FILE);
        self.mem.write_all(data).map_err(io(&p))?;
        self.unsynced += data.len() as u64;
        if self.unsynced >= WRITEBACK_CHUNK {
            // Start writeback of what is written so far, so the disk works while we scan and
            // the final fsync has little left to wait for.
            // SAFETY: plain syscall on our own file descriptor.
            unsafe {
                libc::sync_file_range(
                    std::os::fd::AsRawFd::as_raw_fd(&self.mem),
                    (self.offset + data.len() as u64 - self.unsynced) as libc::off64_t,
                    self.unsynced as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.unsynced = 0;
        }
        self.runs.push(Run {
            gpa,
            pages,
            data: RunData::File {
                offset: self.offset,
                crc: crc32c::crc32c(data),
            },
        });
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Records `pages` zero pages at `gpa` (diff snapshots: they may overwrite parent data).
    pub fn add_zero(&mut self, gpa: u64, pages: u32) {
        self.runs.push(Run {
            gpa,
            pages,
            data: RunData::Zero,
        });
    }

    /// Writes the state file, makes both files durable, verifies the memory CRCs and moves the
    /// snapshot into place. Returns what META says.
    pub fn finish(self, parent: Option<ParentRef>, state: &[u8]) -> Result<Written, FormatError> {
        let Writer {
            dir, mem, runs, id, ..
        } = self;
        let mp = tmp(&dir, MEMORY_FILE);
        let t_sync = std::time::Instant::now();
        mem.sync_all().map_err(io(&mp))?;
        let sync_ms = t_sync.elapsed().as_secs_f64() * 1e3;
        let meta = Meta {
            id,
            parent: parent.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            writer: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        };
        let enc = |what: &str, e: postcard::Error| FormatError::Invalid {
            path: dir.clone(),
            what: format!("encoding {what}: {e}"),
        };
        let sections: [(u32, Vec<u8>); 3] = [
            (
                SECTION_META,
                postcard::to_stdvec(&meta).map_err(|e| enc("META", e))?,
            ),
            (SECTION_STATE, state.to_vec()),
            (
                SECTION_MEMORY_INDEX,
                postcard::to_stdvec(&runs).map_err(|e| enc("MEMORY_INDEX", e))?,
            ),
        ];
        let sp = tmp(&dir, STATE_FILE);
        let mut f = File::create(&sp).map_err(io(&sp))?;
        f.write_all(&header(
            id,
            parent.as_ref().map(|p| p.id).unwrap_or(0),
            sections.len() as u32,
        ))
        .map_err(io(&sp))?;
        for (kind, payload) in &sections {
            if payload.len() as u64 > MAX_SECTION {
                return Err(FormatError::Oversized {
                    path: sp,
                    section: "STATE",
                    len: payload.len() as u64,
                });
            }
            f.write_all(&section_header(*kind, payload))
                .map_err(io(&sp))?;
            f.write_all(payload).map_err(io(&sp))?;
        }
        f.sync_all().map_err(io(&sp))?;
        // Verify what was written before anyone relies on it, then move it into place.
        let check = Snapshot::read_named(
            &dir,
            &format!("{STATE_FILE}.tmp"),
            &format!("{MEMORY_FILE}.tmp"),
        )?;
        let t_verify = std::time::Instant::now();
        check.verify_memory()?;
        let verify_ms = t_verify.elapsed().as_secs_f64() * 1e3;
        std::fs::rename(&mp, dir.join(MEMORY_FILE)).map_err(io(&mp))?;
        std::fs::rename(&sp, dir.join(STATE_FILE)).map_err(io(&sp))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        Ok(Written {
            meta,
            sync_ms,
            verify_ms,
        })
    }
}
