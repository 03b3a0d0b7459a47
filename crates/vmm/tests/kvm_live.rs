//! Live migration between two VMs in one process over loopback TCP, on real KVM with the test
//! guest: destination memory page-exact against the guest's pattern, heartbeat continuous
//! across hosts, and rollback when the destination dies.
mod common;
use common::live::*;
use common::*;
use ferry_guest::console::{wait_all, wait_for, TimedLine};
use ferry_guest::heartbeat::HeartbeatLog;
use ferry_guest::verify::verify_dirty_region;
use ferry_migration::engine::{EngineError, Options};
use ferry_vmm::{GuestExit, RunState};
use std::time::Duration;

/// CA and host certificates for a TLS migration between "src.test" and "dst.test".
fn tls_pair(
    tag: &str,
) -> (
    Dir,
    ferry_migration::tls::TlsServer,
    ferry_migration::tls::TlsClient,
) {
    use ferry_migration::{certs, tls};
    let d = scratch(tag);
    certs::init_ca(&d.0, 1).unwrap();
    for n in ["src.test", "dst.test"] {
        certs::issue(&d.0, n, 1).unwrap();
    }
    let files = |me: &str, peer: &str| {
        let (cert, key) = certs::host_paths(&d.0, me);
        tls::TlsFiles {
            cert,
            key,
            ca: certs::ca_paths(&d.0).0,
            peers: vec![peer.into()],
        }
    };
    let s = tls::TlsServer::new(&files("dst.test", "src.test")).unwrap();
    let c = tls::TlsClient::new(&files("src.test", "dst.test")).unwrap();
    (d, s, c)
}

#[test]
fn a_tls_migration_of_a_writing_guest_is_page_exact() {
    let (_d, server, client) = tls_pair("tls");
    let (src, rx, mut seen, base) = boot_dirtying(2, 512 << 20, "dirty size=64M rate=50M hb=2000");
    let (addr, dest) = destination_with(None, Some(std::sync::Arc::new(server)));
    let opts = Options {
        connections: 2,
        ..Options::default()
    };
    let report = send_vm_with(&src, addr, &opts, Some(&client)).expect("TLS migration");
    assert!(report.passes.len() >= 2, "{report:?}");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("D0 ")).unwrap();
    stop_exact_and_continuous(vm, &rx2, after, &seen, base);
}

#[test]
fn a_dirtying_vm_moves_with_exact_memory_and_a_continuous_heartbeat() {
    let (src, rx, mut seen, base) = boot_dirtying(1, 512 << 20, "dirty size=128M rate=50M hb=2000");
    let (addr, dest) = destination(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(20),
        ..Options::default()
    };
    let report = send_vm(&src, addr, &opts).expect("migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    assert_eq!(vm.state(), RunState::Running);
    assert!(report.passes.len() >= 2, "{report:?}");
    let mut after = Vec::new();
    let p0 = ferry_guest::verify::dirty_position(&reader(&src), base).unwrap();
    wait_all(&rx2, &mut after, T, &[format!("D0 {}", p0.pass)]).unwrap();
    vm.pause().unwrap();
    let p = verify_dirty_region(&reader(&vm), base).expect("destination memory is exact");
    assert!(
        p.pass > p0.pass || p.next > p0.next,
        "the guest moved on: {p:?} after {p0:?}"
    );
    vm.resume().unwrap();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("H0 ")).unwrap();
    vm.shutdown().unwrap();
    assert_eq!(vm.wait(), GuestExit::Stopped);
    after.extend(rx2.try_iter());
    let mut log = HeartbeatLog::default();
    beats(&mut log, &seen);
    beats(&mut log, &after);
    log.check_continuous()
        .expect("no heartbeat lost or repeated across hosts");
    // The pause the guest saw at switch-over: last beat on the source to the first on the
    // destination (the test's own pause for verifying comes later and is not counted).
    let last = last_beat(&seen, 0);
    let gap = log
        .beats
        .windows(2)
        .find(|w| w[0].seq == last)
        .map(|w| w[1].at.duration_since(w[0].at))
        .expect("beats on both sides");
    assert!(gap < Duration::from_secs(2), "switch-over gap {gap:?}");
    eprintln!(
        "live migration: {} passes, {:.1} MiB, downtime {:.2} ms (predicted {:.2}), guest-observed gap {:?}",
        report.passes.len(),
        report.wire_bytes as f64 / 1048576.0,
        report.downtime_ms,
        report.predicted_downtime_ms,
        gap
    );
}

