//! Post-copy against the fake VM over real loopback TCP: demand faults served while a slow
//! push runs, hybrid and automatic post-copy, a data connection cut in the middle and the
//! link recovered; destination memory compared page by page with the source's.
mod fake;
use fake::*;
use ferry_migration::engine::{Monitor, Options, Phase};
use ferry_migration::protocol::PAGE;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

/// Touches pages from the top of memory down while the destination runs in post-copy, as a
/// guest would; returns how many touches had to wait for a page.
fn touch_from_top(pc: std::sync::Arc<Faults>, pages: u64) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        while !pc.resumed.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        let mut waited = 0;
        for p in (0..pages).rev().step_by(97) {
            if pc.ended.load(Ordering::SeqCst) {
                break;
            }
            waited += pc.touch(p * PAGE as u64) as u64;
            thread::sleep(Duration::from_millis(2));
        }
        waited
    })
}

/// Post-copy at once of 16 MiB pushed at 8 MB/s (slow enough that the guest touches pages the
/// push has not reached), through `tamper` if given, with a "vCPU" touching pages from the
/// top meanwhile. Checks the destination page-exact; returns the report, how many touches had
/// to wait, and the destination's fault state.
fn slow_post_copy(
    tamper: Option<Tamper>,
    mon: &Monitor,
) -> (ferry_migration::engine::Report, u64, std::sync::Arc<Faults>) {
    let src = FakeSource::new(4096, 64);
    let pc = std::sync::Arc::new(Faults::default());
    let p = pair_with(tamper, pc.clone());
    let toucher = touch_from_top(pc.clone(), 4096);
    let opts = Options {
        postcopy_after: Some(0),
        max_bandwidth: Some(8 << 20),
        ..Options::default()
    };
    let rep = p.migrate_with(&src, &opts, mon).unwrap();
    let waited = toucher.join().unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    (rep, waited, pc)
}

#[test]
fn post_copy_at_once_serves_faults_on_demand_and_arrives_page_exact() {
    let (rep, waited, pc) = slow_post_copy(None, &Monitor::default());
    assert!(
        pc.ended.load(Ordering::SeqCst),
        "post-copy ended on the destination"
    );
    assert_eq!(rep.switch_reason, "post-copy requested");
    assert_eq!(
        rep.passes.len(),
        1,
        "no pre-copy pass, only the empty switch-over"
    );
    let pcr = rep.postcopy.expect("post-copy report");
    let d = &pcr.destination;
    assert_eq!(pcr.pages, 4096);
    assert_eq!(d.pushed + d.pulled, 4096, "{pcr:?}");
    assert!(waited > 0 && d.faults >= waited, "{waited} waits, {pcr:?}");
    assert!(d.pulled > 0 && pcr.demanded >= d.pulled, "{pcr:?}");
    assert!(d.latency_p50_us > 0 && d.latency_p99_us >= d.latency_p50_us);
    assert!(pcr.released_ms >= pcr.postcopy_ms && pcr.recoveries == 0);
}

#[test]
fn hybrid_and_automatic_post_copy_arrive_page_exact() {
    // A limit no pass can meet, so pre-copy does not finish by itself first.
    let move_exact = |writes_per_pass, opts: Options| {
        let src = FakeSource::new(4096, writes_per_pass);
        let p = pair(None);
        let opts = Options {
            downtime_limit: Duration::from_micros(1),
            ..opts
        };
        let rep = p.migrate(&src, &opts).unwrap();
        let (dst, r) = p.join();
        r.unwrap();
        assert_exact(&src, &dst);
        rep
    };
    // Two pre-copy passes, then post-copy.
    let opts = Options {
        postcopy_after: Some(2),
        ..Options::default()
    };
    let rep = move_exact(256, opts);
    assert_eq!(rep.passes.len(), 3);
    let pcr = rep.postcopy.expect("post-copy report");
    assert!(pcr.pages > 0 && pcr.pages < 4096, "{pcr:?}");
    // A guest rewriting more than the passes carry: post-copy instead of a long pause.
    let opts = Options {
        auto_postcopy: true,
        ..Options::default()
    };
    let rep = move_exact(3000, opts);
    assert_eq!(rep.switch_reason, "not converging");
    assert!(rep.passes.len() <= 3, "{} passes", rep.passes.len());
    assert!(rep.postcopy.is_some());
}

#[test]
fn a_link_cut_during_post_copy_is_recovered_page_exact() {
    let cut = std::sync::Arc::new(AtomicBool::new(false));
    let c = cut.clone();
    // The first data connection (accept order 1) dies after 4 MiB of the push.
    let tamper: Tamper = Box::new(move |conn, seen, _| {
        (!(conn == 1 && seen > 4 << 20 && !c.swap(true, Ordering::SeqCst))).into()
    });
    let mon = Monitor::default();
    let (rep, _, _) = slow_post_copy(Some(tamper), &mon);
    assert!(cut.load(Ordering::SeqCst), "the link was cut");
    let pcr = rep.postcopy.expect("post-copy report");
    assert_eq!(pcr.recoveries, 1, "{pcr:?}");
    assert_eq!(mon.status().phase, Phase::Completed);
}

