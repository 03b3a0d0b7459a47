//! No hangs: peers that stop reading (or sending) without closing, on each connection and in
//! each phase. Every case must end within a bound of the I/O timeout, the source running
//! again and nothing resumed on the destination.
mod fake;
use fake::*;
use ferry_migration::engine::{EngineError, Limits, Options};
use ferry_migration::protocol::{recv, send, Hello, Message, MAGIC, VERSION};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IO: Duration = Duration::from_secs(1);

fn limits() -> Limits {
    Limits {
        io_timeout: IO,
        ..Limits::default()
    }
}

fn opts(connections: u32) -> Options {
    Options {
        connections,
        io_timeout: IO,
        // Slow enough that every phase is still running when the stall hits.
        max_bandwidth: Some(16 << 20),
        ..Options::default()
    }
}

/// Runs a migration whose source→destination bytes go through `tamper`; returns the source's
/// and the destination's errors and how long the source took.
fn stalled(tamper: Tamper, connections: u32) -> (EngineError, EngineError, Duration) {
    // Four groups of 4096 pages: both connections carry some.
    let src = FakeSource::new(16384, 64);
    let p = pair_limits(Some(tamper), Default::default(), limits());
    let t = Instant::now();
    let e = p.migrate(&src, &opts(connections)).unwrap_err();
    let took = t.elapsed();
    let de = assert_rolled_back(&src, p);
    (e, de, took)
}

/// Stalls the first data connection to carry more than 1 MiB (the senders claim pages in
/// large groups, so which connection carries a given share is not fixed) and, when `cut`,
/// cuts another one past 2 MiB.
fn stall_one(cut: bool) -> Tamper {
    let stalled = std::sync::Mutex::new(None::<usize>);
    Box::new(move |conn, seen, _| {
        if conn == 0 {
            return Flow::Go;
        }
        let mut s = stalled.lock().unwrap();
        match *s {
            None if seen > 1 << 20 => {
                *s = Some(conn);
                Flow::Stall
            }
            Some(c) if cut && c != conn && seen > 2 << 20 => Flow::Cut,
            _ => Flow::Go,
        }
    })
}

#[test]
fn a_cut_connection_beside_one_nobody_reads_ends_the_migration_at_once() {
    // The reported hang: one data connection truncated, the other no longer read (open).
    let (e, de, took) = stalled(stall_one(true), 2);
    // Not the I/O timeout: the failed connection ends the migration.
    assert!(took < IO * 3, "took {took:?}: {e}");
    assert!(!e.committed(), "{e}");
    let _ = de;
}

#[test]
fn a_data_connection_nobody_reads_is_given_up_after_the_io_timeout() {
    let (e, de, took) = stalled(stall_one(false), 2);
    assert!(took < IO * 6, "took {took:?}");
    let all = format!("{e} / {de}");
    assert!(
        all.contains("no progress") || all.contains("nothing arrived"),
        "{all}"
    );
}

#[test]
fn a_control_connection_nobody_reads_fails_the_switch_over_before_commit() {
    // The control connection stops being read after the Hello: the destination never gets
    // the state; the source waits for Ready no longer than the I/O timeout.
    let (e, de, took) = stalled(
        Box::new(|conn, seen, _| {
            if conn == 0 && seen > 0 {
                Flow::Stall
            } else {
                Flow::Go
            }
        }),
        1,
    );
    assert!(took < IO * 6, "took {took:?}");
    assert!(!matches!(e, EngineError::InDoubt(_)), "{e}");
    let all = format!("{e} / {de}");
    assert!(
        all.contains("no progress") || all.contains("nothing arrived"),
        "{all}"
    );
}

#[test]
fn a_stall_during_the_first_pass_on_the_only_connection_ends_too() {
    let stalls = Arc::new(AtomicBool::new(false));
    let s = stalls.clone();
    let (_, _, took) = stalled(
        Box::new(move |conn, seen, _| {
            if conn == 1 && seen > 4 << 20 {
                s.store(true, Ordering::SeqCst);
                Flow::Stall
            } else {
                Flow::Go
            }
        }),
        1,
    );
    assert!(stalls.load(Ordering::SeqCst));
    assert!(took < IO * 6, "took {took:?}");
}

#[test]
fn a_source_that_goes_silent_is_given_up_by_the_destination() {
    let mut p = pair_limits(None, Default::default(), limits());
    send(
        &mut p.ctl,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps: 0,
            session: 7,
            connections: 1,
            config: vec![0; 8],
        }),
    )
    .unwrap();
    assert_eq!(recv(&mut p.ctl).unwrap(), Message::Welcome);
    let mut data = p.connect().unwrap();
    send(
        &mut data,
        &Message::Join {
            session: 7,
            index: 0,
        },
    )
    .unwrap();
    // Nothing more from the "source", and nothing closed.
    let t = Instant::now();
    let ctl = p.ctl.try_clone().unwrap();
    let (dst, r) = p.join();
    assert!(t.elapsed() < IO * 6, "took {:?}", t.elapsed());
    let e = r.unwrap_err().to_string();
    assert!(e.contains("nothing arrived from the source"), "{e}");
    assert!(!dst.resumed.load(Ordering::SeqCst));
    // The source would hear why.
    match recv(&mut &ctl) {
        Ok(Message::Abort(why)) => assert!(why.contains("nothing arrived"), "{why}"),
        other => panic!("{other:?}"),
    }
    drop(data);
}
