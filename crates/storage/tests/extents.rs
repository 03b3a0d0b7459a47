//! `Image::extents` against `qemu-img map` (QEMU's own allocation map) on raw and qcow2
//! images qemu-img and qemu-io wrote: the same data runs, zero runs that really read as
//! zeroes, a sub-range clipped exactly, a 1 TiB sparse disk mapped in a few runs.
mod common;
use common::*;
use ferry_storage::{open, Extent, Format, Image};
use std::path::Path;

/// The data runs `qemu-img map` reports (merged), as (offset, length).
fn qemu_data(p: &Path, fmt: &str) -> Vec<(u64, u64)> {
    let j: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", "-f", fmt, s(p)])).unwrap();
    let mut v: Vec<(u64, u64)> = Vec::new();
    for e in j.as_array().unwrap() {
        if e["data"].as_bool() != Some(true) {
            continue;
        }
        let (o, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match v.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => v.push((o, l)),
        }
    }
    v
}

/// Checks that `x` covers `[offset, offset + len)` in order without gaps, and that every
/// zero run reads as zeroes.
fn check_cover(img: &dyn Image, x: &[Extent], offset: u64, len: u64) {
    let mut at = offset;
    for e in x {
        assert_eq!(e.offset, at, "{x:?}");
        assert!(e.len > 0);
        if !e.data && e.len <= 64 << 20 {
            let mut b = vec![1u8; e.len as usize];
            img.read_at(&mut b, e.offset).unwrap();
            assert!(b.iter().all(|&c| c == 0), "zero run {e:?} holds data");
        }
        at += e.len;
    }
    assert_eq!(at, offset + len, "{x:?}");
}

fn data_runs(x: &[Extent]) -> Vec<(u64, u64)> {
    x.iter()
        .filter(|e| e.data)
        .map(|e| (e.offset, e.len))
        .collect()
}

#[test]
fn a_raw_file_maps_like_qemu_img_map_says() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk.raw");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 4k",
            "-c",
            "write -P 0xcd 40M 128k",
            "-c",
            "write -P 0x11 64508k 4k",
            s(&p),
        ],
    );
    let want = qemu_data(&p, "raw");
    assert_eq!(want.len(), 3, "{want:?}");
    let img = open(&p, Format::Raw, true).unwrap();
    let x = img.extents(0, 64 << 20).unwrap();
    check_cover(&*img, &x, 0, 64 << 20);
    assert_eq!(data_runs(&x), want);
    // A sub-range starting inside a data run and ending inside a hole is clipped exactly.
    let (o, l) = ((1 << 20) + 2048, 40 << 20);
    let y = img.extents(o, l).unwrap();
    check_cover(&*img, &y, o, l);
    assert_eq!(
        data_runs(&y),
        vec![(o, 2048), (40 << 20, 128 << 10)],
        "{y:?}"
    );
}

#[test]
fn a_qcow2_overlay_maps_its_own_and_its_backing_files_data_and_its_zero_clusters() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = (d.path().join("base.qcow2"), d.path().join("top.qcow2"));
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "64M"],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xaa 2M 64k", s(&base)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xbb 1M 64k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "write -P 0xcc 8M 192k",
            s(&top),
        ],
    );
    let want = qemu_data(&top, "qcow2");
    assert_eq!(
        want,
        vec![(1 << 20, 64 << 10), (8 << 20, 192 << 10)],
        "qemu-img map"
    );
    let img = open(&top, Format::Qcow2, true).unwrap();
    let x = img.extents(0, 64 << 20).unwrap();
    check_cover(&*img, &x, 0, 64 << 20);
    assert_eq!(data_runs(&x), want);
    // The base's data, not covered by the overlay's zero cluster, shows through.
    let b = open(&base, Format::Qcow2, true).unwrap();
    assert_eq!(
        data_runs(&b.extents(0, 64 << 20).unwrap()),
        vec![(2 << 20, 64 << 10)]
    );
}

#[test]
fn a_terabyte_disk_with_a_few_writes_maps_in_a_few_runs() {
    let d = tempfile::tempdir().unwrap();
    for (fmt, name) in [("raw", "big.raw"), ("qcow2", "big.qcow2")] {
        let p = d.path().join(name);
        run("qemu-img", &["create", "-q", "-f", fmt, s(&p), "1T"]);
        run(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "write -P 0x5a 0 64k",
                "-c",
                "write -P 0x5b 700G 64k",
                s(&p),
            ],
        );
        let f = if fmt == "raw" {
            Format::Raw
        } else {
            Format::Qcow2
        };
        let img = open(&p, f, true).unwrap();
        let t = std::time::Instant::now();
        let x = img.extents(0, 1 << 40).unwrap();
        check_cover(&*img, &x, 0, 1 << 40);
        let data: u64 = x.iter().filter(|e| e.data).map(|e| e.len).sum();
        assert_eq!(data, 128 << 10, "{fmt}: {x:?}");
        assert!(x.len() <= 5, "{fmt}: {x:?}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "{fmt}: {:?}",
            t.elapsed()
        );
    }
}