/// The destination dies at a given frame (or the stream is damaged): the source keeps
/// running, unthrottled and without dirty logging, with its memory exact, and nothing runs on
/// the destination.
fn destination_dies(hook: Hook, opts: Options) -> (EngineError, EngineError) {
    let (src, rx, mut seen, base) = boot_dirtying(1, 256 << 20, "dirty size=64M rate=30M hb=2000");
    let (addr, dest) = destination(Some(hook));
    let t = std::time::Instant::now();
    let e = send_vm(&src, addr, &opts).unwrap_err();
    // Noticed through the control connection, not after a 30 s socket timeout.
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "{:?}: {e}",
        t.elapsed()
    );
    assert!(!matches!(e, EngineError::InDoubt(_)), "{e}");
    let (r, vm, _) = dest.join().unwrap();
    let de = r.unwrap_err();
    assert!(vm.is_none(), "nothing started on the destination");
    assert_eq!(src.state(), RunState::Running);
    assert!(!src.dirty_logging());
    assert_eq!(src.throttle(), 0);
    let pass = dirty_pass(&seen);
    wait_for(&rx, &mut seen, T, |l| l == format!("D0 {}", pass + 2)).unwrap();
    src.pause().unwrap();
    verify_dirty_region(&reader(&src), base).expect("source memory still exact");
    src.shutdown().unwrap();
    src.wait();
    (e, de)
}

#[test]
fn destination_killed_before_the_first_pass_ends() {
    let mut frames = 0;
    destination_dies(
        Box::new(move |conn, kind, _| {
            frames += (conn > 0 && kind == K_PAGES) as u32;
            frames < 40
        }),
        Options::default(),
    );
}

#[test]
fn destination_killed_between_passes() {
    let mut ends = 0;
    destination_dies(
        Box::new(move |_, kind, _| {
            ends += (kind == K_END_OF_PASS) as u32;
            ends < 4 // two data connections: after the second pass
        }),
        Options {
            connections: 2,
            downtime_limit: Duration::ZERO,
            max_passes: 6,
            ..Options::default()
        },
    );
}

#[test]
fn a_flipped_byte_in_a_page_frame_is_refused_and_nothing_resumes() {
    let mut n = 0;
    let (e, de) = destination_dies(
        Box::new(move |conn, kind, frame| {
            n += (conn > 0 && kind == K_PAGES) as u32;
            if n == 10 && kind == K_PAGES {
                let at = frame.len() / 2;
                frame[at] ^= 0x01;
            }
            true
        }),
        Options {
            connections: 2,
            ..Options::default()
        },
    );
    assert!(
        de.to_string().contains("CRC mismatch in a Pages frame"),
        "{de}"
    );
    assert!(
        e.to_string().contains("CRC mismatch"),
        "the source hears why: {e}"
    );
}

#[test]
fn a_truncated_stream_is_refused_and_nothing_resumes() {
    let mut n = 0;
    let (e, de) = destination_dies(
        Box::new(move |conn, kind, frame| {
            n += (conn == 1 && kind == K_PAGES) as u32;
            if n == 5 {
                // Half a frame, then the connection ends.
                frame.truncate(frame.len() / 2);
                return false;
            }
            true
        }),
        Options::default(),
    );
    assert!(matches!(de, EngineError::Protocol(_)), "{de}");
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
}

#[test]
fn destination_killed_during_switch_over() {
    destination_dies(
        Box::new(|conn, kind, _| !(conn == 0 && kind == K_STATE)),
        Options::default(),
    );
}

#[test]
fn destination_killed_at_a_post_copy_switch_over_rolls_back() {
    // The list of pages post-copy will fetch is on its way: nothing has committed, so the
    // pre-copy guarantee holds: the source runs on, exact.
    let opts = Options {
        postcopy_after: Some(1),
        ..Options::default()
    };
    destination_dies(
        Box::new(|conn, kind, _| !(conn == 0 && kind == K_MISSING)),
        opts,
    );
}

#[test]
fn ten_migrations_in_a_row_keep_memory_and_heartbeat() {
    let (mut vm, rx) = boot(1, 256 << 20, "dirty size=16M rate=20M hb=2000");
    let mut consoles = vec![rx];
    let mut seen = Vec::new();
    wait_for(&consoles[0], &mut seen, T, |l| l == "D0 1").unwrap();
    let base = bases(&seen)[0];
    let mut all: Vec<TimedLine> = seen;
    for round in 0..10 {
        let (addr, dest) = destination(None);
        send_vm(&vm, addr, &Options::default())
            .unwrap_or_else(|e| panic!("migration {round}: {e}"));
        vm.shutdown_after_handoff().unwrap();
        vm.wait();
        all.extend(consoles.last().unwrap().try_iter());
        let (r, next, rx) = dest.join().unwrap();
        r.unwrap();
        vm = next.expect("destination VM");
        consoles.push(rx);
        let mut seen = Vec::new();
        wait_for(consoles.last().unwrap(), &mut seen, T, |l| {
            l.starts_with("H0 ")
        })
        .unwrap();
        all.extend(seen);
    }
    vm.pause().unwrap();
    verify_dirty_region(&reader(&vm), base).expect("memory exact after ten moves");
    vm.shutdown().unwrap();
    vm.wait();
    all.extend(consoles.last().unwrap().try_iter());
    let mut log = HeartbeatLog::default();
    beats(&mut log, &all);
    log.check_continuous()
        .expect("no heartbeat lost or repeated over ten moves");
}

