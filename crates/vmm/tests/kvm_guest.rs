//! The VMM on real KVM with the test guest: every workload, several vCPUs, pause/resume,
//! dirty tracking. Each test checks the guest's own output and, where it writes memory, the
//! memory itself against the guest's pattern.
mod common;
use common::{boot, reader, T};
use ferry_guest::console::{wait_for, TimedLine};
use ferry_guest::heartbeat::{parse_line, GuestLine, HeartbeatLog};
use ferry_guest::verify::verify_dirty_region;
use ferry_vmm::{GuestExit, RunState, Vm};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

fn lines_until_exit(vm: &Vm, rx: &Receiver<TimedLine>) -> (GuestExit, Vec<GuestLine>) {
    let exit = vm.wait();
    let lines = rx.try_iter().map(|l| parse_line(&l.1)).collect();
    (exit, lines)
}

/// Region bases from the `S<c>` lines.
fn bases(lines: &[GuestLine]) -> Vec<(u32, u64)> {
    lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Start {
                cpu, base: Some(b), ..
            } => Some((*cpu, *b)),
            _ => None,
        })
        .collect()
}

#[test]
fn heartbeat_runs_and_powers_off() {
    let (vm, rx) = boot(1, 128 << 20, "heartbeat period=1000 count=50");
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    assert_eq!(lines[0], GuestLine::Boot { mem_mib: 128 });
    let seqs: Vec<u64> = lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Heartbeat { cpu: 0, seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    assert_eq!(lines.last(), Some(&GuestLine::PowerOff { code: 0 }));
    assert_eq!(vm.state(), RunState::Shutdown);
}

#[test]
fn idle_runs_for_its_time() {
    let t = Instant::now();
    let (vm, rx) = boot(1, 64 << 20, "idle seconds=1");
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    assert!(lines.contains(&GuestLine::End { cpu: 0 }));
    let e = t.elapsed();
    assert!(e >= Duration::from_millis(900) && e < T, "idle took {e:?}");
}

#[test]
fn dirty_memory_matches_the_pattern_while_paused_and_at_the_end() {
    let (vm, rx) = boot(1, 256 << 20, "dirty size=32M rate=64M passes=4");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("D0 1")).unwrap();
    vm.pause().unwrap();
    let base = bases(&seen.iter().map(|l| parse_line(&l.1)).collect::<Vec<_>>())[0].1;
    let p = verify_dirty_region(&reader(&vm), base).expect("paused memory is exact");
    assert!(p.pass >= 2 || p.next > 0, "{p:?}");
    vm.resume().unwrap();
    let (exit, _) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    let p = verify_dirty_region(&reader(&vm), base).unwrap();
    assert_eq!((p.pass, p.next, p.completed), (4, 8192, 4));
}

#[test]
fn corrupting_guest_memory_is_detected() {
    let (vm, rx) = boot(1, 128 << 20, "dirty size=4M passes=1");
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    let base = bases(&lines)[0].1;
    verify_dirty_region(&reader(&vm), base).unwrap();
    vm.memory()
        .write_obj(0xdead_beefu64, GuestAddress(base + 10 * 4096 + 64))
        .unwrap();
    let e = verify_dirty_region(&reader(&vm), base).unwrap_err();
    assert!(e.to_string().contains("page 9"), "{e}");
}

#[test]
fn verify_workload_checks_its_memory() {
    let (vm, rx) = boot(1, 128 << 20, "verify size=16M count=3");
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    let v: Vec<_> = lines
        .iter()
        .filter(|l| matches!(l, GuestLine::Verify { .. }))
        .collect();
    assert_eq!(v.len(), 3);
    assert!(v
        .iter()
        .all(|l| matches!(l, GuestLine::Verify { ok: true, .. })));
}

#[test]
fn verify_workload_sees_memory_changed_behind_its_back() {
    let (vm, rx) = boot(1, 128 << 20, "verify size=4M count=0");
    let mut seen = Vec::new();
    let first = wait_for(&rx, &mut seen, T, |l| l.starts_with("V0 0 ok")).unwrap();
    let base = bases(&seen.iter().map(|l| parse_line(&l.1)).collect::<Vec<_>>())[0].1;
    drop(first);
    vm.pause().unwrap();
    let mut b = [0u8; 8];
    vm.memory()
        .read_slice(&mut b, GuestAddress(base + 4096))
        .unwrap();
    b[0] ^= 0x80;
    vm.memory()
        .write_slice(&b, GuestAddress(base + 4096))
        .unwrap();
    vm.resume().unwrap();
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 1 }, "{lines:?}");
    assert!(lines
        .iter()
        .any(|l| matches!(l, GuestLine::Verify { ok: false, .. })));
}

