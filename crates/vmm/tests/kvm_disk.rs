//! virtio-blk on real KVM with the test guest's own driver: the guest writes its disk with a
//! pattern that encodes sector and pass and checks it back; the host checks the image file
//! against the guest's recorded position after a snapshot/restore, a live migration, a
//! post-copy migration and a migration that fails before commit (shared storage: one image).
mod common;
use common::disk::*;
use common::live::*;
use common::*;
use ferry_guest::console::{wait_for, LineSink};
use ferry_guest::tools::qemu_img;
use ferry_guest::verify::{disk_position, verify_disk_bytes, verify_disk_image, DiskPosition};
use ferry_migration::engine::Options;
use ferry_storage::Format;
use ferry_vmm::snapshot::{restore, MemoryCheck};
use ferry_vmm::{GuestExit, RunState};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[test]
fn what_the_guest_writes_through_virtio_blk_is_on_the_image_sector_for_sector() {
    let (_d, disk) = scratch_disk("disk-plain");
    let (vm, rx) = boot_disk("disk span=2M passes=3 bs=8K", &disk);
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, k_ok(3)).unwrap();
    assert_eq!(vm.wait(), GuestExit::PowerOff { code: 0 });
    let p = DiskPosition {
        cpu: 0,
        sectors: 4096,
        block: 16,
        pass: 3,
        next: 256,
        completed: 3,
    };
    let f = std::fs::File::open(&disk).unwrap();
    verify_disk_image(
        |off, buf| f.read_exact_at(buf, off).map_err(|e| e.to_string()),
        &p,
    )
    .unwrap();
    // Beyond the span the image was never written: still a hole.
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 4 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // A lost write would show: the verifier names it.
    let stale = DiskPosition { pass: 4, ..p };
    assert!(verify_disk_image(
        |off, buf| f.read_exact_at(buf, off).map_err(|e| e.to_string()),
        &stale
    )
    .is_err());
}

#[test]
fn a_snapshot_of_a_vm_writing_its_disk_restores_and_carries_on_exactly() {
    let (d, disk) = scratch_disk("disk-snap");
    let snap = d.0.join("snap");
    let (vm, rx) = boot_disk(WORK, &disk);
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, k_ok(1)).unwrap();
    vm.pause().unwrap();
    let base = bases(&seen)[0];
    let p0 = check_image(&vm, base, &disk);
    vm.snapshot(&snap, false).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    drop(vm); // the image is free for the restored VM
    let (sink, rx2) = LineSink::new();
    let (vm2, _) = restore(&snap, Box::new(sink), MemoryCheck::BeforeStart).expect("restore");
    vm2.start().unwrap();
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, k_ok(p0.pass + 1)).unwrap();
    vm2.pause().unwrap();
    let p = check_image(&vm2, base, &disk);
    assert!(p.pass > p0.pass, "{p:?} after {p0:?}");
    vm2.shutdown().unwrap();
    vm2.wait();
}