#[test]
fn a_corrupted_frame_during_post_copy_is_never_installed_and_is_sent_again() {
    let flipped = std::sync::Arc::new(AtomicBool::new(false));
    let f = flipped.clone();
    // One byte in the middle of the push on the first data connection flips (a page body,
    // a page header or a frame header: the CRC or the framing catches each).
    let tamper: Tamper = Box::new(move |conn, seen, chunk| {
        if conn == 1 && seen > 2 << 20 && !f.swap(true, Ordering::SeqCst) {
            let i = chunk.len() / 2;
            chunk[i] ^= 0x40;
        }
        Flow::Go
    });
    let (rep, _, _) = slow_post_copy(Some(tamper), &Monitor::default());
    assert!(flipped.load(Ordering::SeqCst));
    assert!(rep.postcopy.unwrap().recoveries >= 1);
}

#[test]
fn a_reconnect_whose_data_connection_fails_does_not_hold_up_the_next_one() {
    // The push's data connection (accept order 1) dies after 4 MiB; the first reconnect's
    // data connection (accept order 3: control 2, data 3) dies before its Join arrives. The
    // destination must take the source's next reconnect at once, not wait out the stale one.
    use std::sync::atomic::AtomicUsize;
    let step = std::sync::Arc::new(AtomicUsize::new(0));
    let s = step.clone();
    let tamper: Tamper = Box::new(move |conn, seen, chunk: &mut Vec<u8>| {
        if conn == 1 && seen > 4 << 20 && s.fetch_max(1, Ordering::SeqCst) == 0 {
            return Flow::Cut;
        }
        if conn == 3 && s.fetch_max(2, Ordering::SeqCst) < 2 {
            chunk.clear(); // not even the Join gets through
            return Flow::Cut;
        }
        Flow::Go
    });
    let t = std::time::Instant::now();
    let mon = Monitor::default();
    let (rep, _, _) = slow_post_copy(Some(tamper), &mon);
    let took = t.elapsed();
    assert_eq!(step.load(Ordering::SeqCst), 2, "both cuts happened");
    let pcr = rep.postcopy.expect("post-copy report");
    assert!(pcr.recoveries >= 2, "{pcr:?}");
    // 16 MiB at 8 MB/s is ~2 s; the stale join used to cost 10 s more.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

#[test]
fn a_link_back_after_a_long_outage_is_not_taken_for_dead_at_once() {
    // The push's data connection dies after 4 MiB and the source cannot reach the destination
    // for 11 s, longer than a page demand may wait on a live link. The vCPU's demands from
    // before the outage are sent again on the new link: it must serve them, not be declared
    // dead at once for their age (which looped reconnect after reconnect for ever).
    use std::sync::Mutex;
    let outage: std::sync::Arc<Mutex<Option<std::time::Instant>>> = Default::default();
    let o = outage.clone();
    let slowed = std::sync::Arc::new(AtomicBool::new(false));
    let sl = slowed.clone();
    let tamper: Tamper = Box::new(move |conn, seen, _| {
        let mut o = o.lock().unwrap();
        if conn == 1 && seen > 4 << 20 && o.is_none() {
            *o = Some(std::time::Instant::now() + Duration::from_secs(11));
            return Flow::Cut;
        }
        // The new control connection (2) carries the answers to the demands sent again:
        // the first comes 200 ms late, as on a loaded host or a longer link.
        if conn == 2 && seen > 0 && !sl.swap(true, Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(200));
        }
        Flow::Go
    });
    let src = FakeSource::new(4096, 64);
    let pc = std::sync::Arc::new(Faults::default());
    let p = pair_with(Some(tamper), pc.clone());
    let toucher = touch_from_top(pc.clone(), 4096);
    // A vCPU that touches a page the push has not reached while the link is down.
    let (o, f) = (outage.clone(), pc.clone());
    let late = thread::spawn(move || {
        while o.lock().unwrap().is_none() {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(100));
        let last = f.missing.lock().unwrap().last().copied();
        last.is_some_and(|gpa| f.touch(gpa))
    });
    let opts = Options {
        postcopy_after: Some(0),
        max_bandwidth: Some(8 << 20),
        ..Options::default()
    };
    let connect = || match *outage.lock().unwrap() {
        Some(until) if std::time::Instant::now() < until => {
            Err(std::io::Error::other("no route to host (test outage)"))
        }
        _ => p.connect(),
    };
    let ctl = p.ctl.try_clone().unwrap();
    let t = std::time::Instant::now();
    let rep =
        ferry_migration::engine::migrate(&src, ctl, &connect, &opts, &Monitor::default()).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "took {:?}",
        t.elapsed()
    );
    toucher.join().unwrap();
    assert!(late.join().unwrap(), "the late touch waited for its page");
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    let pcr = rep.postcopy.expect("post-copy report");
    assert_eq!(pcr.recoveries, 1, "{pcr:?}");
    assert!(pcr.destination.pulled > 0, "{pcr:?}");
    assert!(slowed.load(Ordering::SeqCst), "an answer was slowed");
}
