//! The snapshot format's reader rejects every kind of bad file with an error naming it.
use ferry_snapshot::*;
use std::path::{Path, PathBuf};

/// A directory for a snapshot (not created: the writer creates it) in a scratch directory
/// removed on drop.
fn dir(tag: &str) -> (PathBuf, tempfile::TempDir) {
    let t = tempfile::tempdir().unwrap();
    (t.path().join(tag), t)
}

fn page(v: u8) -> Vec<u8> {
    vec![v; PAGE as usize]
}

fn write(d: &Path, parent: Option<ParentRef>) -> Meta {
    let mut w = Writer::create(d).unwrap();
    w.add_pages(0x1000, &[page(1), page(2)].concat()).unwrap();
    w.add_zero(0x5000, 3);
    w.add_pages(1 << 32, &page(9)).unwrap();
    w.finish(parent, b"state bytes").unwrap().meta
}

fn err(d: &Path) -> String {
    Snapshot::read(d)
        .and_then(|s| s.verify_memory().map(|_| s))
        .unwrap_err()
        .to_string()
}

#[test]
fn roundtrip() {
    let d = dir("rt");
    let meta = write(&d.0, None);
    let s = Snapshot::read(&d.0).unwrap();
    assert_eq!(s.meta, meta);
    assert_eq!(s.state, b"state bytes");
    assert_eq!(s.runs.len(), 3);
    assert_eq!(
        s.runs[1],
        Run {
            gpa: 0x5000,
            pages: 3,
            data: RunData::Zero
        }
    );
    assert_eq!(s.stored_bytes(), 3 * PAGE);
    s.verify_memory().unwrap();
    assert_eq!(
        std::fs::metadata(d.0.join(MEMORY_FILE)).unwrap().len(),
        3 * PAGE
    );
    assert!(!d.0.join("memory.bin.tmp").exists());
}

fn corrupt(d: &Path, file: &str, at: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let p = d.join(file);
    let mut b = std::fs::read(&p).unwrap();
    let _ = at;
    f(&mut b);
    std::fs::write(&p, b).unwrap();
}

#[test]
fn bad_files_are_named() {
    let d = dir("bad");
    write(&d.0, None);
    let good = std::fs::read(d.0.join(STATE_FILE)).unwrap();
    let restore = || std::fs::write(d.0.join(STATE_FILE), &good).unwrap();

    corrupt(&d.0, STATE_FILE, 0, |b| b[0] = b'X');
    assert!(
        err(&d.0).contains("not a Ferry snapshot (bad magic)"),
        "{}",
        err(&d.0)
    );
    restore();
    corrupt(&d.0, STATE_FILE, 0, |b| b[8] = 7);
    assert!(
        err(&d.0).contains("format version 7 is not supported"),
        "{}",
        err(&d.0)
    );
    restore();
    corrupt(&d.0, STATE_FILE, 0, |b| b[20] ^= 1);
    assert!(
        err(&d.0).contains("CRC mismatch in the header"),
        "{}",
        err(&d.0)
    );
    restore();
    corrupt(&d.0, STATE_FILE, 0, |b| {
        let n = b.len();
        b[n - 3] ^= 0x40
    });
    assert!(
        err(&d.0).contains("CRC mismatch in section MEMORY_INDEX"),
        "{}",
        err(&d.0)
    );
    restore();
    corrupt(&d.0, STATE_FILE, 0, |b| b.truncate(b.len() - 5));
    assert!(err(&d.0).contains("truncated"), "{}", err(&d.0));
    restore();
    corrupt(&d.0, STATE_FILE, 0, |b| b.truncate(30));
    assert!(
        err(&d.0).contains("truncated: shorter than the header"),
        "{}",
        err(&d.0)
    );
    restore();
    // Section length far beyond the limit: refused before allocating.
    corrupt(&d.0, STATE_FILE, 0, |b| {
        b[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    assert!(err(&d.0).contains("more than the"), "{}", err(&d.0));
    restore();
    // Section length within the limit but beyond the file.
    corrupt(&d.0, STATE_FILE, 0, |b| {
        b[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&(1u64 << 20).to_le_bytes())
    });
    assert!(
        err(&d.0).contains("truncated: section META needs"),
        "{}",
        err(&d.0)
    );
    restore();
    Snapshot::read(&d.0).unwrap().verify_memory().unwrap();

    let good_mem = std::fs::read(d.0.join(MEMORY_FILE)).unwrap();
    corrupt(&d.0, MEMORY_FILE, 0, |b| b[PAGE as usize + 7] ^= 1);
    assert!(
        err(&d.0).contains("CRC mismatch in memory run at gpa 0x1000"),
        "{}",
        err(&d.0)
    );
    std::fs::write(d.0.join(MEMORY_FILE), &good_mem).unwrap();
    corrupt(&d.0, MEMORY_FILE, 0, |b| b.truncate(PAGE as usize));
    assert!(
        err(&d.0).contains("truncated: run at gpa 0x1000"),
        "{}",
        err(&d.0)
    );
    std::fs::remove_file(d.0.join(MEMORY_FILE)).unwrap();
    assert!(err(&d.0).contains("memory.bin"), "{}", err(&d.0));
    assert!(Snapshot::read(Path::new("/nonexistent/snap"))
        .unwrap_err()
        .to_string()
        .contains("/nonexistent/snap/snapshot.fsnap"));
}

#[test]
fn chains_follow_parents_and_detect_overwrites() {
    let root = dir("chain");
    let (a, b, c) = (root.0.join("a"), root.0.join("b"), root.0.join("c"));
    let ma = write(&a, None);
    let mb = write(
        &b,
        Some(ParentRef {
            dir: "../a".into(),
            id: ma.id,
        }),
    );
    write(
        &c,
        Some(ParentRef {
            dir: b.clone(),
            id: mb.id,
        }),
    );
    let chain = Snapshot::chain(&c).unwrap();
    assert_eq!(
        chain
            .iter()
            .map(|s| s.dir.file_name().unwrap().to_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    write(&a, None); // a new snapshot replaces the parent
    let e = Snapshot::chain(&c).unwrap_err().to_string();
    assert!(
        e.contains("not the parent") && e.contains("overwritten"),
        "{e}"
    );
    std::fs::remove_dir_all(&b).unwrap();
    let e = Snapshot::chain(&c).unwrap_err().to_string();
    assert!(e.contains("chain is broken"), "{e}");
}
