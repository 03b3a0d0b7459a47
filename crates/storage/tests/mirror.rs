//! The mirror (storage live migration's core) on real files: a bulk copy interleaved with
//! guest writes above and below its cursor, discards and write-zeroes, and a writer on
//! another thread flat out, all end with a target equal to the source byte for byte; holes
//! are not copied; a failing target never fails a guest write.
mod common;
use common::*;
use ferry_storage::mirror::{ImageSink, Mirror, Sink};
use ferry_storage::{create, Format, Image, StorageError};
use std::sync::Arc;

const SIZE: u64 = 64 << 20;

fn pair(d: &std::path::Path, to: Format) -> (Arc<dyn Image>, Arc<dyn Image>) {
    let src: Arc<dyn Image> = create(&d.join("src.raw"), Format::Raw, SIZE)
        .unwrap()
        .into();
    let dst: Arc<dyn Image> = create(&d.join(format!("dst.{to}")), to, SIZE)
        .unwrap()
        .into();
    (src, dst)
}

fn same(a: &dyn Image, b: &dyn Image) {
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for off in (0..SIZE).step_by(1 << 20) {
        a.read_at(&mut x, off).unwrap();
        b.read_at(&mut y, off).unwrap();
        assert!(
            x == y,
            "the target differs from the source in the MiB at {off:#x}"
        );
    }
}

/// A tiny deterministic generator (xorshift), so a failure repeats.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn writes_above_and_below_the_cursor_end_equal_on_raw_and_qcow2_targets() {
    for to in [Format::Raw, Format::Qcow2] {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = pair(d.path(), to);
        // Data before the copy: 8 MiB in four places, the rest holes.
        for (i, off) in [0u64, 9 << 20, 30 << 20, 63 << 20].iter().enumerate() {
            src.write_at(
                &vec![i as u8 + 1; 2 << 20][..(SIZE - off).min(2 << 20) as usize],
                *off,
            )
            .unwrap();
        }
        let m = Mirror::new(src.clone(), Box::new(ImageSink(dst.clone())));
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let mut buf = Vec::new();
        let mut steps = 0;
        loop {
            let p = m.copy_step(256 << 10, &mut buf).unwrap();
            steps += 1;
            for _ in 0..4 {
                let off = (rng.next() % (SIZE - 65536)) & !511;
                let len = (rng.next() % 64 + 1) as usize * 512;
                match rng.next() % 8 {
                    0 => m.discard(off, len as u64).unwrap(),
                    1 => m.write_zeroes(off, len as u64, false).unwrap(),
                    _ => m.write_at(&vec![(rng.next() | 1) as u8; len], off).unwrap(),
                }
            }
            if p.done() {
                break;
            }
        }
        // After the end, writes still reach both.
        m.write_at(&[0xee; 4096], 5 << 20).unwrap();
        let p = m.progress();
        assert!(m.failed().is_none());
        assert!(steps > 10, "{to}: {steps} steps");
        assert!(
            p.copied < 24 << 20,
            "{to}: holes were copied ({} bytes for ~8 MiB of data and the writes)",
            p.copied
        );
        assert!(p.mirrored > 0, "{to}: no write landed below the cursor");
        same(src.as_ref(), dst.as_ref());
        drop((m, src, dst));
        let t = d.path().join(format!("dst.{to}"));
        if to == Format::Qcow2 {
            qemu_img(&["check", "-q", s(&t)]);
        }
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            &to.to_string(),
            s(&d.path().join("src.raw")),
            s(&t),
        ]);
    }
}

#[test]
fn a_writer_flat_out_on_another_thread_does_not_stop_the_copy_converging() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = pair(d.path(), Format::Raw);
    src.write_at(&vec![7; 32 << 20], 0).unwrap();
    let m = Arc::new(Mirror::new(src.clone(), Box::new(ImageSink(dst.clone()))));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(42);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let off = (rng.next() % (SIZE - 4096)) & !4095;
                m.write_at(&[(n % 251) as u8 + 1; 4096], off).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut buf = Vec::new();
    let mut steps = 0u64;
    while !m.copy_step(1 << 20, &mut buf).unwrap().done() {
        steps += 1;
        assert!(steps < 10_000, "the copy did not converge");
    }
    // Keep writing a while with the copy complete: the mirror keeps the two equal.
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 100, "the writer hardly ran: {writes}");
    same(src.as_ref(), dst.as_ref());
}

struct Broken;
impl Sink for Broken {
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), StorageError> {
        Err(StorageError::Io(std::io::Error::other("the link is cut")))
    }
    fn zero(&mut self, _: u64, _: u64) -> Result<(), StorageError> {
        Err(StorageError::Io(std::io::Error::other("the link is cut")))
    }
}

#[test]
fn a_failing_target_ends_the_copy_but_never_a_guest_write() {
    let d = tempfile::tempdir().unwrap();
    let src: Arc<dyn Image> = create(&d.path().join("s.raw"), Format::Raw, SIZE)
        .unwrap()
        .into();
    src.write_at(&[1; 4096], 0).unwrap();
    let m = Mirror::new(src.clone(), Box::new(Broken));
    assert!(m.copy_step(1 << 20, &mut Vec::new()).is_err());
    assert!(m.failed().unwrap().contains("the link is cut"));
    m.write_at(&[2; 4096], 0).unwrap();
    let mut b = [0u8; 4096];
    src.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [2; 4096], "the source has the write");
    assert!(
        m.copy_step(1 << 20, &mut Vec::new()).is_err(),
        "stays failed"
    );
}

#[test]
fn create_never_overwrites_and_makes_empty_images() {
    let d = tempfile::tempdir().unwrap();
    for f in [Format::Raw, Format::Qcow2] {
        let p = d.path().join(format!("new.{f}"));
        let img = create(&p, f, 1 << 30).unwrap();
        assert_eq!(img.size(), 1 << 30);
        let e = img.extents(0, 1 << 30).unwrap();
        assert!(e.iter().all(|x| !x.data), "{f}: {e:?}");
        drop(img);
        let again = create(&p, f, 1 << 30);
        assert!(
            matches!(again, Err(StorageError::Open { ref err, .. }) if err.kind() == std::io::ErrorKind::AlreadyExists),
            "{f}: {:?}",
            again.err()
        );
        assert!(p.exists(), "{f}: the existing image was removed");
    }
}
