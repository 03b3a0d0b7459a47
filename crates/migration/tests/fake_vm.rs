//! The engine against an in-memory fake VM over real loopback TCP: a "guest" that dirties
//! pages deterministically between passes, destination memory compared page by page, and
//! faults: the destination dying, a stream corrupted or cut (control or data connection), a
//! version mismatch, cancel and timeout.
mod fake;
use fake::*;
use ferry_migration::engine::{CopyPriority, EngineError, Monitor, Options, Phase, TimeoutPolicy};
use ferry_migration::protocol::{send, Compression, Hello, Message, ProtocolError, MAGIC};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

#[test]
fn converging_guest_arrives_page_exact() {
    let src = FakeSource::new(4096, 64);
    let p = pair(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(5),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert!(dst.resumed.load(Ordering::SeqCst));
    assert!(
        src.paused.load(Ordering::SeqCst),
        "the source stays paused after commit"
    );
    assert_exact(&src, &dst);
    assert!(rep.passes.len() >= 2, "{rep:?}");
    assert!(
        rep.passes[0].zero_pages > 2000,
        "zero pages are not sent as data"
    );
    assert!(rep.saved_bytes > 2000 * 4096);
    assert!(rep.downtime_ms > 0.0 && rep.total_ms >= rep.downtime_ms);
    assert_eq!(rep.switch_reason, "converged");
}

#[test]
fn four_connections_with_each_compression_arrive_page_exact() {
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let src = FakeSource::new(8192, 700);
        let p = pair(None);
        let opts = Options {
            downtime_limit: Duration::ZERO,
            max_passes: 6,
            connections: 4,
            compression,
            ..Options::default()
        };
        let rep = p.migrate(&src, &opts).unwrap();
        let (dst, r) = p.join();
        r.unwrap();
        assert_exact(&src, &dst);
        assert_eq!(rep.connections, 4);
        assert_eq!(rep.passes.len(), 7);
        if compression != Compression::None {
            // The fake's pages are regular: compression must save most of each page.
            assert!(
                rep.saved_bytes > rep.passes.iter().map(|p| p.pages).sum::<u64>() * 2048,
                "{compression:?}: {rep:?}"
            );
        }
    }
}

#[test]
fn low_copy_priority_puts_the_senders_behind_the_vcpus() {
    for (priority, want) in [(CopyPriority::Normal, nice()), (CopyPriority::Low, 19)] {
        let src = FakeSource::new(1024, 16);
        let p = pair(None);
        let opts = Options {
            copy_priority: priority,
            ..Options::default()
        };
        p.migrate(&src, &opts).unwrap();
        let (dst, r) = p.join();
        r.unwrap();
        assert_exact(&src, &dst);
        assert_eq!(src.reader_nice.load(Ordering::SeqCst), want, "{priority:?}");
    }
}

#[test]
fn manual_protection_rearms_every_page_before_reading_it() {
    // The fake's guest writes a page of each re-armed group just before its dirty bit is
    // cleared: only an engine that re-arms before it reads sends that write.
    for connections in [1, 3] {
        let src = FakeSource::new_manual(8192, 300);
        let p = pair(None);
        let opts = Options {
            downtime_limit: Duration::ZERO,
            max_passes: 5,
            connections,
            ..Options::default()
        };
        let rep = p.migrate(&src, &opts).unwrap();
        let (dst, r) = p.join();
        r.unwrap();
        assert_exact(&src, &dst);
        assert_eq!(rep.passes.len(), 6, "{rep:?}");
        assert!(src.rearmed.load(Ordering::SeqCst) >= 8192 / 512);
        // Each live pass sends what the guest wrote during the one before, not all memory.
        assert!(rep.passes[2].pages < 2000, "{:?}", rep.passes[2]);
    }
}

