//! Raw images against real files: data, holes, bounds, read-only, and locks across processes.
use ferry_storage::{open, Format, Image, RawImage, StorageError};
use std::os::unix::fs::MetadataExt;
use std::process::Command;

fn image(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    (d, p)
}

#[test]
fn writes_read_back_and_discards_leave_holes() {
    let (_d, p) = image(8 << 20);
    let img = RawImage::open(&p, false).unwrap();
    assert_eq!(img.size(), 8 << 20);
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 1 << 20).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; 1 << 20];
    img.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(back, data);
    let used = std::fs::metadata(&p).unwrap().blocks();
    assert!(used >= 2048, "1 MiB allocated: {used} blocks");
    img.discard(1 << 20, 1 << 20).unwrap();
    img.read_at(&mut back, 1 << 20).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert!(
        std::fs::metadata(&p).unwrap().blocks() < used,
        "the hole was punched"
    );
    img.write_at(&data, 0).unwrap();
    img.write_zeroes(4096, 8192, false).unwrap();
    img.read_at(&mut back, 0).unwrap();
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(back[..4096], data[..4096]);
    assert_eq!(back[12288..], data[12288..]);
}

#[test]
fn requests_outside_the_image_and_writes_to_a_read_only_image_are_refused() {
    let (_d, p) = image(1 << 20);
    {
        let img = RawImage::open(&p, false).unwrap();
        let mut b = [0u8; 512];
        assert!(matches!(
            img.read_at(&mut b, (1 << 20) - 256),
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(&b, u64::MAX - 10),
            Err(StorageError::OutOfRange { .. })
        ));
    }
    let img = open(&p, Format::Raw, true).unwrap();
    assert!(matches!(img.write_at(&[1], 0), Err(StorageError::ReadOnly)));
    assert!(matches!(img.discard(0, 512), Err(StorageError::ReadOnly)));
}

#[test]
fn an_open_image_is_locked_against_other_openers_and_other_processes() {
    let (_d, p) = image(1 << 20);
    let w = RawImage::open(&p, false).unwrap();
    // Same process, another open file description: refused either way.
    let e = RawImage::open(&p, false)
        .err()
        .expect("second writer refused");
    assert!(e.to_string().contains("in use by another process"), "{e}");
    assert!(matches!(
        RawImage::open(&p, true),
        Err(StorageError::Locked { .. })
    ));
    drop(w);
    // Readers share; a writer is refused while they hold it.
    let r1 = RawImage::open(&p, true).unwrap();
    let _r2 = RawImage::open(&p, true).unwrap();
    assert!(matches!(
        RawImage::open(&p, false),
        Err(StorageError::Locked {
            held: "reading",
            ..
        })
    ));
    drop((r1, _r2));
    // Another process: qemu-img (from qemu-utils) honours and takes the same locks.
    let _w = RawImage::open(&p, false).unwrap();
    // qemu-io -r only reads; it must be refused against our write lock.
    let qemu_io_read = || {
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read 0 512"])
            .arg(&p)
            .output()
            .expect("qemu-io (Debian qemu-utils; scripts/setup.sh installs it)")
    };
    let out = qemu_io_read();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("lock"),
        "qemu-img opened a locked image: {text}"
    );
    drop(_w);
    let out = qemu_io_read();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
