//! Property tests for the snapshot reader (the afl target in `fuzz/` runs the same entry
//! point): arbitrary files and a real snapshot with bytes flipped, truncated and spliced are
//! refused or read without panicking, and a flipped byte in the state file or in stored
//! memory is always refused.
use ferry_snapshot::fuzz::{read_dir, split};
use ferry_snapshot::*;
use proptest::prelude::*;
use std::path::PathBuf;

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// A real snapshot's two files: a run of two pages, a zero run, a page far up.
fn real() -> (Vec<u8>, Vec<u8>) {
    let d = scratch("real");
    let mut w = Writer::create(&d).unwrap();
    let pages: Vec<u8> = (0..2 * PAGE as usize).map(|i| (i % 251) as u8).collect();
    w.add_pages(0x1000, &pages).unwrap();
    w.add_zero(0x5000, 3);
    w.add_pages(1 << 32, &vec![7u8; PAGE as usize]).unwrap();
    w.finish(None, b"state bytes").unwrap();
    let s = std::fs::read(d.join(STATE_FILE)).unwrap();
    let m = std::fs::read(d.join(MEMORY_FILE)).unwrap();
    let _ = std::fs::remove_dir_all(&d);
    (s, m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_files_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let d = scratch("any");
        let (s, m) = split(&data);
        let _ = read_dir(&d, s, m);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_flipped_byte_is_refused(in_state in any::<bool>(), at in any::<usize>(), bit in 0u8..8) {
        let d = scratch("flip");
        let (mut s, mut m) = real();
        prop_assert!(read_dir(&d, &s, &m).is_ok());
        let f = if in_state { &mut s } else { &mut m };
        let i = at % f.len();
        f[i] ^= 1 << bit;
        prop_assert!(read_dir(&d, &s, &m).is_err(), "flip at {} of the {} file accepted",
            i, if in_state { "state" } else { "memory" });
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn truncated_and_spliced_snapshots_never_panic(
        cut in any::<usize>(), from in any::<usize>(), len in 0usize..512, to in any::<usize>(),
        in_state in any::<bool>()
    ) {
        let d = scratch("cut");
        let (s, m) = real();
        let (mut a, mut b) = (s.clone(), m.clone());
        let f = if in_state { &mut a } else { &mut b };
        let n = f.len();
        f.truncate(cut % n);
        prop_assert!(read_dir(&d, &a, &b).is_err());
        let (mut a, mut b) = (s, m);
        let f = if in_state { &mut a } else { &mut b };
        let n = f.len();
        let (fr, t) = (from % n, to % n);
        let piece: Vec<u8> = f[fr..(fr + len).min(n)].to_vec();
        f.splice(t..t, piece);
        let _ = read_dir(&d, &a, &b);
        let _ = std::fs::remove_dir_all(&d);
    }
}