/// Migrates a VM writing its disk with `opts`; after the hand-over the guest reads its whole
/// span back correctly at least once more, the image matches its position, and the
/// heartbeat ran on without a gap in numbering.
fn migrate_writing(tag: &str, opts: Options) {
    let (_d, disk) = scratch_disk(tag);
    let (src, rx) = boot_disk(WORK, &disk);
    let (mut seen, base) = first_pass(&rx);
    let (addr, dest) = destination(None);
    let report = send_vm(&src, addr, &opts).expect("migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    assert_eq!(vm.state(), RunState::Running);
    let before = seen
        .iter()
        .filter_map(|(_, l)| {
            l.strip_prefix("K0 ")?
                .strip_suffix(" ok")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, k_ok(before + 1)).unwrap();
    vm.pause().unwrap();
    check_image(&vm, base, &disk);
    vm.resume().unwrap();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("H0 ")).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    after.extend(rx2.try_iter());
    let mut log = ferry_guest::heartbeat::HeartbeatLog::default();
    beats(&mut log, &seen);
    beats(&mut log, &after);
    log.check_continuous().expect("heartbeat continuous");
    assert!(
        report.passes.len() >= 2 || report.postcopy.is_some(),
        "{report:?}"
    );
}

#[test]
fn a_live_migration_of_a_vm_writing_its_disk_is_pattern_exact() {
    migrate_writing("disk-live", Options::default());
}

#[test]
fn a_post_copy_migration_of_a_vm_writing_its_disk_is_pattern_exact() {
    migrate_writing(
        "disk-postcopy",
        Options {
            postcopy_after: Some(1),
            ..Options::default()
        },
    );
}

#[test]
fn a_migration_that_fails_before_commit_leaves_the_source_owning_its_disk() {
    let (_d, disk) = scratch_disk("disk-fail");
    let (src, rx) = boot_disk(WORK, &disk);
    let (mut seen, base) = first_pass(&rx);
    // The destination dies as the source's state reaches it (after the source released the
    // image, maybe after the destination opened it).
    let (addr, dest) = destination(Some(Box::new(|_, kind, _| kind != K_STATE)));
    let r = send_vm(&src, addr, &Options::default());
    assert!(r.is_err(), "the migration must fail");
    let _ = dest.join();
    assert_eq!(src.state(), RunState::Running, "the source runs on");
    wait_for(&rx, &mut seen, T, k_ok(2)).unwrap();
    src.pause().unwrap();
    check_image(&src, base, &disk);
    // And it holds the image again: another VMM cannot open it.
    assert!(ferry_storage::open(&disk, Format::Raw, false).is_err());
    src.shutdown().unwrap();
    src.wait();
}

#[test]
fn ten_ping_pong_migrations_with_the_disk_busy_keep_it_pattern_exact() {
    let (_d, disk) = scratch_disk("disk-pingpong");
    let (mut vm, mut rx) = boot_disk("disk span=2M rate=16M hb=2000", &disk);
    let (seen, base) = first_pass(&rx);
    let mut all = seen.clone();
    for i in 0..10 {
        let (addr, dest) = destination(None);
        send_vm(&vm, addr, &Options::default()).unwrap_or_else(|e| panic!("migration {i}: {e}"));
        let mut tail = Vec::new();
        let (next, rx2) = hand_over(&vm, &rx, &mut tail, dest);
        all.extend(tail);
        vm = next;
        rx = rx2;
        // Some disk progress on every host before moving on.
        let mut lines = Vec::new();
        wait_for(&rx, &mut lines, T, |l| l.starts_with("H0 ")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        lines.extend(rx.try_iter());
        assert!(
            !lines
                .iter()
                .any(|(_, l)| l.contains("BAD") || l.starts_with('!')),
            "{lines:?}"
        );
        all.extend(lines);
    }
    let p0 = disk_position(&reader(&vm), base).unwrap();
    wait_for(&rx, &mut all, T, k_ok(p0.pass)).unwrap();
    vm.pause().unwrap();
    let p = check_image(&vm, base, &disk);
    assert!(p.completed >= 2, "{p:?}");
    vm.shutdown().unwrap();
    vm.wait();
    all.extend(rx.try_iter());
    let mut log = ferry_guest::heartbeat::HeartbeatLog::default();
    beats(&mut log, &all);
    log.check_continuous()
        .expect("heartbeat continuous across ten moves");
}

#[test]
fn a_live_migration_of_a_vm_writing_a_qcow2_overlay_is_pattern_exact() {
    let d = scratch("disk-qcow2");
    let run = qemu_img;
    let base = d.0.join("base.qcow2");
    let top = d.0.join("top.qcow2");
    run(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    ferry_guest::tools::qcow2_overlay("base.qcow2", top.as_ref());
    let (src, rx) = boot_disk_as(WORK, &top, Format::Qcow2);
    let (mut seen, base_gpa) = first_pass(&rx);
    let (addr, dest) = destination(None);
    send_vm(&src, addr, &Options::default()).expect("migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, k_ok(2)).unwrap();
    vm.pause().unwrap();
    let p = disk_position(&reader(&vm), base_gpa).unwrap();
    vm.flush_disks().unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    drop(vm); // its write lock excludes even qemu-img -U (see docs/devices.md)
              // As qemu-img reads the overlay.
    let flat = d.0.join("flat.raw");
    run(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&flat).unwrap();
    verify_disk_bytes(&bytes, &p).expect("the overlay holds the guest's writes");
    run(&["check", "-q", top.to_str().unwrap()]);
}

/// The guest's kicks reach the device through an ioeventfd and the I/O thread; a pause must
/// still leave nothing in flight: at every one of many pauses, with the guest writing flat
/// out, the queue's saved `next_avail` equals the avail index the guest published (every
/// request it made available was served, none is left for a destination that will never get
/// the kick), and the guest carries on after each resume.
#[test]
fn every_pause_drains_the_requests_the_guest_kicked() {
    let (_d, disk) = scratch_disk("disk-drain");
    let (vm, rx) = boot_disk("disk span=1M bs=4K hb=2000", &disk);
    let (mut seen, base) = first_pass(&rx);
    let mut published = Vec::new();
    for i in 0..200 {
        vm.pause().unwrap();
        let st = vm.save_state().unwrap();
        let q = &st.devices.virtio[0].mmio.queues[0];
        let mut idx = [0u8; 2];
        reader(&vm)(q.avail_ring + 2, &mut idx).unwrap();
        let avail = u16::from_le_bytes(idx);
        assert_eq!(
            q.next_avail, avail,
            "pause {i}: a request made available was not served"
        );
        assert_eq!(
            q.next_used, avail,
            "pause {i}: a request served was not completed"
        );
        published.push(avail);
        if i % 50 == 49 {
            check_image(&vm, base, &disk);
        }
        vm.resume().unwrap();
        std::thread::sleep(std::time::Duration::from_micros(300 + (i % 7) * 200));
    }
    published.dedup();
    assert!(
        published.len() > 100,
        "the guest hardly moved: {published:?}"
    );
    vm.pause().unwrap();
    let p0 = check_image(&vm, base, &disk);
    vm.resume().unwrap();
    wait_for(&rx, &mut seen, T, k_ok(p0.pass + 1)).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
}

/// The benchmark workload's deep driver: 32 requests in flight on a 128-entry queue, random
/// offsets, writes then reads; every request completes with status OK (the guest stops at
/// the first that does not) and the guest counts them all.
#[test]
fn thirty_two_requests_in_flight_all_complete() {
    let (_d, disk) = scratch_disk("disk-qd32");
    for work in [
        "disk-bench span=4M bs=4K qd=32 random=1 ops=3000",
        "disk-bench span=4M bs=4K qd=32 random=1 ops=3000 read=1",
        "disk-bench span=4M bs=64K qd=7",
    ] {
        let (vm, rx) = boot_disk(work, &disk);
        let mut seen = Vec::new();
        let line = wait_for(&rx, &mut seen, T, |l: &str| {
            assert!(!l.starts_with('!'), "{work}: {l}");
            l.starts_with("Q0 ")
        })
        .unwrap();
        let f: Vec<u64> = line
            .1
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        let (ops, bs) = if work.contains("64K") {
            (64, 64 << 10)
        } else {
            (3000, 4096)
        };
        assert_eq!((f[0], f[1]), (ops, ops * bs), "{work}: {}", line.1);
        assert_eq!(vm.wait(), GuestExit::PowerOff { code: 0 }, "{work}");
    }
}

/// A VM that has ended lets go of its disk when it is dropped, not some time later: the next
/// VM on the same image opens it at once (the I/O thread is stopped and joined on drop; it
/// used to hold the image, and its lock, until its poll timed out).
#[test]
fn a_dropped_vm_releases_its_image_at_once() {
    let (_d, disk) = scratch_disk("disk-release");
    for round in 0..20 {
        let (vm, rx) = boot_disk("disk span=1M rate=16M hb=2000", &disk);
        let mut seen = Vec::new();
        wait_for(&rx, &mut seen, T, |l| l.starts_with("S0 ")).unwrap();
        vm.shutdown().unwrap();
        vm.wait();
        drop(vm);
        let f = ferry_storage::open(&disk, Format::Raw, false);
        assert!(f.is_ok(), "round {round}: {:?}", f.err());
    }
}

/// `Vm::move_disk` (`ferry disk move`) while the guest writes its disk: cancelled once the
/// copy is under way, the VM stays on its file and the target is gone; then moved to a
/// directory as qcow2 to completion, the VM runs on the new file (its configuration names
/// it, the old file is free); then on to VHDX, where both the guest's pattern and 256 MiB
/// the guest never touched are exact; only allocated data was copied, and both images pass
/// `qemu-img check`.
#[test]
fn a_disk_moves_while_the_guest_writes_and_a_cancelled_move_leaves_it_in_place() {
    use ferry_vmm::disk_move::{MoveError, MoveMonitor};
    let d = scratch("disk-move");
    let disk = d.0.join("disk.raw");
    let (fill_at, fill_len) = (64u64 << 20, 256usize << 20);
    {
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(512 << 20).unwrap();
        for off in (0..fill_len as u64).step_by(1 << 20) {
            f.write_all_at(&host_fill(fill_at + off, 1 << 20), fill_at + off)
                .unwrap();
        }
    }
    let (vm, rx) = boot_disk(WORK, &disk);
    let (mut seen, base) = first_pass(&rx);

    let mon = MoveMonitor::default();
    let target = d.0.join("moved.qcow2");
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| vm.move_disk("disk0", &target, Some(Format::Qcow2), &mon));
        while mon.status().is_none_or(|st| st.progress.cursor < 128 << 20) && !h.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        mon.cancel();
        h.join().unwrap()
    });
    assert!(matches!(r, Err(MoveError::Cancelled { .. })), "{r:?}");
    assert!(!target.exists(), "the cancelled move's target is deleted");
    assert_eq!(vm.config_now().disks[0].path, disk);
    vm.pause().unwrap();
    let p = check_image(&vm, base, &disk);
    vm.resume().unwrap();
    wait_for(&rx, &mut seen, T, k_ok(p.pass + 1)).unwrap();

    let mon = MoveMonitor::default();
    let rep = vm
        .move_disk("disk0", &d.0, Some(Format::Qcow2), &mon)
        .expect("disk move");
    let moved = d.0.join("disk.qcow2");
    assert_eq!(rep.to, moved);
    assert!(
        rep.copied_bytes >= fill_len as u64 && rep.copied_bytes < (fill_len as u64) + (32 << 20),
        "only allocated data is copied: {rep:?}"
    );
    let now = &vm.config_now().disks[0];
    assert_eq!((&now.path, now.format), (&moved, Format::Qcow2));
    drop(ferry_storage::open(&disk, Format::Raw, false).expect("the old file is free"));
    // The guest goes on writing, on the new file; then the disk moves on, to VHDX.
    wait_for(&rx, &mut seen, T, k_ok(p.pass + 3)).unwrap();
    let rep = vm
        .move_disk("disk0", &d.0, Some(Format::Vhdx), &MoveMonitor::default())
        .expect("disk move to vhdx");
    let vhdx = d.0.join("disk.vhdx");
    assert_eq!(rep.to, vhdx);
    assert_eq!(vm.config_now().disks[0].format, Format::Vhdx);
    wait_for(&rx, &mut seen, T, k_ok(p.pass + 5)).unwrap();
    vm.pause().unwrap();
    let p = disk_position(&reader(&vm), base).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    drop(vm);
    let img = ferry_storage::open(&vhdx, Format::Vhdx, true).unwrap();
    verify_disk_image(
        |off, buf| img.read_at(buf, off).map_err(|e| e.to_string()),
        &p,
    )
    .expect("the moved image matches the guest's position");
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..fill_len as u64).step_by(1 << 20) {
        img.read_at(&mut buf, fill_at + off).unwrap();
        assert!(
            buf == host_fill(fill_at + off, 1 << 20),
            "data at {:#x}",
            fill_at + off
        );
    }
    drop(img);
    qemu_img(&["check", "-q", moved.to_str().unwrap()]);
    qemu_img(&["check", "-q", vhdx.to_str().unwrap()]);
}

