//! The engine's storage path (shared-nothing migration) against the fake VM over real
//! loopback TCP: a disk whose "guest" writes above and below the copy's cursor arrives equal;
//! a cut or stalled storage connection fails the migration before commit, the source's disk
//! is its own again and the destination drops what it made; a flipped byte on the storage
//! connection is refused.
mod fake;
use fake::*;
use ferry_migration::engine::{EngineError, Options};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn source() -> FakeSource {
    FakeSource {
        disk: Some(FakeDisk::new(4 << 20)),
        ..FakeSource::new(512, 16)
    }
}

fn opts() -> Options {
    Options {
        copy_storage: true,
        ..Options::default()
    }
}

#[test]
fn a_disk_written_above_and_below_the_cursor_arrives_equal() {
    let src = source();
    let p = pair(None);
    let report = p.migrate(&src, &opts()).expect("migration");
    let (dest, r) = p.join();
    r.expect("destination");
    let d = src.disk.as_ref().unwrap();
    let want = d.state.lock().unwrap().0.clone();
    assert_eq!(dest.disk.lock().unwrap().as_deref(), Some(&want[..]));
    assert!(dest.disk_synced_last.load(Ordering::SeqCst));
    assert!(
        d.writes.load(Ordering::SeqCst) > 100,
        "the guest hardly wrote"
    );
    let st = report.storage.expect("storage report");
    assert_eq!((st.disks, st.size_bytes), (1, 4 << 20));
    assert!(st.wire_bytes > 2 << 20 && st.wire_bytes < 5 << 20, "{st:?}");
}

/// Runs a storage migration through `tamper`, which makes it fail; checks what must hold.
/// Returns the source's error and how long its migration took to fail.
fn fails(tamper: Tamper, opts: Options) -> (EngineError, Duration) {
    fails_with(Some(tamper), Default::default(), opts)
}

fn fails_with(
    tamper: Option<Tamper>,
    faults: std::sync::Arc<Faults>,
    opts: Options,
) -> (EngineError, Duration) {
    let src = source();
    let limits = ferry_migration::engine::Limits {
        io_timeout: opts.io_timeout,
        ..Default::default()
    };
    let p = pair_limits(tamper, faults, limits);
    let t = Instant::now();
    let e = p.migrate(&src, &opts).expect_err("the migration must fail");
    let took = t.elapsed();
    let (dest, r) = p.join();
    assert!(r.is_err(), "the destination must fail too");
    assert!(
        !dest.resumed.load(Ordering::SeqCst),
        "nothing resumes there"
    );
    assert!(
        dest.disk_removed.load(Ordering::SeqCst),
        "its disk is dropped"
    );
    let d = src.disk.as_ref().unwrap();
    assert!(
        d.unmirrored.load(Ordering::SeqCst),
        "the source's disk is its own again"
    );
    assert!(!src.paused.load(Ordering::SeqCst), "the source runs on");
    (e, took)
}

/// Connections in accept order: 0 control, 1 data, 2 storage.
const STORAGE: usize = 2;

#[test]
fn a_storage_connection_cut_in_the_bulk_copy_fails_before_commit() {
    fails(
        Box::new(|c, at, _| (c != STORAGE || at < (1 << 20)).into()),
        opts(),
    );
}

/// The source gives up within its I/O timeout; the destination (which the stall keeps from
/// hearing anything) within its own.
#[test]
fn a_stalled_storage_connection_fails_within_the_io_timeout() {
    let (_, took) = fails(
        Box::new(|c, at, _| {
            if c == STORAGE && at > (1 << 20) {
                Flow::Stall
            } else {
                Flow::Go
            }
        }),
        Options {
            io_timeout: Duration::from_secs(1),
            ..opts()
        },
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_flipped_byte_on_the_storage_connection_is_refused() {
    let mut done = false;
    let (e, _) = fails(
        Box::new(move |c, at, chunk| {
            if c == STORAGE && at > (1 << 20) && !done && chunk.len() > 100 {
                chunk[50] ^= 0x10;
                done = true;
            }
            Flow::Go
        }),
        opts(),
    );
    assert!(
        e.to_string().contains("CRC") || e.to_string().contains("Disk"),
        "{e}"
    );
}

/// The destination's disk fills up in the bulk copy: the migration fails at once (not at an
/// I/O timeout: the destination's writer stops its reader), with the destination's reason.
#[test]
fn a_destination_disk_that_fills_up_fails_the_migration_with_its_reason() {
    let faults = std::sync::Arc::new(Faults::default());
    *faults.disk_full_at.lock().unwrap() = Some(1 << 20);
    let (e, took) = fails_with(None, faults, opts());
    assert!(e.to_string().contains("No space left"), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
