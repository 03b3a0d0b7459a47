//! Entry point for fuzzers and property tests: a snapshot directory made of arbitrary bytes.
//! Any input may be refused; none may panic, hang or allocate beyond the format's limits.
use crate::format::{Snapshot, MEMORY_FILE, STATE_FILE};
use std::path::Path;

/// Splits a fuzz input into the state file and the memory file (a little-endian u32 length
/// of the state file first).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 4 {
        return (data, &[]);
    }
    let n = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize).min(data.len() - 4);
    (&data[4..4 + n], &data[4 + n..])
}

/// Writes `state` and `memory` as the snapshot in `dir`, then reads and verifies it the way a
/// restore does. Ok when the snapshot was accepted.
pub fn read_dir(dir: &Path, state: &[u8], memory: &[u8]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(STATE_FILE), state).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(MEMORY_FILE), memory).map_err(|e| e.to_string())?;
    let s = Snapshot::read(dir).map_err(|e| e.to_string())?;
    s.verify_memory().map_err(|e| e.to_string())
}
