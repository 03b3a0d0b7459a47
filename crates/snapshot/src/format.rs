//! Byte layout, reader and validation.
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"FERRYSNP";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const SECTION_HEADER_LEN: usize = 24;
pub const PAGE: u64 = 4096;
/// Largest section accepted (bounds allocation before reading).
pub const MAX_SECTION: u64 = 256 << 20;
/// Largest run of pages in one index entry (the CRC granule).
pub const MAX_RUN_PAGES: u32 = 512;
pub const STATE_FILE: &str = "snapshot.fsnap";
pub const MEMORY_FILE: &str = "memory.bin";

/// Section kinds.
pub const SECTION_META: u32 = 1;
pub const SECTION_STATE: u32 = 2;
pub const SECTION_MEMORY_INDEX: u32 = 3;

fn section_name(kind: u32) -> &'static str {
    match kind {
        SECTION_META => "META",
        SECTION_STATE => "STATE",
        SECTION_MEMORY_INDEX => "MEMORY_INDEX",
        _ => "unknown",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a Ferry snapshot (bad magic)")]
    BadMagic(PathBuf),
    #[error("{path}: snapshot format version {found} is not supported (this Ferry reads version {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: CRC mismatch in {what}")]
    Crc { path: PathBuf, what: String },
    #[error("{path}: truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: section {section} is {len} bytes, more than the {MAX_SECTION}-byte limit")]
    Oversized {
        path: PathBuf,
        section: &'static str,
        len: u64,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: snapshot chain is broken: {what}")]
    Chain { path: PathBuf, what: String },
}

/// What `META` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub id: u64,
    /// The snapshot this one is a diff against (None: a full snapshot).
    pub parent: Option<ParentRef>,
    pub created_unix_ms: u64,
    pub writer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Directory of the parent snapshot (absolute, or relative to this snapshot's directory).
    pub dir: PathBuf,
    pub id: u64,
}

/// A run of consecutive guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub gpa: u64,
    pub pages: u32,
    pub data: RunData,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunData {
    /// All zero (stored only in diff snapshots).
    Zero,
    /// `pages * 4096` bytes at `offset` in memory.bin, with their CRC32C.
    File { offset: u64, crc: u32 },
}

/// A snapshot read and validated (all but memory.bin's data, see [`Snapshot::verify_memory`]).
#[derive(Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub meta: Meta,
    pub state: Vec<u8>,
    pub runs: Vec<Run>,
    memory_file: String,
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Header bytes for a snapshot.
pub(crate) fn header(id: u64, parent: u64, sections: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&parent.to_le_bytes());
    h[32..36].copy_from_slice(&sections.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

pub(crate) fn section_header(kind: u32, payload: &[u8]) -> [u8; SECTION_HEADER_LEN] {
    let mut h = [0u8; SECTION_HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[16..20].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Snapshot {
    /// Reads `dir/snapshot.fsnap`, checking magic, version, every length against the file
    /// and the limit before allocating, every CRC, and that memory.bin holds every run.
    pub fn read(dir: &Path) -> Result<Snapshot, FormatError> {
        Self::read_named(dir, STATE_FILE, MEMORY_FILE)
    }

    pub(crate) fn read_named(
        dir: &Path,
        state_file: &str,
        memory_file: &str,
    ) -> Result<Snapshot, FormatError> {
        let path = dir.join(state_file);
        let mut f = File::open(&path).map_err(io(&path))?;
        let size = f.metadata().map_err(io(&path))?.len();
        let trunc = |what: &str| FormatError::Truncated {
            path: path.clone(),
            what: what.into(),
        };
        if size < 8 {
            return Err(trunc("shorter than the header"));
        }
        let mut h = [0u8; HEADER_LEN];
        let n = read_full(&mut f, &mut h).map_err(io(&path))?;
        if h[0..8] != MAGIC {
            return Err(FormatError::BadMagic(path));
        }
        if n < HEADER_LEN {
            return Err(trunc("shorter than the header"));
        }
        let version = u32_at(&h, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version {
                path,
                found: version,
            });
        }
        if u32_at(&h, 60) != crc32c::crc32c(&h[..60]) {
            return Err(FormatError::Crc {
                path,
                what: "the header".into(),
            });
        }
        let (id, parent_id, count) = (u64_at(&h, 16), u64_at(&h, 24), u32_at(&h, 32));
        let mut pos = HEADER_LEN as u64;
        let (mut meta, mut state, mut index) = (None, None, None);
        for _ in 0..count {
            let mut sh = [0u8; SECTION_HEADER_LEN];
            if read_full(&mut f, &mut sh).map_err(io(&path))? < SECTION_HEADER_LEN {
                return Err(trunc("section header cut short"));
            }
            let (kind, len, crc) = (u32_at(&sh, 0), u64_at(&sh, 8), u32_at(&sh, 16));
            let name = section_name(kind);
            if sh[4..8] != [0; 4] || sh[20..].iter().any(|&b| b != 0) {
                // Reserved: a writer of this version leaves them zero; anything else was
                // altered (no CRC covers the section header itself).
                return Err(FormatError::Invalid {
                    path,
                    what: format!("section {name}: reserved header bytes are not zero"),
                });
            }
            if len > MAX_SECTION {
                return Err(FormatError::Oversized {
                    path,
                    section: name,
                    len,
                });
            }
            pos += SECTION_HEADER_LEN as u64;
            if len > size - pos {
                return Err(trunc(&format!(
                    "section {name} needs {len} bytes, {} remain",
                    size - pos
                )));
            }
            let mut payload = vec![0u8; len as usize];
            f.read_exact(&mut payload).map_err(io(&path))?;
            pos += len;
            if crc32c::crc32c(&payload) != crc {
                return Err(FormatError::Crc {
                    path,
                    what: format!("section {name}"),
                });
            }
            match kind {
                SECTION_META => meta = Some(payload),
                SECTION_STATE => state = Some(payload),
                SECTION_MEMORY_INDEX => index = Some(payload),
                k => {
                    return Err(FormatError::Invalid {
                        path,
                        what: format!("unknown section kind {k}"),
                    })
                }
            }
        }
        let missing = |s: &str| FormatError::Invalid {
            path: path.clone(),
            what: format!("section {s} is missing"),
        };
        let decode = |what: &str, e: postcard::Error| FormatError::Invalid {
            path: path.clone(),
            what: format!("section {what} does not decode: {e}"),
        };
        let meta: Meta = postcard::from_bytes(&meta.ok_or_else(|| missing("META"))?)
            .map_err(|e| decode("META", e))?;
        let state = state.ok_or_else(|| missing("STATE"))?;
        let runs: Vec<Run> = postcard::from_bytes(&index.ok_or_else(|| missing("MEMORY_INDEX"))?)
            .map_err(|e| decode("MEMORY_INDEX", e))?;
        if meta.id != id || meta.parent.as_ref().map(|p| p.id).unwrap_or(0) != parent_id {
            return Err(FormatError::Invalid {
                path,
                what: "header and META disagree".into(),
            });
        }
        let snap = Snapshot {
            dir: dir.to_path_buf(),
            meta,
            state,
            runs,
            memory_file: memory_file.to_string(),
        };
        snap.check_runs()?;
        Ok(snap)
    }

    fn check_runs(&self) -> Result<(), FormatError> {
        let path = self.memory_path();
        let size = std::fs::metadata(&path).map_err(io(&path))?.len();
        let bad = |what: String| FormatError::Invalid {
            path: path.clone(),
            what,
        };
        for r in &self.runs {
            if !r.gpa.is_multiple_of(PAGE) || r.pages == 0 || r.pages > MAX_RUN_PAGES {
                return Err(bad(format!("bad memory run {r:?}")));
            }
            let len = r.pages as u64 * PAGE;
            r.gpa
                .checked_add(len)
                .ok_or_else(|| bad(format!("memory run {r:?} overflows")))?;
            if let RunData::File { offset, .. } = r.data {
                if !offset.is_multiple_of(PAGE) {
                    return Err(bad(format!("memory run {r:?} is not page aligned")));
                }
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(FormatError::Truncated {
                        path: path.clone(),
                        what: format!(
                            "run at gpa {:#x} needs bytes up to {}, file has {size}",
                            r.gpa,
                            offset + len
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads memory.bin and checks every run's CRC.
    pub fn verify_memory(&self) -> Result<(), FormatError> {
        let path = self.memory_path();
        let mut f = File::open(&path).map_err(io(&path))?;
        let mut buf = vec![0u8; (MAX_RUN_PAGES as u64 * PAGE) as usize];
        for r in &self.runs {
            if let RunData::File { offset, crc } = r.data {
                let b = &mut buf[..(r.pages as u64 * PAGE) as usize];
                f.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
                f.read_exact(b).map_err(io(&path))?;
                if crc32c::crc32c(b) != crc {
                    return Err(FormatError::Crc {
                        path,
                        what: format!("memory run at gpa {:#x}", r.gpa),
                    });
                }
            }
        }
        Ok(())
    }

    /// Path of the memory data file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.memory_file)
    }

    /// Bytes of guest memory stored in memory.bin.
    pub fn stored_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| matches!(r.data, RunData::File { .. }))
            .map(|r| r.pages as u64 * PAGE)
            .sum()
    }

    /// This snapshot and its ancestors, full snapshot first.
    pub fn chain(dir: &Path) -> Result<Vec<Snapshot>, FormatError> {
        let mut out = vec![Snapshot::read(dir)?];
        while let Some(p) = out.last().and_then(|s| s.meta.parent.clone()) {
            if out.len() > 1024 {
                return Err(FormatError::Chain {
                    path: dir.to_path_buf(),
                    what: "more than 1024 diffs".into(),
                });
            }
            let child = out.last().map(|s| s.dir.clone()).unwrap_or_default();
            let pdir = if p.dir.is_absolute() {
                p.dir.clone()
            } else {
                child.join(&p.dir)
            };
            let parent = Snapshot::read(&pdir).map_err(|e| FormatError::Chain {
                path: child.clone(),
                what: format!("parent {}: {e}", pdir.display()),
            })?;
            if parent.meta.id != p.id {
                return Err(FormatError::Chain {
                    path: child,
                    what: format!(
                        "{} holds snapshot {:#x}, not the parent {:#x} (overwritten?)",
                        pdir.display(),
                        parent.meta.id,
                        p.id
                    ),
                });
            }
            out.push(parent);
        }
        out.reverse();
        Ok(out)
    }
}

/// Reads until `buf` is full or EOF; returns bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
