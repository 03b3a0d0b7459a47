//! VHDX against qemu-img as the oracle, both ways: images Ferry makes (dynamic and fixed,
//! 512-byte and 4 KiB sectors, up to 16 TB) pass `qemu-img check` and compare equal to a raw
//! file given the same writes; images `qemu-img create -f vhdx` makes open and work here.
mod common;
use common::*;
use ferry_storage::{create, create_vhdx, open, Format, Image, StorageError, VhdxOptions};
use std::path::Path;

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

/// Writes, zeroes and discards spread over the disk (across block boundaries, the last
/// sector), done to `img` and to the raw reference `reference` alike.
fn exercise(img: &dyn Image, reference: &dyn Image) {
    let size = img.size();
    let sector = u64::from(img.sector_size());
    let spots = [
        0,
        4096,
        (1 << 20) - 4096,
        33 << 20,
        size / 2,
        size - 2 * sector,
    ];
    for (i, &off) in spots.iter().enumerate() {
        let n = (64 << 10).min(size - off) as usize;
        let data = pattern(i as u8, n);
        img.write_at(&data, off).unwrap();
        reference.write_at(&data, off).unwrap();
        let mut back = vec![0u8; n];
        img.read_at(&mut back, off).unwrap();
        assert!(back == data, "read back at {off:#x}");
    }
    for (off, len) in [(4096, 8192), (33 << 20, 4096)] {
        img.write_zeroes(off, len, false).unwrap();
        reference.write_zeroes(off, len, false).unwrap();
    }
    // A whole block and a partial one.
    img.write_at(&pattern(9, 2 << 20), 64 << 20).unwrap();
    reference.write_at(&pattern(9, 2 << 20), 64 << 20).unwrap();
    img.discard(64 << 20, 1 << 20).unwrap();
    reference.discard(64 << 20, 1 << 20).unwrap();
    img.flush().unwrap();
    reference.flush().unwrap();
}

fn raw_twin(p: &Path, size: u64) -> Box<dyn Image> {
    std::fs::File::create(p).unwrap().set_len(size).unwrap();
    open(p, Format::Raw, false).unwrap()
}

/// QEMU 7.2 (Debian 12) opens only 512-byte logical sectors ("Currently we only support
/// 512": ENOTSUP): 4 KiB images are checked against the raw reference here alone.
fn qemu_reads(o: &VhdxOptions) -> bool {
    o.logical_sector == 512
}

fn ferry_made(o: VhdxOptions) {
    let d = tempfile::tempdir().unwrap();
    let (v, r) = (d.path().join("d.vhdx"), d.path().join("d.raw"));
    {
        let img = create_vhdx(&v, &o).unwrap();
        let reference = raw_twin(&r, o.size);
        assert_eq!(img.size(), o.size);
        assert_eq!(img.sector_size(), o.logical_sector);
        exercise(img.as_ref(), reference.as_ref());
        // Locked while open, against qemu-img too.
        assert!(matches!(
            open(&v, Format::Vhdx, true),
            Err(StorageError::Locked { .. })
        ));
    }
    if qemu_reads(&o) {
        qemu_img(&["check", "-q", "-f", "vhdx", s(&v)]);
        qemu_img(&["compare", "-q", "-f", "vhdx", "-F", "raw", s(&v), s(&r)]);
    }
    // Reopened here, the same.
    let img = open(&v, Format::Vhdx, true).unwrap();
    let reference = open(&r, Format::Raw, true).unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for off in [
        0,
        32 << 20,
        64 << 20,
        (o.size / 2) & !0xfffff,
        o.size - (1 << 20),
    ] {
        img.read_at(&mut a, off).unwrap();
        reference.read_at(&mut b, off).unwrap();
        assert!(a == b, "at {off:#x}");
    }
}

#[test]
fn a_dynamic_image_made_here_passes_qemu_img_check_and_compare() {
    ferry_made(VhdxOptions::dynamic(256 << 20));
    // Small blocks: many allocations, several sector bitmap entries' worth.
    ferry_made(VhdxOptions {
        block_size: Some(1 << 20),
        ..VhdxOptions::dynamic(1 << 30)
    });
}

#[test]
fn four_k_sector_and_fixed_images_made_here_pass_qemu_img_check_and_compare() {
    ferry_made(VhdxOptions {
        logical_sector: 4096,
        ..VhdxOptions::dynamic(256 << 20)
    });
    ferry_made(VhdxOptions {
        fixed: true,
        block_size: Some(8 << 20),
        ..VhdxOptions::dynamic(200 << 20)
    });
}

