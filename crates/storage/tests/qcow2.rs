//! qcow2 images (imago) against qemu-img as the oracle: images qemu-img made open here,
//! images written here pass `qemu-img check` and compare equal, overlays read through to
//! their base and leave it untouched, clusters are allocated only on write.
mod common;
use common::*;
use ferry_storage::{open, Format, Image, Qcow2Image, StorageError};
use std::path::Path;

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Bytes qemu-img reports the image file holds ("disk size" in JSON).
fn allocated(p: &Path) -> u64 {
    let j = qemu_img(&["info", "--output=json", s(p)]);
    let k = j.find("\"actual-size\"").expect("actual-size");
    j[k..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|t| !t.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn an_image_qemu_img_made_is_written_here_and_passes_qemu_img_check_and_compare() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("d.qcow2");
    let r = d.path().join("d.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "64M"]);
    std::fs::File::create(&r)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let before = allocated(&q);
    {
        let qi = Qcow2Image::open(&q, false).unwrap();
        let ri = open(&r, Format::Raw, false).unwrap();
        assert_eq!(qi.size(), 64 << 20);
        for (i, off) in [0u64, 1 << 20, 5 << 20, (64 << 20) - 4096]
            .into_iter()
            .enumerate()
        {
            let data = pattern(i as u8, 4096 * (i + 1));
            let data = &data[..data.len().min(((64 << 20) - off) as usize)];
            qi.write_at(data, off).unwrap();
            ri.write_at(data, off).unwrap();
            let mut back = vec![0u8; data.len()];
            qi.read_at(&mut back, off).unwrap();
            assert_eq!(back, data);
        }
        qi.write_zeroes(1 << 20, 4096, false).unwrap();
        ri.write_zeroes(1 << 20, 4096, false).unwrap();
        qi.discard(5 << 20, 8192).unwrap();
        ri.discard(5 << 20, 8192).unwrap();
        qi.flush().unwrap();
        // A second writer is refused while it is open, a reader too.
        assert!(matches!(
            Qcow2Image::open(&q, true),
            Err(StorageError::Locked { .. })
        ));
    }
    qemu_img(&["check", "-q", s(&q)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", s(&q), s(&r)]);
    // Only what was written got clusters: a few, not 64 MiB.
    let after = allocated(&q);
    assert!(
        after > before && after < before + (8 << 20),
        "{before} -> {after}"
    );
}

#[test]
fn an_overlay_reads_through_to_its_base_and_leaves_it_untouched() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 0 1M", s(&base)],
    );
    let base_copy = d.path().join("base-copy.qcow2");
    std::fs::copy(&base, &base_copy).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    {
        let t = open(&top, Format::Qcow2, false).unwrap();
        let mut b = vec![0u8; 65536];
        t.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0xab), "read through to the base");
        t.write_at(&pattern(7, 65536), 65536).unwrap();
        t.discard(0, 65536).unwrap();
        t.read_at(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "a discard reads back as zeroes, not the base"
        );
        t.read_at(&mut b, 65536).unwrap();
        assert_eq!(b, pattern(7, 65536));
        t.flush().unwrap();
        // The base is held for reading: no one may write it under the overlay.
        assert!(matches!(
            open(&base, Format::Qcow2, false),
            Err(StorageError::Locked { .. })
        ));
    }
    qemu_img(&["check", "-q", s(&top)]);
    qemu_img(&["compare", "-q", s(&base), s(&base_copy)]);
    // What the overlay shows, per qemu-img: zeroes, then the new data, then the base.
    let raw = d.path().join("flat.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&raw)]);
    let flat = std::fs::read(&raw).unwrap();
    assert!(flat[..65536].iter().all(|&x| x == 0));
    assert_eq!(flat[65536..131072], pattern(7, 65536)[..]);
    assert!(flat[131072..1 << 20].iter().all(|&x| x == 0xab));
}

#[test]
fn a_corrupt_or_foreign_header_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "16M"]);
    let mut bytes = std::fs::read(&q).unwrap();
    bytes[4..8].copy_from_slice(&99u32.to_be_bytes()); // version 99
    std::fs::write(&q, &bytes).unwrap();
    let e = Qcow2Image::open(&q, false)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("not a usable qcow2 image"), "{e}");
    let r = d.path().join("d.raw");
    std::fs::write(&r, vec![0u8; 1 << 20]).unwrap();
    let e = open(&r, Format::Qcow2, false)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("not a usable qcow2 image"), "{e}");
}
