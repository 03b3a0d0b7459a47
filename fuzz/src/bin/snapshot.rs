//! The snapshot reader on arbitrary files (state file and memory file from one input).
fn main() {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-snap-{}", std::process::id()));
    afl::fuzz!(|data: &[u8]| {
        let (state, memory) = ferry_snapshot::fuzz::split(data);
        let _ = ferry_snapshot::fuzz::read_dir(&dir, state, memory);
    });
}
