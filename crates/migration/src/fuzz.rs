//! Entry points for fuzzers (cargo afl, `fuzz/`) and the property tests: feed arbitrary bytes
//! to the protocol decoder. Any input may fail; none may panic, hang or allocate beyond
//! [`crate::protocol::MAX_FRAME`] per frame.
use crate::pages::for_each_page;
use crate::protocol::{parse, recv_raw, Message, ProtocolError, HEADER_LEN, KIND_PAGES, PAGE};

/// Frames read from `data` until the first error; returns how many decoded.
pub fn stream(data: &[u8]) -> usize {
    let mut r = data;
    let mut payload = Vec::new();
    let mut page = vec![0u8; PAGE];
    let mut n = 0;
    loop {
        let kind = match recv_raw(&mut r, &mut payload) {
            Ok(k) => k,
            Err(_) => return n,
        };
        let ok = if kind == KIND_PAGES {
            // The receivers' path: walk in place, decode each body.
            for_each_page(&payload, |_, d| d.decode(&mut page)).is_ok()
        } else {
            match parse(kind, std::mem::take(&mut payload)) {
                Ok(Message::Pages(_)) => true,
                Ok(_) => true,
                Err(ProtocolError::Oversized(_)) => false,
                Err(_) => false,
            }
        };
        if !ok {
            return n;
        }
        n += 1;
    }
}

/// As [`stream`], after giving every frame in `data` a correct CRC (so that the decoders
/// behind the CRC check see the fuzzer's bytes, not only the CRC check).
pub fn stream_with_crcs(data: &[u8]) -> usize {
    let mut d = data.to_vec();
    let mut at = 0usize;
    while at + HEADER_LEN <= d.len() {
        let len = u32::from_le_bytes([d[at + 4], d[at + 5], d[at + 6], d[at + 7]]) as usize;
        let end = (at + HEADER_LEN).saturating_add(len).min(d.len());
        let crc = crc32c::crc32c(&d[at + HEADER_LEN..end]);
        d[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
    stream(&d)
}
