//! Ferry's snapshot format (docs/snapshot-format.md). A snapshot is a directory:
//!
//! * `snapshot.fsnap` — header (magic, format version, id, parent id) and sections, each with
//!   its length and CRC32C: `META` (creation info, parent link), `STATE` (the VM's state,
//!   opaque bytes here), `MEMORY_INDEX` (runs of guest pages).
//! * `memory.bin` — the data of the non-zero runs, page aligned, each run with its own CRC in
//!   the index. Zero pages are not stored, so the files grow with touched memory.
//!
//! A diff snapshot stores only the pages dirtied since its parent (zero pages too, as `Zero`
//! runs, since they may overwrite non-zero parent pages); restore applies the chain from the
//! full snapshot up. This crate knows nothing of KVM.
mod format;
#[doc(hidden)]
pub mod fuzz;
mod write;

pub use format::*;
pub use write::{Writer, Written};
