//! Crash points inside a flush, reached through the module's own steps: an image dropped
//! without closing (`mem::forget`) after each step reopens consistent, with every flush that
//! returned Ok.
use super::*;
use crate::Image;

fn new_image(dir: &Path, o: &VhdxOptions) -> (PathBuf, VhdxImage) {
    let p = dir.join("t.vhdx");
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    format(&f, o).unwrap();
    drop(f);
    let img = VhdxImage::open(&p, false).unwrap();
    (p, img)
}

fn opts() -> VhdxOptions {
    VhdxOptions {
        block_size: Some(1 << 20),
        ..VhdxOptions::dynamic(64 << 20)
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..8192u32).map(|i| (i as u8) ^ seed).collect()
}

/// Writes to three blocks, leaves their BAT sectors dirty, and returns what a flush would
/// commit (as `flush` gathers it).
fn dirty_writes(img: &VhdxImage) -> (Vec<(u64, Vec<u8>)>, u64) {
    for (k, at) in [(1u8, 0u64), (2, 5 << 20), (3, 40 << 20)] {
        img.write_at(&pattern(k), at).unwrap();
    }
    img.file.sync_data().unwrap();
    let mut m = img.write_map();
    (m.take_dirty(img.bat_offset), m.file_end)
}

fn expect(img: &VhdxImage, written: bool) {
    for (k, at) in [(1u8, 0u64), (2, 5 << 20), (3, 40 << 20)] {
        let mut b = vec![0u8; 8192];
        img.read_at(&mut b, at).unwrap();
        let want = if written { pattern(k) } else { vec![0; 8192] };
        assert!(b == want, "block at {at:#x}: written={written}");
    }
}

#[test]
fn crash_after_the_log_entry_replays_it_on_open() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), &opts());
    let (sectors, end) = dirty_writes(&img);
    // The entry is durable, the BAT in place is not written: the crash point.
    let mut j = img.journal.lock().unwrap();
    let entry = VhdxImage::entry(&mut j, &sectors[..1], end);
    img.file.write_all_at(&entry, img.log_offset).unwrap();
    img.file.sync_data().unwrap();
    drop(j);
    std::mem::forget(img);
    // (the forgotten image's lock goes with its descriptor: close it by reopening below
    // in another open file description; OFD locks would conflict, so release it first)
    release_forgotten(&p);
    // QEMU replays Ferry's log as well (on a copy): `qemu-img check -r all`, then the data.
    let q = d.path().join("q.vhdx");
    std::fs::copy(&p, &q).unwrap();
    let raw = d.path().join("q.raw");
    let qemu = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (qs, rs) = (q.to_str().unwrap(), raw.to_str().unwrap());
    qemu(&["check", "-q", "-r", "all", "-f", "vhdx", qs]);
    qemu(&["convert", "-f", "vhdx", "-O", "raw", qs, rs]);
    let r = std::fs::read(&raw).unwrap();
    for (k, at) in [(1u8, 0usize), (2, 5 << 20), (3, 40 << 20)] {
        assert!(
            r[at..at + 8192] == pattern(k)[..],
            "qemu's replay, block at {at:#x}"
        );
    }
    let img = VhdxImage::open(&p, false).unwrap();
    expect(&img, true);
    drop(img);
    // Replayed and closed cleanly: read-only opens work again.
    let ro = VhdxImage::open(&p, true).unwrap();
    expect(&ro, true);
}

#[test]
fn crash_before_the_entry_is_whole_keeps_the_old_bat() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), &opts());
    let (sectors, end) = dirty_writes(&img);
    let mut j = img.journal.lock().unwrap();
    let mut entry = VhdxImage::entry(&mut j, &sectors[..1], end);
    // Torn: the data sector never reached the disk.
    let n = entry.len();
    entry[n - 4096..].fill(0);
    img.file.write_all_at(&entry, img.log_offset).unwrap();
    drop(j);
    std::mem::forget(img);
    release_forgotten(&p);
    let img = VhdxImage::open(&p, false).unwrap();
    // Never flushed, so not promised: the blocks are simply not there, and nothing else is
    // harmed.
    expect(&img, false);
}

#[test]
fn a_flushed_image_survives_a_crash_after_flush() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), &opts());
    for (k, at) in [(1u8, 0u64), (2, 5 << 20), (3, 40 << 20)] {
        img.write_at(&pattern(k), at).unwrap();
    }
    img.flush().unwrap();
    std::mem::forget(img);
    release_forgotten(&p);
    let img = VhdxImage::open(&p, false).unwrap();
    expect(&img, true);
}

#[test]
fn a_discarded_block_reads_zero_and_its_space_is_freed() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), &opts());
    img.write_at(&vec![9u8; 1 << 20], 3 << 20).unwrap();
    img.flush().unwrap();
    let i = img.index(3);
    assert_eq!(bat_state(img.read_map().bat[i]), PAYLOAD_FULLY_PRESENT);
    img.discard(3 << 20, 1 << 20).unwrap();
    assert_eq!(bat_state(img.read_map().bat[i]), PAYLOAD_ZERO);
    let e = img.extents(0, 64 << 20).unwrap();
    assert!(e.iter().all(|x| !x.data), "{e:?}");
    drop(img);
    let img = VhdxImage::open(&p, false).unwrap();
    let mut b = vec![1u8; 4096];
    img.read_at(&mut b, 3 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// A forgotten image's descriptor stays open with its lock: find it in /proc/self/fd and
/// close it, as a crash would.
fn release_forgotten(p: &Path) {
    let want = std::fs::canonicalize(p).unwrap();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() == Some(want.as_path()) {
            let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
            // SAFETY: the descriptor belongs to the forgotten image, which never uses it
            // again; closing it is what its process's death would do.
            unsafe { libc::close(fd) };
        }
    }
}
