//! The migration protocol decoder on arbitrary bytes: as received (CRCs checked first) and
//! with every frame's CRC made right (so the decoders behind the check see the input).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        ferry_migration::fuzz::stream(data);
        ferry_migration::fuzz::stream_with_crcs(data);
    });
}
