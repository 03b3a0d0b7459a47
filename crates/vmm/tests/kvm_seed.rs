//! Seeded migration on real KVM with the test guest (docs/seeding.md): a snapshot of the VM
//! taken earlier is the destination's seed; the guest writes on; the migration's first pass
//! sends only what differs from the seed, and the destination's memory is exact against the
//! guest's pattern. A corrupted seed's bad runs are sent again; a seed of another VM, or none,
//! is refused and the source runs on.
mod common;
use common::live::*;
use common::*;
use ferry_guest::console::{wait_for, LineSink, TimedLine};
use ferry_guest::verify::verify_dirty_region;
use ferry_migration::engine::{receive, Acceptor, EngineError, Limits, Options, Report};
use ferry_vmm::live::LiveDestination;
use ferry_vmm::seed::Seed;
use ferry_vmm::snapshot::SnapshotError;
use ferry_vmm::{RunState, Vm};
use std::sync::mpsc::Receiver;
use std::time::Duration;

const REGION_PAGES: u64 = (64 << 20) / 4096;

type SeededDest = std::thread::JoinHandle<(
    Result<u64, EngineError>,
    Option<Vm>,
    Receiver<TimedLine>,
    u64,
)>;

/// A destination on a thread holding `seed` (if any): the receive's outcome (the pages its
/// seed gave), the VM, its console, and the seed's runs that failed their CRC.
fn seeded_destination(seed: Option<Seed>) -> (std::net::SocketAddr, SeededDest) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acc = Acceptor::new(l, None, Limits::default()).unwrap();
    let h = std::thread::spawn(move || {
        let first = acc.next_hello(None).unwrap();
        let (sink, rx) = LineSink::new();
        let mut d = LiveDestination::new(Box::new(sink));
        if let Some(s) = seed {
            d = d.seed(s);
        }
        let r = receive(&mut d, first, &acc).map(|g| g.seed_pages);
        let bad = d.seed_bad_runs.load(std::sync::atomic::Ordering::Relaxed);
        (r, d.into_vm(), rx, bad)
    });
    (addr, h)
}

fn seeded() -> Options {
    Options {
        downtime_limit: Duration::from_millis(20),
        seeded: true,
        ..Options::default()
    }
}

/// Pauses `vm`, snapshots it into `dir` (the seed), resumes it.
fn take_seed(vm: &Vm, dir: &std::path::Path) {
    vm.pause().unwrap();
    vm.snapshot(dir, false).unwrap();
    vm.resume().unwrap();
}

/// The migrated VM's dirty region is exact; the guest moved on past where the source left it.
fn check_arrived(
    src: &Vm,
    rx: &Receiver<TimedLine>,
    seen: &mut Vec<TimedLine>,
    dest: SeededDest,
    base: u64,
) -> u64 {
    src.shutdown_after_handoff().unwrap();
    src.wait();
    seen.extend(rx.try_iter());
    let (r, vm, rx2, bad) = dest.join().unwrap();
    let seed_pages = r.expect("destination");
    let vm = vm.expect("destination VM");
    assert_eq!(vm.state(), RunState::Running);
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("H0 ")).unwrap();
    vm.pause().unwrap();
    verify_dirty_region(&reader(&vm), base).expect("destination memory exact");
    vm.shutdown().unwrap();
    vm.wait();
    eprintln!("the seed gave {seed_pages} pages; {bad} of its runs failed their CRC");
    bad
}

fn summary(r: &Report) -> String {
    let p1 = &r.passes[0];
    format!(
        "seed offered {} pages, {} matched; pass 1 sent {} pages ({} zero, {:.1} MiB); total {:.1} MiB in {} passes",
        r.seed_offered_pages,
        r.seeded_pages,
        p1.pages,
        p1.zero_pages,
        p1.wire_bytes as f64 / 1048576.0,
        r.wire_bytes as f64 / 1048576.0,
        r.passes.len()
    )
}

