//! Snapshot to a directory and restore from it, on real KVM with the test guest.
mod common;
use common::*;
use ferry_guest::console::{wait_all, wait_for, LineSink, TimedLine};
use ferry_guest::verify::{verify_dirty_region, DirtyPosition};
use ferry_vmm::snapshot::{restore, MemoryCheck};
use ferry_vmm::{GuestExit, Vm};
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::Duration;

fn restored(dir: &Path) -> (Vm, Receiver<TimedLine>) {
    let (sink, rx) = LineSink::new();
    let (vm, report) = restore(dir, Box::new(sink), MemoryCheck::BeforeStart).expect("restore");
    assert!(report.memory_verified_before_start);
    (vm, rx)
}

#[test]
fn heartbeat_continues_with_the_next_number_after_restore() {
    let d = scratch("hb");
    let (vm, rx) = boot(1, 256 << 20, "heartbeat period=1000");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("H0 25 ")).unwrap();
    vm.pause().unwrap();
    let rep = vm.snapshot(&d.0, false).unwrap();
    assert!(!rep.diff && rep.pages_stored > 0);
    vm.shutdown().unwrap();
    vm.wait();
    std::thread::sleep(Duration::from_millis(20));
    seen.extend(rx.try_iter());
    let last = last_beat(&seen, 0);
    let (vm2, rx2) = restored(&d.0);
    assert_heartbeat_continues(&vm2, &rx2, last);
}

/// Pauses, snapshots (full or diff), checks the guest's memory in the source, resumes.
fn snap(vm: &Vm, dir: &Path, diff: bool, base: u64) -> DirtyPosition {
    vm.pause().unwrap();
    let p = verify_dirty_region(&reader(vm), base).unwrap();
    let r = vm.snapshot(dir, diff).unwrap();
    assert_eq!(r.diff, diff);
    vm.resume().unwrap();
    p
}

#[test]
fn dirty_memory_is_page_exact_through_a_chain_of_diff_snapshots() {
    let d = scratch("chain");
    let (vm, rx) = boot(1, 512 << 20, "dirty size=64M rate=40M hb=5000");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("S0 dirty")).unwrap();
    let base = bases(&seen)[0];
    wait_for(&rx, &mut seen, T, |l| l == "D0 1").unwrap();
    let mut positions = Vec::new();
    let names = ["full", "d1", "d2", "d3"];
    for (i, name) in names.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(300));
        positions.push(snap(&vm, &d.0.join(name), i > 0, base));
    }
    vm.shutdown().unwrap();
    vm.wait();
    // Diffs are smaller than the full snapshot: only what changed.
    let size = |n: &str| {
        std::fs::metadata(d.0.join(n).join("memory.bin"))
            .unwrap()
            .len()
    };
    assert!(
        size("d1") < size("full"),
        "{} vs {}",
        size("d1"),
        size("full")
    );
    for (i, name) in names.iter().enumerate() {
        let (vm2, rx2) = restored(&d.0.join(name));
        let p = verify_dirty_region(&reader(&vm2), base).expect("restored memory is exact");
        assert_eq!(
            (p.pass, p.next),
            (positions[i].pass, positions[i].next),
            "{name}"
        );
        vm2.start().unwrap();
        let mut after = Vec::new();
        let want = format!("D0 {}", p.pass);
        wait_for(&rx2, &mut after, T, |l| l == want).unwrap();
        vm2.pause().unwrap();
        verify_dirty_region(&reader(&vm2), base).expect("exact after running on");
        vm2.shutdown().unwrap();
        vm2.wait();
    }
}

#[test]
fn a_restored_four_vcpu_vm_can_be_snapshotted_again() {
    let d = scratch("again");
    let (vm, rx) = boot(4, 512 << 20, "dirty size=8M rate=20M hb=3000");
    let mut seen = Vec::new();
    // vCPUs print in any order: wait until each has finished a pass.
    let want: Vec<String> = (0..4).map(|c| format!("D{c} 1")).collect();
    wait_all(&rx, &mut seen, T, &want).unwrap();
    let bs = bases(&seen);
    assert_eq!(bs.len(), 4);
    vm.pause().unwrap();
    vm.snapshot(&d.0.join("a"), false).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    let (vm2, rx2) = restored(&d.0.join("a"));
    vm2.start().unwrap();
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, |l| {
        l.starts_with("D") && l.ends_with(" 2")
    })
    .unwrap();
    vm2.pause().unwrap();
    let before: Vec<_> = bs
        .iter()
        .map(|&b| verify_dirty_region(&reader(&vm2), b).unwrap())
        .collect();
    vm2.snapshot(&d.0.join("b"), true).unwrap(); // diff against the snapshot it came from
    vm2.snapshot(&d.0.join("c"), false).unwrap(); // and a full one
    vm2.shutdown().unwrap();
    vm2.wait();
    for name in ["b", "c"] {
        let (vm3, _rx3) = restored(&d.0.join(name));
        for (b, p0) in bs.iter().zip(&before) {
            let p = verify_dirty_region(&reader(&vm3), *b).unwrap();
            assert_eq!((p.pass, p.next), (p0.pass, p0.next), "{name}");
        }
        vm3.start().unwrap();
        vm3.shutdown().unwrap();
        vm3.wait();
    }
}