#[test]
fn four_vcpus_each_dirty_their_own_region() {
    let (vm, rx) = boot(4, 512 << 20, "dirty size=8M passes=3");
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    let b = bases(&lines);
    assert_eq!(b.len(), 4, "{lines:?}");
    let mut cpus: Vec<u32> = b.iter().map(|x| x.0).collect();
    cpus.sort();
    assert_eq!(cpus, vec![0, 1, 2, 3]);
    for (cpu, base) in b {
        let p = verify_dirty_region(&reader(&vm), base).unwrap();
        assert_eq!((p.cpu, p.pass, p.completed), (cpu as u64, 3, 3));
    }
}

#[test]
fn vcpus_run_different_workloads() {
    let (vm, rx) = boot(
        2,
        256 << 20,
        "heartbeat period=2000 count=20 ; dirty size=8M passes=2",
    );
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 0 });
    assert!(lines.contains(&GuestLine::DirtyPass { cpu: 1, pass: 2 }));
    assert!(lines.iter().any(|l| matches!(
        l,
        GuestLine::Heartbeat {
            cpu: 0,
            seq: 20,
            ..
        }
    )));
}

#[test]
fn pause_and_resume_keep_the_heartbeat_continuous() {
    let (vm, rx) = boot(2, 128 << 20, "heartbeat period=2000 count=0");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("H0 20 ")).unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        vm.pause().unwrap();
        let pause_latency = t.elapsed();
        assert!(
            pause_latency < Duration::from_millis(500),
            "pause took {pause_latency:?}"
        );
        assert_eq!(vm.state(), RunState::Paused);
        // Nothing may come out of a paused guest.
        std::thread::sleep(Duration::from_millis(30));
        let quiet: Vec<_> = rx.try_iter().collect();
        seen.extend(quiet);
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "output while paused");
        vm.resume().unwrap();
        let last = seen.last().unwrap().1.clone();
        let n: u64 = last.split(' ').nth(1).unwrap().parse().unwrap();
        let want = format!("H0 {} ", n + 10);
        wait_for(&rx, &mut seen, T, |l| l.starts_with(&want)).unwrap();
    }
    vm.shutdown().unwrap();
    assert_eq!(vm.wait(), GuestExit::Stopped);
    seen.extend(rx.try_iter());
    let mut log = HeartbeatLog::default();
    for (at, l) in &seen {
        if let GuestLine::Heartbeat { cpu: 0, seq, tsc } = parse_line(l) {
            log.push(*at, seq, tsc);
        }
    }
    log.check_continuous()
        .expect("no heartbeat lost or repeated across pauses");
    let (gap, _) = log.max_gap().unwrap();
    assert!(
        gap >= Duration::from_millis(200),
        "a pause must show as a gap: {gap:?}"
    );
}

#[test]
fn state_changes_are_checked() {
    let (vm, _rx) = boot(1, 64 << 20, "idle");
    assert!(vm.resume().is_err(), "resume of a running VM");
    vm.pause().unwrap();
    assert!(vm.pause().is_err(), "pause of a paused VM");
    vm.shutdown().unwrap();
    assert_eq!(vm.wait(), GuestExit::Stopped);
    assert!(vm.pause().is_err());
    assert!(vm.start().is_err());
}

#[test]
fn guest_errors_power_off_with_a_code() {
    let (vm, rx) = boot(1, 64 << 20, "dirty speed=9");
    let (exit, lines) = lines_until_exit(&vm, &rx);
    assert_eq!(exit, GuestExit::PowerOff { code: 2 });
    assert!(lines.iter().any(
        |l| matches!(l, GuestLine::Error { message } if message.contains("unknown argument"))
    ));
}

#[test]
fn dirty_log_merges_guest_and_vmm_writes_and_clears() {
    let (vm, rx) = boot(1, 256 << 20, "dirty size=4M passes=0");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("S0 dirty")).unwrap();
    let base = bases(&seen.iter().map(|l| parse_line(&l.1)).collect::<Vec<_>>())[0].1;
    vm.start_dirty_log().unwrap();
    // A pass-end line may already be in flight: the pass after the next one lies wholly
    // inside the logged interval.
    seen.extend(rx.try_iter());
    for _ in 0..3 {
        wait_for(&rx, &mut seen, T, |l| l.starts_with("D0 ")).unwrap();
    }
    vm.pause().unwrap();
    // A VMM write somewhere the guest never touches.
    let far = 200u64 << 20;
    vm.memory().write_obj(7u64, GuestAddress(far)).unwrap();
    let d = vm.fetch_dirty().unwrap();
    let region = (base..base + 1025 * 4096).step_by(4096);
    let dirty_in_region = region.clone().filter(|&a| d.contains(a)).count();
    assert_eq!(dirty_in_region, 1025, "every page of a full pass is dirty");
    assert!(d.contains(far), "VMM write is reported");
    assert!(!d.contains(150 << 20), "untouched page is clean");
    // Paused: nothing new, so nothing may be reported twice.
    let again = vm.fetch_dirty().unwrap();
    assert_eq!(again.count(), 0, "after a clear, no page is reported again");
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    let later = vm.fetch_dirty().unwrap();
    assert!(later.count() > 0 && !later.contains(far));
    vm.stop_dirty_log().unwrap();
    vm.shutdown().unwrap();
    vm.wait();
}
