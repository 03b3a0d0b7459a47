//! A seed: a copy of a VM from earlier (a Ferry snapshot directory, or a chain of them) that
//! a destination holds before a seeded migration (docs/seeding.md). Loading it puts its
//! memory into the arriving VM's memory and returns every non-zero page's content hash; the
//! source then sends only the pages whose content differs.
//!
//! Nothing stale is used: the hashes are of what was loaded, so a page the seed got wrong
//! (a run that fails its CRC is not loaded and stays as the chain's earlier member, or zero,
//! had it) or that changed since is simply sent again. The seed's VM configuration must be
//! the arriving VM's (vCPUs, memory, boot source, disks, NICs), or it is refused.
use crate::snapshot::SnapshotError;
use crate::{GuestMem, VmConfig, VmState};
use ferry_migration::seed::{page_hash, PageHash};
use ferry_snapshot::{RunData, Snapshot};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

const PAGE: usize = 4096;

/// A seed opened and checked (headers, sections, lengths; memory data is checked as it
/// loads).
pub struct Seed {
    dir: PathBuf,
    chain: Vec<Snapshot>,
    config: VmConfig,
}

/// What loading a seed did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedLoad {
    /// Non-zero pages loaded, with their hashes, by address.
    pub pages: Vec<(u64, PageHash)>,
    /// Runs not loaded because their data failed its CRC (the source sends those pages).
    pub bad_runs: u64,
}

impl Seed {
    /// Opens the seed in `dir` (the snapshot chain it ends).
    pub fn open(dir: &Path) -> Result<Seed, SnapshotError> {
        let chain = Snapshot::chain(dir)?;
        let leaf = chain.last().ok_or_else(|| SnapshotError::State {
            dir: dir.into(),
            what: "empty chain".into(),
        })?;
        let state: VmState =
            postcard::from_bytes(&leaf.state).map_err(|e| SnapshotError::State {
                dir: dir.into(),
                what: format!("STATE does not decode: {e}"),
            })?;
        Ok(Seed {
            dir: dir.into(),
            chain,
            config: state.config,
        })
    }

    /// The seed's snapshot id (its leaf's).
    pub fn id(&self) -> u64 {
        self.chain.last().map_or(0, |s| s.meta.id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The seed's VM configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Loads the seed into `mem`, the memory of a VM being built from `config` (nothing runs
    /// in it yet). Refused, with nothing loaded, when the seed is of another VM.
    pub fn load(&self, mem: &GuestMem, config: &VmConfig) -> Result<SeedLoad, String> {
        if self.config != *config {
            return Err(format!(
                "the seed in {} is of another VM: its configuration ({} vCPUs, {} MiB, {} \
                 disks, {} NICs) is not the arriving VM's ({} vCPUs, {} MiB, {} disks, {} NICs)",
                self.dir.display(),
                self.config.cpus,
                self.config.memory >> 20,
                self.config.disks.len(),
                self.config.nets.len(),
                config.cpus,
                config.memory >> 20,
                config.disks.len(),
                config.nets.len()
            ));
        }
        let mut hashes: BTreeMap<u64, PageHash> = BTreeMap::new();
        let mut bad_runs = 0;
        let mut buf = Vec::new();
        for snap in &self.chain {
            let path = snap.memory_path();
            let mut f = std::fs::File::open(&path)
                .map_err(|e| format!("seed memory {}: {e}", path.display()))?;
            for r in &snap.runs {
                let len = r.pages as usize * PAGE;
                buf.resize(len, 0);
                match r.data {
                    RunData::Zero => buf.fill(0),
                    RunData::File { offset, crc } => {
                        f.seek(SeekFrom::Start(offset))
                            .and_then(|_| f.read_exact(&mut buf))
                            .map_err(|e| format!("seed memory {}: {e}", path.display()))?;
                        if crc32c::crc32c(&buf) != crc {
                            tracing::warn!(
                                "seed {}: the run at {:#x} fails its CRC: not loaded, sent again",
                                snap.dir.display(),
                                r.gpa
                            );
                            bad_runs += 1;
                            continue;
                        }
                    }
                }
                mem.write_slice(&buf, GuestAddress(r.gpa))
                    .map_err(|e| format!("seed run at {:#x}: {e}", r.gpa))?;
                for (i, page) in buf.chunks_exact(PAGE).enumerate() {
                    let gpa = r.gpa + (i * PAGE) as u64;
                    if page.iter().all(|&b| b == 0) {
                        hashes.remove(&gpa);
                    } else {
                        hashes.insert(gpa, page_hash(page));
                    }
                }
            }
        }
        Ok(SeedLoad {
            pages: hashes.into_iter().collect(),
            bad_runs,
        })
    }
}
