//! Shared-nothing live migration on real KVM: the test guest writes its disk (at 16 MB/s and
//! flat out) while the VM moves with its disk to a destination that creates a new image in a
//! directory of its own (raw, or qcow2 converted on the way). The destination's image is
//! checked block-exact against the guest's recorded position, 32 MiB the guest never touched
//! are exact there, only allocated data travelled (a 1 TiB sparse disk), the heartbeat stays
//! continuous. Faults: the destination killed during the bulk copy, during the mirror phase
//! (memory passes) and at the switch-over: the source runs on, its disk exact, and the
//! destination has deleted what it created.
mod common;
use common::disk::*;
use common::live::*;
use common::*;
use ferry_guest::console::{wait_for, TimedLine};
use ferry_guest::heartbeat::HeartbeatLog;
use ferry_guest::verify::{disk_position, verify_disk_image};
use ferry_migration::engine::Options;
use ferry_storage::Format;
use ferry_vmm::RunState;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const TIB: u64 = 1 << 40;
/// Where the host's own data lies on the disk (the guest writes its first 4 MiB).
const FILL: (u64, usize) = (16 << 20, 32 << 20);

/// A 1 TiB sparse raw disk in `dir` with [`FILL`] written by the host.
fn source_disk(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(TIB).unwrap();
    for off in (0..FILL.1 as u64).step_by(1 << 20) {
        f.write_all_at(&host_fill(FILL.0 + off, 1 << 20), FILL.0 + off)
            .unwrap();
    }
    p
}

/// Reads `path` as `format` and checks it against the guest's position and the host's data.
fn check_moved(path: &Path, format: Format, p: &ferry_guest::verify::DiskPosition) {
    let img = ferry_storage::open(path, format, true).expect("the destination's image");
    assert_eq!(img.size(), TIB);
    verify_disk_image(
        |off, buf| img.read_at(buf, off).map_err(|e| e.to_string()),
        p,
    )
    .expect("the destination's image matches the guest's position");
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..FILL.1 as u64).step_by(1 << 20) {
        img.read_at(&mut buf, FILL.0 + off).unwrap();
        assert!(
            buf == host_fill(FILL.0 + off, 1 << 20),
            "host data at {off:#x}"
        );
    }
}