#[test]
fn a_guest_that_never_converges_is_switched_over_after_the_pass_limit() {
    let src = FakeSource::new(2048, 1500);
    let p = pair(None);
    let opts = Options {
        downtime_limit: Duration::ZERO,
        max_passes: 4,
        compression: Compression::Lz4,
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    assert_eq!(rep.passes.len(), 5, "4 live passes and the final one");
    assert_eq!(rep.switch_reason, "max passes");
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn auto_converge_throttles_a_writer_faster_than_the_link_until_it_fits() {
    // Each pass the guest rewrites 1900 of 2048 pages: without throttling this never fits a
    // 1 ms downtime; auto-converge raises the throttle until the dirty set is small.
    let src = FakeSource::new(2048, 1900);
    let p = pair(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(1),
        max_passes: 0,
        auto_converge: true,
        timeout: Some(Duration::from_secs(60)),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    assert_eq!(rep.switch_reason, "converged", "{rep:?}");
    assert!(rep.max_throttle_percent >= 40, "{rep:?}");
    let steps: Vec<u8> = rep.passes.iter().map(|p| p.throttle_percent).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(src.throttle.load(Ordering::SeqCst), 0, "unthrottled after");
}

#[test]
fn bandwidth_cap_is_respected() {
    let src = FakeSource::new(1024, 0);
    let p = pair(None);
    let opts = Options {
        max_bandwidth: Some(8 << 20),
        connections: 2,
        ..Options::default()
    };
    let t = std::time::Instant::now();
    p.migrate(&src, &opts).unwrap();
    p.join().1.unwrap();
    // ~342 data pages of 4 KiB at 8 MiB/s, whatever the connection count: at least ~0.15 s.
    assert!(
        t.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn cancel_rolls_back_and_progress_is_visible() {
    let src = FakeSource::new(8192, 0);
    let p = pair(None);
    let opts = Options {
        max_bandwidth: Some(4 << 20),
        connections: 2,
        ..Options::default()
    };
    let mon = Monitor::default();
    let e = thread::scope(|s| {
        let h = s.spawn(|| p.migrate_with(&src, &opts, &mon));
        thread::sleep(Duration::from_millis(300));
        let st = mon.status();
        assert_eq!(st.phase, Phase::PreCopy);
        assert_eq!((st.pass, st.pass_pages), (1, 8192));
        assert!(st.pass_sent > 0 && st.pass_sent < 8192, "{st:?}");
        assert!(st.wire_bytes > 0);
        // The running pass's own rate (capped at 4 MiB/s) and what is left of it.
        assert!(
            st.bandwidth_bytes_per_s > 1e6 && st.bandwidth_bytes_per_s < 8e6,
            "{st:?}"
        );
        assert!(st.eta_ms > 0.0, "{st:?}");
        mon.cancel();
        h.join().unwrap().unwrap_err()
    });
    assert!(matches!(e, EngineError::Cancelled), "{e}");
    assert_eq!(mon.status().phase, Phase::Cancelled);
    let de = assert_rolled_back(&src, p);
    assert!(de.to_string().contains("cancelled"), "{de}");
}

#[test]
fn timeout_cancels_or_switches_over_by_policy() {
    for policy in [TimeoutPolicy::Cancel, TimeoutPolicy::SwitchOver] {
        let src = FakeSource::new(8192, 0);
        let p = pair(None);
        let opts = Options {
            max_bandwidth: Some(8 << 20),
            timeout: Some(Duration::from_millis(200)),
            on_timeout: policy,
            ..Options::default()
        };
        let r = p.migrate(&src, &opts);
        match policy {
            TimeoutPolicy::Cancel => {
                assert!(matches!(r, Err(EngineError::Timeout(_))), "{r:?}");
                assert_rolled_back(&src, p);
            }
            TimeoutPolicy::SwitchOver => {
                let rep = r.unwrap();
                assert_eq!(rep.switch_reason, "timeout");
                assert_eq!(rep.passes.len(), 2, "the cut pass, then the final one");
                assert!(rep.passes[1].pages > 0, "the final pass carried the rest");
                let (dst, r) = p.join();
                r.unwrap();
                assert_exact(&src, &dst);
            }
        }
    }
}

#[test]
fn destination_dying_mid_stream_leaves_the_source_running() {
    let src = FakeSource::new(4096, 64);
    let p = pair(Some(Box::new(|conn, seen, _| {
        (conn == 0 || seen < 2 << 20).into()
    })));
    let e = p.migrate(&src, &Options::default()).unwrap_err();
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
    assert_rolled_back(&src, p);
}

#[test]
fn a_flipped_byte_on_any_connection_is_caught_and_nothing_resumes() {
    for victim in [1usize, 3] {
        let src = FakeSource::new(4096, 16);
        let p = pair(Some(Box::new(move |conn, seen, chunk: &mut Vec<u8>| {
            // Just past the Join frame (28 bytes) and the next frame's header: inside the
            // first payload this connection carries, however few pages it got.
            let target = 50u64;
            if conn == victim && seen <= target && target < seen + chunk.len() as u64 {
                chunk[(target - seen) as usize] ^= 0x20;
            }
            Flow::Go
        })));
        let opts = Options {
            connections: 3,
            ..Options::default()
        };
        let e = p.migrate(&src, &opts).unwrap_err();
        let de = assert_rolled_back(&src, p);
        // A connection may carry no page at all (the others took every chunk): then the
        // flip lands in a frame header, whose reserved bytes must be zero.
        assert!(
            matches!(
                de,
                EngineError::Protocol(ProtocolError::Crc(_) | ProtocolError::Malformed { .. })
            ),
            "{de}"
        );
        // The source hears the destination's reason.
        assert!(
            e.to_string().contains("CRC") || e.to_string().contains("malformed"),
            "{e}"
        );
    }
}

#[test]
fn a_cut_at_switch_over_rolls_back() {
    // Cut the control connection where the State frame starts: the source had paused; it
    // resumes.
    let src = FakeSource::new(256, 4);
    let p = pair(Some(Box::new(move |conn, _, chunk: &mut Vec<u8>| {
        // The state frame is the only one holding "state v".
        if let Some(i) = chunk.windows(7).position(|w| w == b"state v") {
            assert_eq!(conn, 0);
            chunk.truncate(i);
            return Flow::Cut;
        }
        Flow::Go
    })));
    let e = p.migrate(&src, &Options::default()).unwrap_err();
    assert!(!matches!(e, EngineError::InDoubt(_)), "{e}");
    assert_eq!(
        src.pauses.load(Ordering::SeqCst),
        1,
        "it did pause for switch-over"
    );
    assert_rolled_back(&src, p);
}

#[test]
fn a_stray_connection_does_not_join_the_migration() {
    let src = FakeSource::new(512, 8);
    let p = pair(None);
    // A port probe before the data connections: accepted, not a Join, closed.
    drop(TcpStream::connect(p.addr).unwrap());
    let rep = p
        .migrate(
            &src,
            &Options {
                connections: 2,
                ..Options::default()
            },
        )
        .unwrap();
    assert_eq!(rep.connections, 2);
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn version_mismatch_is_a_clear_error_and_the_receiver_goes_on() {
    let mut p = pair(None);
    send(
        &mut p.ctl,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: ferry_migration::protocol::VERSION + 1,
            caps: 0,
            session: 1,
            connections: 1,
            config: vec![],
        }),
    )
    .unwrap();
    // The source side hears why.
    match ferry_migration::protocol::recv(&mut p.ctl) {
        Ok(Message::Abort(why)) => assert!(
            why.contains(&format!(
                "peer speaks migration protocol version {}, this Ferry speaks {}",
                ferry_migration::protocol::VERSION + 1,
                ferry_migration::protocol::VERSION
            )),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    // The receiver was not knocked over: a real migration follows.
    p.ctl = p.connect().unwrap();
    let src = FakeSource::new(256, 4);
    p.migrate(&src, &Options::default()).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}