/// A move whose target fills up (a 16 MiB tmpfs for 64 MiB of data) fails: the VM stays on
/// its file, exact, the partial target is deleted, and the guest goes on.
#[test]
fn a_disk_move_that_runs_out_of_space_leaves_the_vm_on_its_file() {
    use ferry_vmm::disk_move::{MoveError, MoveMonitor};
    let d = scratch("disk-move-full");
    let disk = d.0.join("disk.raw");
    {
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(128 << 20).unwrap();
        for off in (0..64u64 << 20).step_by(1 << 20) {
            f.write_all_at(&host_fill((32 << 20) + off, 1 << 20), (32 << 20) + off)
                .unwrap();
        }
    }
    let small = d.0.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16M", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount (root)");
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let (vm, rx) = boot_disk(WORK, &disk);
    let (mut seen, base) = first_pass(&rx);
    let r = vm.move_disk("disk0", &small, None, &MoveMonitor::default());
    match &r {
        Err(MoveError::Copy { why, .. }) => assert!(why.contains("space"), "{why}"),
        other => panic!("expected a failed copy: {other:?}"),
    }
    assert!(
        std::fs::read_dir(&small).unwrap().next().is_none(),
        "the target is deleted"
    );
    assert_eq!(vm.config_now().disks[0].path, disk);
    vm.pause().unwrap();
    let p = check_image(&vm, base, &disk);
    vm.resume().unwrap();
    wait_for(&rx, &mut seen, T, k_ok(p.pass + 1)).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
}