fn k_passes(seen: &[TimedLine]) -> u64 {
    seen.iter()
        .filter_map(|(_, l)| l.strip_prefix("K0 ")?.strip_suffix(" ok")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Moves a VM writing its disk with `work` to a destination storing in a directory of its
/// own, as `to` (None: the source's format), with `opts`; checks everything on arrival.
fn move_with_disk(tag: &str, work: &str, to: Option<Format>, opts: Options) {
    move_from(tag, work, source_disk, Format::Raw, to, opts);
}

/// As [`move_with_disk`], the source disk made by `make` (in a directory of its own) as
/// `from`.
fn move_from(
    tag: &str,
    work: &str,
    make: fn(&Path) -> PathBuf,
    from: Format,
    to: Option<Format>,
    opts: Options,
) {
    let (src_dir, dst_dir) = (
        scratch(&format!("{tag}-src")),
        scratch(&format!("{tag}-dst")),
    );
    let disk = make(&src_dir.0);
    let (src, rx) = boot_disk_as(work, &disk, from);
    let (mut seen, base) = first_pass(&rx);
    let (addr, dest) = destination_storing(None, &dst_dir.0);
    let opts = Options {
        copy_storage: true,
        disk_map: match to {
            Some(f) => vec![("disk0".into(), format!("moved.{f}"), Some(f.to_string()))],
            None => Vec::new(),
        },
        ..opts
    };
    let report = send_vm(&src, addr, &opts).expect("shared-nothing migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    assert_eq!(vm.state(), RunState::Running);
    let st = report.storage.clone().expect("a storage report");
    assert_eq!((st.disks, st.size_bytes), (1, TIB), "{st:?}");
    assert!(
        st.copied_bytes >= FILL.1 as u64 && st.copied_bytes < (FILL.1 as u64) + (16 << 20),
        "only allocated data travels: {st:?}"
    );
    let (path, format) = match to {
        Some(f) => (dst_dir.0.join(format!("moved.{f}")), f),
        None => (dst_dir.0.join(disk.file_name().unwrap()), from),
    };
    let now = &vm.config_now().disks[0];
    assert_eq!((&now.path, now.format), (&path, format));
    let mut after = Vec::new();
    let before = k_passes(&seen);
    wait_for(&rx2, &mut after, T, k_ok(before + 2)).unwrap();
    vm.pause().unwrap();
    let p = disk_position(&reader(&vm), base).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    drop(vm);
    after.extend(rx2.try_iter());
    check_moved(&path, format, &p);
    let mut log = HeartbeatLog::default();
    beats(&mut log, &seen);
    beats(&mut log, &after);
    log.check_continuous().expect("heartbeat continuous");
}

#[test]
fn a_vm_writing_at_16_mb_s_moves_with_its_disk_block_exact() {
    move_with_disk("sn-raw", WORK, None, Options::default());
}

#[test]
fn a_vm_writing_flat_out_moves_with_its_disk_converted_to_qcow2() {
    move_with_disk(
        "sn-qcow2",
        "disk span=4M rate=0 hb=2000",
        Some(Format::Qcow2),
        Options::default(),
    );
}

#[test]
fn a_post_copy_migration_brings_the_disk_too() {
    move_with_disk(
        "sn-postcopy",
        WORK,
        None,
        Options {
            postcopy_after: Some(1),
            ..Options::default()
        },
    );
}

/// Kills the destination at the frame `when` picks (connection, kind, bytes); the migration
/// fails, the source runs on with its disk exact, and the destination's directory is empty.
fn killed(tag: &str, mut when: impl FnMut(usize, u8, &[u8]) -> bool + Send + 'static) {
    fails(tag, Box::new(move |c, k, f| !when(c, k, f)));
}

/// Runs a shared-nothing migration through `hook` (see [`Hook`]), which makes it fail; the
/// source runs on with its disk exact, and the destination's directory is empty.
fn fails(tag: &str, hook: Hook) {
    fails_with(tag, hook, Options::default());
}

fn fails_with(tag: &str, hook: Hook, opts: Options) {
    let (src_dir, dst_dir) = (
        scratch(&format!("{tag}-src")),
        scratch(&format!("{tag}-dst")),
    );
    let disk = source_disk(&src_dir.0);
    let (src, rx) = boot_disk(WORK, &disk);
    let (mut seen, base) = first_pass(&rx);
    let (addr, dest) = destination_storing(Some(hook), &dst_dir.0);
    let opts = Options {
        copy_storage: true,
        ..opts
    };
    let r = send_vm(&src, addr, &opts);
    assert!(r.is_err(), "the migration must fail: {r:?}");
    let (dr, vm, _) = dest.join().unwrap();
    assert!(
        dr.is_err() && vm.is_none(),
        "the destination must not run the VM"
    );
    assert_eq!(src.state(), RunState::Running, "the source runs on");
    let left: Vec<_> = std::fs::read_dir(&dst_dir.0).unwrap().collect();
    assert!(left.is_empty(), "the destination left {left:?}");
    assert_eq!(src.config_now().disks[0].path, disk);
    let n = k_passes(&seen);
    wait_for(&rx, &mut seen, T, k_ok(n + 1)).unwrap();
    src.pause().unwrap();
    let p = disk_position(&reader(&src), base).unwrap();
    let f = std::fs::File::open(&disk).unwrap();
    verify_disk_image(
        |off, buf| f.read_exact_at(buf, off).map_err(|e| e.to_string()),
        &p,
    )
    .expect("the source's disk is exact");
    src.resume().unwrap();
    src.shutdown().unwrap();
    src.wait();
}

const K_PAGES: u8 = 3;
const K_DISK_DATA: u8 = 19;
const K_DISK_SYNC: u8 = 21;

#[test]
fn the_destination_killed_during_the_bulk_copy_leaves_the_source_running_on_its_disk() {
    let mut n = 0;
    killed("sn-kill-bulk", move |_, k, _| {
        n += (k == K_DISK_DATA) as u32;
        n == 10
    });
}

#[test]
fn the_destination_killed_during_the_mirror_phase_leaves_the_source_running_on_its_disk() {
    killed("sn-kill-mirror", |_, k, _| k == K_PAGES);
}

#[test]
fn the_destination_killed_at_the_switch_over_leaves_the_source_running_on_its_disk() {
    // The last DiskSync (payload byte 1) comes with the VM paused.
    killed("sn-kill-switch", |_, k, f| {
        k == K_DISK_SYNC && f.get(ferry_migration::protocol::HEADER_LEN) == Some(&1)
    });
}

/// Also bounded in time: the destination's Abort reaches the source through the control
/// connection while its copy may be blocked writing the storage connection (the proxy keeps
/// it open): a watcher ends the copy at once (it once waited out the 30 s I/O timeout, thrice).
#[test]
fn a_flipped_byte_in_a_disk_frame_is_refused_and_the_source_runs_on() {
    let t = std::time::Instant::now();
    let mut n = 0;
    fails(
        "sn-flip",
        Box::new(move |_, k, f| {
            n += (k == K_DISK_DATA) as u32;
            if n == 5 && k == K_DISK_DATA {
                let i = f.len() - 100;
                f[i] ^= 0x40;
            }
            true
        }),
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
}

/// A destination that stops reading without closing (a paused process, a stuck disk): the
/// source's mirror and copy block for at most the I/O timeout, then the migration fails and
/// the source runs on, its disk exact (the proxy, stalled for 5 s, then drops everything).
#[test]
fn a_destination_that_stops_reading_fails_the_migration_within_the_io_timeout() {
    let mut n = 0;
    let t = std::time::Instant::now();
    fails_with(
        "sn-stall",
        Box::new(move |_, k, _| {
            n += (k == K_DISK_DATA) as u32;
            if n == 5 && k == K_DISK_DATA {
                std::thread::sleep(std::time::Duration::from_secs(5));
                return false;
            }
            true
        }),
        Options {
            io_timeout: std::time::Duration::from_secs(2),
            ..Options::default()
        },
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t.elapsed()
    );
}

/// Writes [`FILL`] into the image at `p`.
fn fill(p: &Path, format: Format) {
    let img = ferry_storage::open(p, format, false).unwrap();
    for off in (0..FILL.1 as u64).step_by(1 << 20) {
        img.write_at(&host_fill(FILL.0 + off, 1 << 20), FILL.0 + off)
            .unwrap();
    }
    img.flush().unwrap();
}

/// A 1 TiB qcow2 image holding [`FILL`], made with qemu-img.
fn qcow2_disk(dir: &Path) -> PathBuf {
    let p = dir.join("disk.qcow2");
    ferry_guest::tools::qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1T"]);
    fill(&p, Format::Qcow2);
    p
}

/// A qcow2 overlay (empty) on a 1 TiB qcow2 base holding [`FILL`], made with qemu-img.
fn overlay_disk(dir: &Path) -> PathBuf {
    let base = qcow2_disk(dir);
    let top = dir.join("top.qcow2");
    ferry_guest::tools::qcow2_overlay(base.file_name().unwrap().to_str().unwrap(), &top);
    top
}

/// A 1 TiB dynamic VHDX image holding [`FILL`].
fn vhdx_disk(dir: &Path) -> PathBuf {
    let p = dir.join("disk.vhdx");
    drop(ferry_storage::create(&p, Format::Vhdx, TIB).unwrap());
    fill(&p, Format::Vhdx);
    p
}

#[test]
fn a_vm_on_qcow2_moves_with_its_disk_converted_to_vhdx() {
    move_from(
        "sn-vhdx",
        WORK,
        qcow2_disk,
        Format::Qcow2,
        Some(Format::Vhdx),
        Options::default(),
    );
}

#[test]
fn a_vm_on_vhdx_moves_with_its_disk_converted_to_raw() {
    move_from(
        "sn-vhdx-raw",
        WORK,
        vhdx_disk,
        Format::Vhdx,
        Some(Format::Raw),
        Options::default(),
    );
}

/// qcow2 → raw across a migration: the overlay is flattened on the way (its base's data
/// arrives, the destination's raw image has no backing file).
#[test]
fn a_qcow2_overlay_arrives_flattened_into_a_raw_image() {
    move_from(
        "sn-flatten",
        WORK,
        overlay_disk,
        Format::Qcow2,
        Some(Format::Raw),
        Options::default(),
    );
}