/// A seed taken while the guest runs (`Vm::snapshot_live`) is a point-in-time copy: restored,
/// its dirty region is exact against its own status page; the guest paused only for the last
/// round.
#[test]
fn a_live_seed_is_a_point_in_time_copy_taken_while_the_guest_runs() {
    let d = scratch("seed-live");
    let (src, rx, mut seen, base) = boot_dirtying(1, 512 << 20, "dirty size=64M rate=32M hb=2000");
    let before = last_beat(&seen, 0);
    let r = src.snapshot_live(&d.0, false).expect("live snapshot");
    eprintln!(
        "live seed: {} rounds {:?}, paused {:.1} ms for {} pages, {:.0} ms in all",
        r.rounds.len(),
        r.rounds.iter().map(|x| x.pages_stored).collect::<Vec<_>>(),
        r.paused_ms,
        r.paused_pages,
        r.elapsed_ms
    );
    assert!(r.rounds[0].pages_stored >= REGION_PAGES, "{r:?}");
    assert!(r.paused_pages < r.rounds[0].pages_stored / 4, "{r:?}");
    // The guest ran on during the copy.
    wait_for(&rx, &mut seen, T, |l| l.starts_with("H0 ")).unwrap();
    assert!(last_beat(&seen, 0) > before);
    assert_eq!(src.state(), RunState::Running);
    let (sink, _rx2) = LineSink::new();
    let (copy, _) = ferry_vmm::snapshot::restore(
        &d.0,
        Box::new(sink),
        ferry_vmm::snapshot::MemoryCheck::BeforeStart,
    )
    .expect("the seed restores");
    let p = verify_dirty_region(&reader(&copy), base).expect("the seed's memory is one instant's");
    eprintln!("restored seed at pass {} page {}", p.pass, p.next);
    drop(copy);
    src.shutdown().unwrap();
    src.wait();
}

/// The seed was made by this VM and its dirty log has run since: pass 1 sends what the log
/// says changed, no hashes cross. Then the same through a seed whose baseline this VM lost
/// (a snapshot taken elsewhere since, as a VMM restarted from an older snapshot would be):
/// the hashes decide. Both arrive exact.
#[test]
fn a_seeded_migration_sends_what_changed_since_the_seed_and_arrives_exact() {
    for by_log in [true, false] {
        let d = scratch(if by_log {
            "seed-exact-log"
        } else {
            "seed-exact-hash"
        });
        let (src, rx, mut seen, base) =
            boot_dirtying(1, 512 << 20, "dirty size=64M rate=16M hb=2000");
        src.snapshot_live(&d.0.join("seed"), false)
            .expect("a seed while the guest runs");
        if !by_log {
            take_seed(&src, &d.0.join("elsewhere"));
        }
        // The guest writes on: ~8 MiB (2048 pages) of its 64 MiB region in 0.5 s.
        std::thread::sleep(Duration::from_millis(500));
        let (addr, dest) = seeded_destination(Some(Seed::open(&d.0.join("seed")).unwrap()));
        let r = send_vm(&src, addr, &seeded()).expect("seeded migration");
        eprintln!(
            "{}{}",
            summary(&r),
            if r.seed_by_dirty_log {
                " (by the dirty log)"
            } else {
                ""
            }
        );
        let bad = check_arrived(&src, &rx, &mut seen, dest, base);
        assert_eq!(bad, 0);
        assert_eq!(r.seed_by_dirty_log, by_log, "{}", summary(&r));
        let p1 = &r.passes[0];
        if by_log {
            assert_eq!(r.seed_offered_pages, 0, "no hashes: {}", summary(&r));
        } else {
            assert!(
                r.seeded_pages > REGION_PAGES / 2,
                "most of the region was in the seed as it is: {}",
                summary(&r)
            );
        }
        assert!(
            p1.pages - p1.zero_pages < REGION_PAGES / 2,
            "pass 1 sent what changed, not the region: {}",
            summary(&r)
        );
    }
}