#[test]
fn four_vcpus_each_dirtying_move_over_four_connections_with_zstd() {
    let work = "dirty size=32M rate=20M hb=5000 ; dirty size=32M rate=20M ; \
                dirty size=32M rate=20M ; dirty size=32M rate=20M";
    let (src, rx) = boot(4, 512 << 20, work);
    let mut seen = Vec::new();
    wait_all(
        &rx,
        &mut seen,
        T,
        &["D0 1", "D1 1", "D2 1", "D3 1"].map(String::from),
    )
    .unwrap();
    let b = bases(&seen);
    assert_eq!(b.len(), 4);
    let (addr, dest) = destination(None);
    let opts = Options {
        connections: 4,
        compression: ferry_migration::protocol::Compression::Zstd,
        ..Options::default()
    };
    let rep = send_vm(&src, addr, &opts).expect("migration");
    assert_eq!(rep.connections, 4);
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    let mut after: Vec<TimedLine> = Vec::new();
    for c in 0..4 {
        let p = format!("D{c} ");
        if !after.iter().any(|l| l.1.starts_with(&p)) {
            wait_for(&rx2, &mut after, T, |l| l.starts_with(&p)).unwrap();
        }
    }
    vm.pause().unwrap();
    for base in b {
        verify_dirty_region(&reader(&vm), base).expect("every vCPU's region exact");
    }
    vm.shutdown().unwrap();
    vm.wait();
}

#[test]
fn auto_converge_moves_a_writer_faster_than_the_link() {
    // The guest rewrites 48 MiB at up to 400 MB/s; the link is capped at 40 MB/s. Without
    // throttling this could never fit 30 ms; auto-converge slows the vCPU until it does.
    let (src, rx, mut seen, base) = boot_dirtying(1, 256 << 20, "dirty size=48M rate=400M hb=2000");
    let (addr, dest) = destination(None);
    let opts = Options {
        max_bandwidth: Some(40_000_000),
        auto_converge: true,
        max_passes: 0,
        timeout: Some(Duration::from_secs(120)),
        ..Options::default()
    };
    let rep = send_vm(&src, addr, &opts).expect("migration");
    assert_eq!(rep.switch_reason, "converged", "{rep:?}");
    assert!(rep.max_throttle_percent >= 20, "{rep:?}");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    assert_eq!(vm.throttle(), 0, "the destination runs at full speed");
    let mut after = Vec::new();
    let pass = dirty_pass(&seen);
    wait_for(&rx2, &mut after, T, |l| l == format!("D0 {}", pass + 2)).unwrap();
    stop_exact_and_continuous(vm, &rx2, after, &seen, base);
    eprintln!(
        "auto-converge: {} passes, throttle up to {} %, downtime {:.1} ms",
        rep.passes.len(),
        rep.max_throttle_percent,
        rep.downtime_ms
    );
}

#[test]
fn an_idle_vm_moves_with_only_what_it_touched() {
    // 1 GiB configured; vCPU 0 beats, vCPU 1 keeps checking 32 MiB of its own memory.
    let (src, rx) = boot(2, 1 << 30, "heartbeat period=2000 ; verify size=32M hb=0");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("V1 1 ")).unwrap();
    let (addr, dest) = destination(None);
    let rep = send_vm(&src, addr, &Options::default()).expect("migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    // Only populated pages travel: 32 MiB and the guest's own pages, not 1 GiB.
    let sent: u64 = rep.passes.iter().map(|p| p.pages).sum();
    assert!(sent < 16384, "{sent} pages sent for an idle VM");
    let mut after = Vec::new();
    let n = seen.iter().filter(|l| l.1.starts_with("V1 ")).count();
    wait_for(&rx2, &mut after, T, |l| {
        l.starts_with(&format!("V1 {} ", n + 1))
    })
    .unwrap();
    vm.shutdown().unwrap();
    vm.wait();
    after.extend(rx2.try_iter());
    assert!(
        !seen.iter().chain(&after).any(|l| l.1.contains("BAD")),
        "the guest's memory check failed"
    );
    let mut log = HeartbeatLog::default();
    beats(&mut log, &seen);
    beats(&mut log, &after);
    log.check_continuous().expect("heartbeat continuous");
}

#[test]
fn a_gib_rewritten_at_two_rates_arrives_exact() {
    for rate in ["400M", "100M"] {
        let work = format!("dirty size=1G rate={rate} hb=2000");
        // Once the whole GiB has been written: every later pass rewrites it at `rate`.
        let (src, rx, mut seen, base) = boot_dirtying(1, 3 << 29, &work);
        let (addr, dest) = destination(None);
        let opts = Options {
            connections: 2,
            ..Options::default()
        };
        let rep = send_vm(&src, addr, &opts).expect("migration");
        assert!(
            rep.passes[0].pages >= 262144,
            "{rate}: the first pass carries the GiB"
        );
        let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
        let mut after = Vec::new();
        wait_for(&rx2, &mut after, T, |l| l.starts_with("H0 ")).unwrap();
        stop_exact_and_continuous(vm, &rx2, after, &seen, base);
        eprintln!(
            "1 GiB at {rate}: {} passes, downtime {:.2} ms, total {:.0} ms",
            rep.passes.len(),
            rep.downtime_ms,
            rep.total_ms
        );
    }
}
