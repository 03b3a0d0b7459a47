//! Post-copy and hybrid live migration on real KVM with the test guest: the destination runs
//! the VM while its missing pages come by demand (userfaultfd) and background push; memory
//! page-exact against the guest's pattern and the heartbeat continuous across hosts, also
//! when the link is cut in the middle of the post-copy.
mod common;
use common::live::*;
use common::*;
use ferry_guest::console::wait_for;
use ferry_migration::engine::{Options, PostCopyReport, Report};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Boots a dirtying VM, migrates it with `opts` (through `hook` if given), and checks the
/// destination: page-exact region, continuous heartbeat, the guest still writing.
fn move_and_check(memory: u64, work: &str, opts: &Options, hook: Option<Hook>) -> Report {
    let (src, rx, mut seen, base) = boot_dirtying(1, memory, work);
    let (addr, dest) = destination(hook);
    let rep = send_vm(&src, addr, opts).expect("migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    let mut after = Vec::new();
    // The guest goes on writing on the destination: a full pass more, then a heartbeat.
    let pass = dirty_pass(&seen);
    wait_for(&rx2, &mut after, Duration::from_secs(120), |l| {
        l == format!("D0 {}", pass + 1)
    })
    .unwrap();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("H0 ")).unwrap();
    stop_exact_and_continuous(vm, &rx2, after, &seen, base);
    rep
}

fn show(what: &str, rep: &Report) -> PostCopyReport {
    let pc = rep
        .postcopy
        .clone()
        .expect("the migration went by post-copy");
    let d = &pc.destination;
    eprintln!(
        "{what}: {} pre-copy passes, downtime {:.2} ms, released after {:.0} ms; {} pages \
         missing at switch-over, {} pushed, {} pulled, {} faults (p50 {} us, p99 {} us), {} \
         zero-filled, {} recoveries",
        rep.passes.len() - 1,
        rep.downtime_ms,
        pc.released_ms,
        pc.pages,
        d.pushed,
        d.pulled,
        d.faults,
        d.latency_p50_us,
        d.latency_p99_us,
        d.zero_faults,
        pc.recoveries
    );
    assert_eq!(
        d.pushed + d.pulled,
        pc.pages,
        "every missing page arrived once"
    );
    pc
}

#[test]
fn a_gib_dirtying_vm_moves_by_post_copy_and_by_hybrid() {
    let work = "dirty size=1G rate=200M hb=2000";
    // Post-copy at once: no page before the switch; the writing guest faults on what the
    // push has not reached yet.
    let opts = Options {
        postcopy_after: Some(0),
        connections: 2,
        ..Options::default()
    };
    let rep = move_and_check(3 << 29, work, &opts, None);
    let pc = show("post-copy at once", &rep);
    assert_eq!(rep.switch_reason, "post-copy requested");
    assert!(pc.pages >= 262144, "the whole GiB came after the switch");
    assert!(pc.destination.faults > 0, "the guest waited for some pages");
    // Hybrid: two pre-copy passes, then post-copy for what they left dirty.
    let opts = Options {
        postcopy_after: Some(2),
        downtime_limit: Duration::from_micros(1),
        ..Options::default()
    };
    let rep = move_and_check(3 << 29, work, &opts, None);
    let pc = show("hybrid after 2 passes", &rep);
    assert_eq!(rep.passes.len(), 3, "two passes and the switch-over");
    assert!(pc.pages > 0 && pc.pages < 262144, "{pc:?}");
}

#[test]
fn a_writer_faster_than_the_link_completes_by_automatic_post_copy() {
    // 200 MB/s of writes over a 40 MB/s link: pre-copy can never catch up.
    let opts = Options {
        max_bandwidth: Some(40 << 20),
        auto_postcopy: true,
        ..Options::default()
    };
    let rep = move_and_check(256 << 20, "dirty size=96M rate=200M hb=2000", &opts, None);
    show("automatic post-copy", &rep);
    assert_eq!(rep.switch_reason, "not converging");
    assert!(rep.passes.len() <= 3, "{} passes", rep.passes.len());
}

#[test]
fn a_link_cut_in_the_middle_of_post_copy_is_recovered_with_exact_memory() {
    // After the state has gone (post-copy has begun), every connection is killed once the
    // push has carried 30 frames; the source reconnects by itself.
    let (state_seen, frames, cut) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let c = cut.clone();
    let hook: Hook = Box::new(move |conn, kind, _| {
        if conn == 0 && kind == K_STATE {
            state_seen.store(true, Ordering::SeqCst);
        }
        if conn > 0 && kind == K_PAGES && state_seen.load(Ordering::SeqCst) {
            let n = frames.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 30 {
                c.store(true, Ordering::SeqCst);
                return false;
            }
        }
        true
    });
    let opts = Options {
        postcopy_after: Some(0),
        max_bandwidth: Some(64 << 20),
        ..Options::default()
    };
    let rep = move_and_check(
        256 << 20,
        "dirty size=128M rate=100M hb=2000",
        &opts,
        Some(hook),
    );
    assert!(cut.load(Ordering::SeqCst), "the link was cut");
    let pc = show("post-copy with the link cut", &rep);
    assert!(pc.recoveries >= 1, "{pc:?}");
}

#[test]
fn four_vcpus_fault_at_once_while_four_connections_push_with_zstd() {
    // Every vCPU rewrites a region of its own: after the switch all four fault on pages the
    // push (compressed, over four connections, capped so it takes a while) has not reached.
    let work = "dirty size=32M rate=40M hb=2000 ; dirty size=32M rate=40M ; \
                dirty size=32M rate=40M ; dirty size=32M rate=40M";
    let (src, rx) = boot(4, 512 << 20, work);
    let mut seen = Vec::new();
    let ready = ["D0 1", "D1 1", "D2 1", "D3 1"].map(String::from);
    ferry_guest::console::wait_all(&rx, &mut seen, T, &ready).unwrap();
    let b = bases(&seen);
    assert_eq!(b.len(), 4);
    let (addr, dest) = destination(None);
    let opts = Options {
        postcopy_after: Some(0),
        connections: 4,
        compression: ferry_migration::protocol::Compression::Zstd,
        max_bandwidth: Some(64 << 20),
        ..Options::default()
    };
    let rep = send_vm(&src, addr, &opts).expect("migration");
    let pc = show("4 vCPUs, post-copy at once", &rep);
    assert!(
        pc.destination.faults >= 4,
        "every vCPU waited for pages: {pc:?}"
    );
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    let mut after = Vec::new();
    for c in 0..4 {
        let p = format!("D{c} ");
        wait_for(&rx2, &mut after, T, |l| l.starts_with(&p)).unwrap();
    }
    vm.pause().unwrap();
    for base in b {
        ferry_guest::verify::verify_dirty_region(&reader(&vm), base)
            .expect("every vCPU's region exact");
    }
    vm.shutdown().unwrap();
    vm.wait();
}
