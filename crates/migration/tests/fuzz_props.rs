//! Property tests for the protocol decoder (a bounded number of cases in CI; the afl targets
//! in `fuzz/` run the same entry points for as long as one likes), and a corpus of captured
//! real migration streams with bytes flipped, truncated and spliced, replayed against a real
//! destination: nothing panics or hangs, and no VM resumes unless its memory is exact.
mod fake;
use fake::*;
use ferry_migration::engine::{Limits, Options};
use ferry_migration::fuzz;
use ferry_migration::protocol::Compression;
use proptest::prelude::*;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One valid frame of every kind, back to back, and how many.
fn every_frame() -> (Vec<u8>, usize) {
    let msgs = fuzz::sample_messages();
    (fuzz::frames(&msgs), msgs.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzz::stream(&data);
        fuzz::stream_with_crcs(&data);
    }

    #[test]
    fn any_flipped_byte_of_a_real_stream_is_caught(at in any::<usize>(), bit in 0u8..8) {
        let (mut b, frames) = every_frame();
        prop_assert_eq!(fuzz::stream(&b), frames);
        let i = at % b.len();
        b[i] ^= 1 << bit;
        prop_assert!(fuzz::stream(&b) < frames, "a flip at {} went through", i);
    }

    #[test]
    fn truncated_and_spliced_real_streams_never_panic(
        cut in any::<usize>(), from in any::<usize>(), len in 0usize..256, to in any::<usize>()
    ) {
        let (b, frames) = every_frame();
        let t = &b[..cut % b.len()];
        prop_assert!(fuzz::stream(t) < frames);
        let mut s = b.clone();
        let (f, tt) = (from % b.len(), to % b.len());
        let piece: Vec<u8> = b[f..(f + len).min(b.len())].to_vec();
        s.splice(tt..tt, piece);
        fuzz::stream(&s);
        fuzz::stream_with_crcs(&s);
    }
}

/// The source→destination bytes of each connection of one real migration (0: control).
fn capture() -> (FakeSource, Vec<Vec<u8>>) {
    let src = FakeSource::new(512, 16);
    let streams: Arc<Mutex<Vec<Vec<u8>>>> = Default::default();
    let s = streams.clone();
    let p = pair(Some(Box::new(move |conn, _, chunk: &mut Vec<u8>| {
        let mut s = s.lock().unwrap();
        while s.len() <= conn {
            s.push(Vec::new());
        }
        s[conn].extend_from_slice(chunk);
        Flow::Go
    })));
    let opts = Options {
        connections: 2,
        compression: Compression::Lz4,
        ..Options::default()
    };
    p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    let v = streams.lock().unwrap().clone();
    (src, v)
}

/// Plays `streams` (control first) to a fresh destination; returns whether it resumed and,
/// if so, whether its memory equals `src`'s.
fn replay(src: &FakeSource, streams: &[Vec<u8>]) -> (bool, bool) {
    let limits = Limits {
        io_timeout: Duration::from_millis(400),
        hello_timeout: Duration::from_millis(400),
        join_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let p = pair_limits(None, Default::default(), limits);
    let mut conns = vec![p.ctl.try_clone().unwrap()];
    let writers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let c = if i == 0 {
                conns[0].try_clone().unwrap()
            } else {
                let c = p.connect().unwrap();
                conns.push(c.try_clone().unwrap());
                c
            };
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.write_all(&bytes);
                // Drain what the destination answers until it closes.
                let mut sink = [0u8; 4096];
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
            })
        })
        .collect();
    let t = Instant::now();
    let (dst, r) = p.join();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the destination hung"
    );
    for c in &conns {
        c.shutdown();
    }
    for w in writers {
        let _ = w.join();
    }
    let resumed = dst.resumed.load(std::sync::atomic::Ordering::SeqCst);
    if !resumed {
        return (false, false);
    }
    r.unwrap();
    let exact = *src.mem.lock().unwrap() == *dst.mem.lock().unwrap();
    (true, exact)
}

#[test]
fn a_corpus_of_tampered_real_streams_never_resumes_a_wrong_vm() {
    let (src, streams) = capture();
    eprintln!(
        "captured {:?}",
        streams.iter().map(|s| s.len()).collect::<Vec<_>>()
    );
    assert!(streams.len() >= 3, "control and two data connections");
    // The unaltered capture replays to an exact VM: the harness itself works.
    assert_eq!(replay(&src, &streams), (true, true));
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n.max(1) as u64) as usize
    };
    let (mut resumed, mut cases) = (0, 0);
    for case in 0..36 {
        let mut s = streams.clone();
        let c = rnd(s.len());
        let n = s[c].len();
        match case % 3 {
            0 => {
                let i = rnd(n);
                s[c][i] ^= 1 << rnd(8);
            }
            1 => s[c].truncate(rnd(n)),
            _ => {
                let (f, len, to) = (rnd(n), 1 + rnd(4096), rnd(n));
                let piece: Vec<u8> = s[c][f..(f + len).min(n)].to_vec();
                s[c].splice(to..to, piece);
            }
        }
        let (r, exact) = replay(&src, &s);
        cases += 1;
        if r {
            resumed += 1;
            assert!(
                exact,
                "case {case}: resumed with memory that differs from the source"
            );
        }
    }
    eprintln!("{cases} tampered replays, {resumed} resumed (each with exact memory)");
}