#[test]
fn a_64_gib_vm_with_256_mib_touched_makes_a_small_snapshot() {
    let d = scratch("big");
    let (vm, rx) = boot(1, 64 << 30, "dirty size=256M");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l == "D0 1").unwrap();
    vm.pause().unwrap();
    let rep = vm.snapshot(&d.0, false).unwrap();
    let total: u64 = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total < 300 << 20, "snapshot is {} MiB", total >> 20);
    assert!(rep.bytes_stored >= 256 << 20);
}

#[test]
fn corrupt_memory_is_refused_before_start_or_stops_the_vm_before_it_is_read() {
    let d = scratch("corrupt");
    // vCPU 1 checksums its region over and over: a corrupt page it read would print BAD.
    let (vm, rx) = boot(2, 128 << 20, "dirty size=4M ; verify size=4M");
    wait_for(&rx, &mut Vec::new(), T, |l| l.starts_with("V1 2 ")).unwrap();
    vm.pause().unwrap();
    vm.snapshot(&d.0, false).unwrap();
    let mem = d.0.join("memory.bin");
    let mut b = std::fs::read(&mem).unwrap();
    let n = b.len();
    b[n - 100] ^= 0x10;
    std::fs::write(&mem, b).unwrap();
    let e = restore(&d.0, Box::new(std::io::sink()), MemoryCheck::BeforeStart)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("CRC mismatch in memory run"), "{e}");
    let (sink, rx2) = LineSink::new();
    let (vm2, _) = restore(&d.0, Box::new(sink), MemoryCheck::Background).unwrap();
    assert!(vm2.memory_loading());
    vm2.start().unwrap();
    match vm2.wait() {
        GuestExit::Crashed { reason } => {
            assert!(reason.contains("snapshot memory is corrupt"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let lines: Vec<String> = rx2.try_iter().map(|l| l.1).collect();
    assert!(
        !lines.iter().any(|l| l.contains("BAD")),
        "the guest read corrupt memory: {lines:?}"
    );
}

#[test]
fn a_lazily_checked_restore_of_a_diff_chain_is_page_exact() {
    let d = scratch("lazy");
    let (vm, rx) = boot(1, 256 << 20, "dirty size=32M rate=40M hb=5000");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l == "D0 1").unwrap();
    let base = bases(&seen)[0];
    let p0 = snap(&vm, &d.0.join("full"), false, base);
    std::thread::sleep(Duration::from_millis(300));
    let p1 = snap(&vm, &d.0.join("d1"), true, base);
    assert_ne!((p0.pass, p0.next), (p1.pass, p1.next));
    vm.shutdown().unwrap();
    vm.wait();
    let (vm2, rx2) = {
        let (sink, rx) = LineSink::new();
        let (vm, _) = restore(&d.0.join("d1"), Box::new(sink), MemoryCheck::Background).unwrap();
        (vm, rx)
    };
    // Snapshots wait until memory is complete.
    let e = vm2
        .snapshot(&d.0.join("early"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("still being loaded"), "{e}");
    // Read through the VMM before any vCPU runs: each page is loaded (and checked) on touch.
    let p = verify_dirty_region(&reader(&vm2), base).expect("restored memory is exact");
    assert_eq!((p.pass, p.next), (p1.pass, p1.next));
    vm2.start().unwrap();
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("D0 ")).unwrap();
    let t = std::time::Instant::now();
    while vm2.memory_loading() {
        assert!(t.elapsed() < T, "memory never completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm2.pause().unwrap();
    verify_dirty_region(&reader(&vm2), base).expect("exact after the background load");
    vm2.snapshot(&d.0.join("after"), false).unwrap();
    vm2.shutdown().unwrap();
    vm2.wait();
}

#[test]
fn diff_needs_a_parent_and_a_paused_vm() {
    let d = scratch("rules");
    let (vm, _rx) = boot(1, 64 << 20, "idle");
    assert!(vm
        .snapshot(&d.0, false)
        .unwrap_err()
        .to_string()
        .contains("pause it first"));
    vm.pause().unwrap();
    assert!(vm
        .snapshot(&d.0, true)
        .unwrap_err()
        .to_string()
        .contains("needs a previous snapshot"));
    vm.snapshot(&d.0, false).unwrap();
    assert!(vm
        .snapshot(&d.0, true)
        .unwrap_err()
        .to_string()
        .contains("cannot replace its parent"));
    vm.shutdown().unwrap();
    vm.wait();
}

/// A stop right after start reaches every vCPU, even one that never exits to the VMM again
/// (a restored idle guest): a kick that lands just before KVM_RUN must not be lost.
#[test]
fn a_stop_right_after_start_ends_a_vm_that_never_exits() {
    let d = scratch("stopnow");
    let (vm, rx) = boot(4, 64 << 20, "idle");
    let mut seen = Vec::new();
    let want: Vec<String> = (0..4).map(|c| format!("S{c} idle")).collect();
    wait_all(&rx, &mut seen, T, &want).unwrap();
    vm.pause().unwrap();
    vm.snapshot(&d.0, false).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    for round in 0..100u32 {
        let (vm2, _rx2) = restored(&d.0);
        vm2.start().unwrap();
        // Stop at a different point of the vCPU threads' start each round.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_micros((round as u64 * 7) % 400) {
            std::hint::spin_loop();
        }
        vm2.shutdown().unwrap();
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(vm2.wait());
            });
            let r = done.recv_timeout(Duration::from_secs(30));
            if r.is_err() {
                eprintln!("round {round}: the VM did not stop within 30 s");
                std::process::abort();
            }
            assert_eq!(r.unwrap(), GuestExit::Stopped);
        });
    }
}