#[test]
fn images_qemu_img_made_open_and_work_here() {
    for extra in ["subformat=dynamic", "subformat=fixed", "block_size=1M"] {
        let d = tempfile::tempdir().unwrap();
        let (v, r) = (d.path().join("q.vhdx"), d.path().join("q.raw"));
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", extra, s(&v), "128M"]);
        // qemu's writes first (through its own log), then Ferry's.
        run(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x5a 1M 128k", s(&v)],
        );
        {
            let reference = raw_twin(&r, 128 << 20);
            reference.write_at(&[0x5a; 128 << 10], 1 << 20).unwrap();
            let img = open(&v, Format::Vhdx, false).unwrap_or_else(|e| panic!("{extra}: {e}"));
            assert_eq!(img.size(), 128 << 20);
            let mut b = vec![0u8; 128 << 10];
            img.read_at(&mut b, 1 << 20).unwrap();
            assert!(b.iter().all(|&x| x == 0x5a), "{extra}: qemu's data");
            exercise(img.as_ref(), reference.as_ref());
        }
        qemu_img(&["check", "-q", "-f", "vhdx", s(&v)]);
        qemu_img(&["compare", "-q", "-f", "vhdx", "-F", "raw", s(&v), s(&r)]);
    }
}

#[test]
fn a_16_tb_image_holds_data_at_its_start_middle_and_last_sector() {
    let d = tempfile::tempdir().unwrap();
    for sector in [512u32, 4096] {
        let v = d.path().join(format!("big{sector}.vhdx"));
        let size = 16_000_000_000_000u64 / 4096 * 4096;
        let spots = [0, size / 2, size - u64::from(sector)];
        {
            let img = create_vhdx(
                &v,
                &VhdxOptions {
                    logical_sector: sector,
                    ..VhdxOptions::dynamic(size)
                },
            )
            .unwrap();
            for (i, &off) in spots.iter().enumerate() {
                img.write_at(&[0xa0 + i as u8; 512], off).unwrap();
            }
            img.flush().unwrap();
            // Only what was written is data.
            let data: u64 = img
                .extents(0, size)
                .unwrap()
                .iter()
                .filter(|e| e.data)
                .map(|e| e.len)
                .sum();
            assert!(data <= 3 * (64 << 10), "{data} bytes of data");
        }
        // Small on the host: headers, log, metadata, BAT, three blocks' written pages.
        let on_disk = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&v).unwrap().blocks() * 512
        };
        assert!(on_disk < 64 << 20, "{on_disk} bytes on the host");
        let img = open(&v, Format::Vhdx, true).unwrap();
        for (i, &off) in spots.iter().enumerate() {
            let mut b = [0u8; 512];
            img.read_at(&mut b, off).unwrap();
            assert!(b.iter().all(|&x| x == 0xa0 + i as u8), "at {off}");
        }
        drop(img);
        if sector != 512 {
            continue; // see qemu_reads
        }
        let info = qemu_img(&["info", "--output=json", "-f", "vhdx", s(&v)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        qemu_img(&["check", "-q", "-f", "vhdx", s(&v)]);
        for (i, &off) in spots.iter().enumerate() {
            let cmd = format!("read -P {:#x} {off} 512", 0xa0 + i);
            let out = run("qemu-io", &["-r", "-f", "vhdx", "-c", &cmd, s(&v)]);
            assert!(!out.contains("Pattern verification failed"), "{out}");
        }
    }
}

#[test]
fn damaged_or_unsupported_images_get_clear_errors_and_are_not_changed() {
    let d = tempfile::tempdir().unwrap();
    let v = d.path().join("d.vhdx");
    drop(create(&v, Format::Vhdx, 64 << 20).unwrap());
    let good = std::fs::read(&v).unwrap();
    let cases: [(&str, usize, &str); 3] = [
        ("signature", 0, "not a VHDX image"),
        // Both headers' checksums.
        ("headers", 64 << 10, "headers are damaged"),
        ("regions", 192 << 10, "region tables are damaged"),
    ];
    for (what, at, msg) in cases {
        let mut b = good.clone();
        b[at + 2] ^= 0xff;
        if what != "signature" {
            b[at + (64 << 10) + 2] ^= 0xff; // the second copy as well
        }
        std::fs::write(&v, &b).unwrap();
        let e = open(&v, Format::Vhdx, false).err().expect(what).to_string();
        assert!(e.contains(msg), "{what}: {e}");
        assert!(
            std::fs::read(&v).unwrap() == b,
            "{what}: the file was changed"
        );
    }
    // One header damaged: the other serves.
    let mut b = good.clone();
    b[(64 << 10) + 20] ^= 0xff;
    std::fs::write(&v, &b).unwrap();
    open(&v, Format::Vhdx, false).unwrap();
    let raw = d.path().join("x.raw");
    std::fs::write(&raw, b"not a vhdx").unwrap();
    let e = open(&raw, Format::Vhdx, false).err().unwrap().to_string();
    assert!(e.contains("too short"), "{e}");
}