#[test]
fn a_corrupted_seed_is_sent_again_and_a_seed_of_another_vm_or_none_is_refused() {
    let d = scratch("seed-faults");
    let (other, _orx) = boot(1, 256 << 20, "dirty size=16M rate=16M");
    std::thread::sleep(Duration::from_millis(300));
    let other_seed = d.0.join("other");
    take_seed(&other, &other_seed);
    other.shutdown().unwrap();
    other.wait();
    let (src, rx, mut seen, base) = boot_dirtying(1, 512 << 20, "dirty size=64M rate=16M hb=2000");
    let mine = d.0.join("mine");
    take_seed(&src, &mine);
    // No seed at the destination, then another VM's: refused, the source runs on.
    for (seed, why) in [
        (None, "holds no seed"),
        (Some(Seed::open(&other_seed).unwrap()), "is of another VM"),
    ] {
        let (addr, dest) = seeded_destination(seed);
        let e = send_vm(&src, addr, &seeded()).expect_err("refused");
        assert!(e.to_string().contains(why), "{e}");
        let (r, vm, _, _) = dest.join().unwrap();
        assert!(r.is_err() && vm.is_none());
        assert_eq!(src.state(), RunState::Running, "the source runs on");
    }
    // Flipped bytes in the middle of the seed's memory file: those runs fail their CRC, are
    // not loaded, and their pages come over the network.
    let mem = mine.join("memory.bin");
    let mut bytes = std::fs::read(&mem).unwrap();
    let n = bytes.len();
    for at in [n / 3, n / 2, 2 * n / 3] {
        bytes[at] ^= 0x5a;
    }
    std::fs::write(&mem, &bytes).unwrap();
    // A seed missing its memory file is refused when opened.
    let gone = d.0.join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::copy(mine.join("snapshot.fsnap"), gone.join("snapshot.fsnap")).unwrap();
    assert!(Seed::open(&gone).is_err(), "a seed without memory.bin");
    let (addr, dest) = seeded_destination(Some(Seed::open(&mine).unwrap()));
    let r = send_vm(&src, addr, &seeded()).expect("seeded migration from a damaged seed");
    eprintln!("{}", summary(&r));
    let bad = check_arrived(&src, &rx, &mut seen, dest, base);
    assert_eq!(bad, 3, "three runs failed their CRC");
}

/// Progressive updates: a seed, then three updates while the guest writes on (each a diff of
/// what changed since the one before, taken as the guest runs); the directory holding them
/// moves as a whole (parents are relative), and a seeded migration from the last update's
/// chain sends only what changed since it. An update without a seed before it is refused.
#[test]
fn three_seed_updates_then_a_seeded_migration() {
    let d = scratch("seed-updates");
    let (src, rx, mut seen, base) = boot_dirtying(1, 512 << 20, "dirty size=64M rate=16M hb=2000");
    let e = src.snapshot_live(&d.0.join("u0"), true).unwrap_err();
    assert!(matches!(e, SnapshotError::NoParent), "{e}");
    let full = src.snapshot_live(&d.0.join("seed"), false).unwrap();
    for k in 1..=3 {
        std::thread::sleep(Duration::from_millis(300));
        let r = src.snapshot_live(&d.0.join(format!("u{k}")), true).unwrap();
        eprintln!(
            "update {k}: rounds {:?}, paused {:.1} ms for {} pages",
            r.rounds.iter().map(|x| x.pages_stored).collect::<Vec<_>>(),
            r.paused_ms,
            r.paused_pages
        );
        assert!(
            r.rounds[0].pages_stored < full.rounds[0].pages_stored / 2,
            "an update copies what changed: {r:?}"
        );
    }
    // "Shipped": the directory of seed and updates moves elsewhere as a whole.
    let shipped = scratch("seed-updates-shipped");
    std::fs::remove_dir(&shipped.0).unwrap();
    std::fs::rename(&d.0, &shipped.0).unwrap();
    let seed = Seed::open(&shipped.0.join("u3")).expect("the chain, from its new place");
    std::thread::sleep(Duration::from_millis(200));
    let (addr, dest) = seeded_destination(Some(seed));
    let r = send_vm(&src, addr, &seeded()).expect("seeded migration");
    eprintln!("{}", summary(&r));
    assert_eq!(check_arrived(&src, &rx, &mut seen, dest, base), 0);
    let p1 = &r.passes[0];
    assert!(
        p1.pages - p1.zero_pages < REGION_PAGES / 4,
        "pass 1 sent what changed since the last update: {}",
        summary(&r)
    );
}
