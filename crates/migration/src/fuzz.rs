//! Entry points for fuzzers (cargo afl, `fuzz/`) and the property tests: feed arbitrary bytes
//! to the protocol decoder. Any input may fail; none may panic, hang or allocate beyond
//! [`crate::protocol::MAX_FRAME`] per frame.
use crate::pages::for_each_page;
use crate::protocol::{
    parse, recv_raw, send, Compression, Hello, Message, PageData, HEADER_LEN, KIND_PAGES, MAGIC,
    PAGE, VERSION,
};

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
            parse(kind, std::mem::take(&mut payload)).is_ok()
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
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&d[at..at + HEADER_LEN]);
        let crc = crate::protocol::frame_crc(&h, &d[at + HEADER_LEN..end]);
        d[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
    stream(&d)
}

/// One valid message of every kind (pages in each encoding): the seeds of the fuzzers and the
/// starting point of the property tests.
pub fn sample_messages() -> Vec<Message> {
    let page: Vec<u8> = (0..PAGE).map(|i| (i * 7 / 3) as u8).collect();
    vec![
        Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps: 0,
            session: 42,
            connections: 2,
            config: vec![9; 8],
        }),
        Message::Welcome,
        Message::Join {
            session: 42,
            index: 1,
        },
        Message::Pages(vec![
            (0, PageData::encode(&page, Compression::None)),
            (4096, PageData::encode(&page, Compression::Lz4)),
            (8192, PageData::encode(&page, Compression::Zstd)),
            (12288, PageData::encode(&[0; PAGE], Compression::None)),
        ]),
        Message::EndOfPass {
            pass: 1,
            last: false,
        },
        Message::Populated(vec![(0, 4), (1 << 20, 2)]),
        Message::Missing(vec![(4096, 1)]),
        Message::Demand(vec![8192]),
        Message::Discard(vec![(0, 1)]),
        Message::Discarded,
        Message::State(vec![1, 2, 3, 4]),
        Message::Ready,
        Message::Commit,
        Message::Resumed,
        Message::Abort("no".into()),
    ]
}

/// The frames of `msgs`, back to back.
pub fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut b = Vec::new();
    for m in msgs {
        // Writing to a Vec fails only for an oversized frame, which these are not.
        let _ = send(&mut b, m);
    }
    b
}
