//! The receiving side: the control connection carries the handshake and the switch-over; one
//! receiver thread per data connection writes pages straight from the frame into the VM, and
//! the receivers meet at every end of pass so passes never overtake each other.
use super::acceptor::{Acceptor, Incoming};
use super::postcopy_dst::PostCopyDest;
use super::{ok, DestinationVm, EngineError, PageSet};
use crate::protocol::{
    expect, for_each_page, parse, recv, recv_raw, send, Hello, Message, PageRef, PostCopyFigures,
    ProtocolError, KIND_PAGES, MAX_CONNECTIONS, PAGE,
};
use crate::transport::Conn;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// After a data connection ended, how long the control connection may take to say why.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Received {
    pub pages: u64,
    pub passes: u32,
    pub connections: u32,
    pub state_bytes: u64,
    /// Present when the VM came by post-copy: what the destination measured.
    pub postcopy: Option<PostCopyFigures>,
    /// Pages a seed gave this host before the migration (seeded migration).
    pub seed_pages: u64,
}

/// Receives a VM into `vm`: `first` is the control connection with the source's Hello (from
/// [`Acceptor::next_hello`]), through which `acc` also takes the data connections. The VM
/// is resumed only after the source's Commit; on any error before it, it is left unstarted
/// (the caller discards it) and the source is told why. In post-copy this returns once every
/// page is in, the VM running since the switch-over; a broken link is waited out (the source
/// reconnects through `acc`).
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    first: Incoming,
    acc: &Acceptor,
) -> Result<Received, EngineError> {
    let Incoming {
        conn: mut ctl,
        first,
        ..
    } = first;
    let Message::Hello(hello) = first else {
        return Err(first.unexpected("Hello").into());
    };
    let mut committed = false;
    let r = run_destination(vm, &mut ctl, hello, acc, &mut committed);
    if let Err(e) = &r {
        if !matches!(e, EngineError::Protocol(ProtocolError::Peer(_))) {
            let _ = send(&mut ctl, &Message::Abort(e.to_string()));
        }
        if !committed {
            // Before commit the disks made for this migration are nobody's.
            vm.remove_disks();
        }
    }
    r
}

fn run_destination<V: DestinationVm>(
    vm: &mut V,
    ctl: &mut Conn,
    hello: Hello,
    acc: &Acceptor,
    committed: &mut bool,
) -> Result<Received, EngineError> {
    if hello.caps & crate::protocol::CAP_RESUME != 0 {
        return Err(ProtocolError::Peer(
            "the source wants to resume a post-copy this host is not running".into(),
        )
        .into());
    }
    let n = hello.connections;
    if n == 0 || n > MAX_CONNECTIONS {
        return Err(ProtocolError::Malformed {
            what: "Hello",
            why: format!("{n} data connections (1..={MAX_CONNECTIONS})"),
        }
        .into());
    }
    ok(vm.prepare(&hello.config))?;
    // A seeded migration: the seed is loaded (or refused) before Welcome, and what it gave
    // follows Welcome. Without the capability the seed stays unused: a source that does
    // not compare would leave its stale pages in place.
    let held = if hello.caps & crate::protocol::CAP_SEEDED != 0 {
        Some(ok(vm.load_seed())?)
    } else {
        None
    };
    send(ctl, &Message::Welcome)?;
    if let Some(h) = &held {
        super::seeded::offer(&*vm, ctl, h)?;
    }
    let disks = if hello.caps & crate::protocol::CAP_STORAGE != 0 {
        Some(super::storage::create(vm, ctl)?)
    } else {
        None
    };
    let mut data = accept_data(acc, hello.session, n + disks.is_some() as u32, false)?;
    // The storage connection joined last (index n). Its bulk copy comes before any page:
    // received here, before the page receivers (and their timeouts) start. After it, the
    // guest's writes come when they come: no timeout on it from then on (a failure shuts it
    // down with the others).
    let mut store = match disks {
        Some(d) => {
            let mut c = data.pop().ok_or(EngineError::Aborted)?;
            super::storage::receive(&*vm, &mut c, d, false)?;
            c.set_read_timeout(None).map_err(ProtocolError::Io)?;
            Some((c, d))
        }
        None => None,
    };
    let mut handles: Vec<Conn> = data.iter().filter_map(|s| s.try_clone().ok()).collect();
    handles.extend(store.as_ref().and_then(|(c, _)| c.try_clone().ok()));
    let failed = AtomicU8::new(OK);
    let stop_all = |how: u8| {
        failed.fetch_max(how, Ordering::SeqCst);
        for h in &handles {
            h.shutdown();
        }
    };
    // When anything last arrived on any connection (ms since `t0`): the control connection
    // is quiet during pre-copy, the data connections after it.
    let t0 = Instant::now();
    let activity = Activity {
        t0,
        last_ms: AtomicU64::new(0),
    };
    let io_timeout = acc.limits().io_timeout;
    let barrier = PassBarrier::new(n as usize);
    // The last receiver to finish a pass acknowledges it on the control connection, so the
    // source times passes end to end (its rate includes the destination's work).
    let ack = Mutex::new(ctl.try_clone().map_err(ProtocolError::Io)?);
    let activity = &activity;
    let shared: &V = vm;
    let stop_prefault = AtomicBool::new(false);
    // Pages dropped ahead of a post-copy switch-over (Discard).
    let mut discarded: Vec<(u64, u64)> = Vec::new();
    let (results, state, streams) = std::thread::scope(|scope| {
        let storage = store.as_mut().map(|(c, d)| {
            let (stop_all, d) = (&stop_all, *d);
            scope.spawn(move || {
                let r = super::storage::receive(shared, c, d, true);
                if let Err(e) = &r {
                    stop_all(if is_echo(e) { ECHO } else { FAULT });
                }
                r
            })
        });
        let workers: Vec<_> = data
            .into_iter()
            .map(|mut s| {
                let (barrier, stop_all, ack) = (&barrier, &stop_all, &ack);
                scope.spawn(move || {
                    let r = receive_share(shared, &mut s, barrier, ack, activity);
                    if let Err(e) = &r {
                        barrier.fail();
                        stop_all(if is_echo(e) { ECHO } else { FAULT });
                    }
                    (r, s)
                })
            })
            .collect();
        // Pages the source announces are mapped ahead of the receivers by a thread of their
        // own (bulk population is ~3× cheaper than a fault per page, and runs beside them).
        let (hints, hint_rx) = std::sync::mpsc::channel::<Vec<(u64, u64)>>();
        let prefaulter = {
            let stop = &stop_prefault;
            scope.spawn(move || prefault(shared, hint_rx, stop))
        };
        let mut prefaulter = Some(prefaulter);
        let state = wait_state(
            ctl,
            &failed,
            (activity, io_timeout),
            |r| {
                let _ = hints.send(r);
            },
            |r| {
                // Nothing may map these pages again: the prefaulter stops first.
                stop_prefault.store(true, Ordering::SeqCst);
                if let Some(p) = prefaulter.take() {
                    let _ = p.join();
                }
                ok(shared.discard(&r))?;
                discarded.extend(r);
                Ok(())
            },
        );
        stop_prefault.store(true, Ordering::SeqCst);
        drop(hints);
        if let Some(p) = prefaulter {
            let _ = p.join();
        }
        let t_state = Instant::now();
        if state.is_err() {
            barrier.fail();
            stop_all(ECHO);
        }
        let mut results = Vec::new();
        let mut streams = Vec::new();
        for w in workers {
            match w.join() {
                Ok((r, s)) => {
                    results.push(r);
                    streams.push(s);
                }
                Err(_) => results.push(Err(EngineError::Vm("a receiver thread panicked".into()))),
            }
        }
        if let Some(h) = storage {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => results.push(Err(e)),
                Err(_) => {
                    results.push(Err(EngineError::Vm("the storage receiver panicked".into())))
                }
            }
        }
        tracing::debug!(drained = ?t_state.elapsed(), "receivers done after State");
        (results, state, streams)
    });
    let mut got = Received {
        connections: n,
        seed_pages: held.as_ref().map_or(0, |h| h.len() as u64),
        ..Received::default()
    };
    // What a receiver found wrong in its stream is the cause; a connection that merely ended
    // is an echo of what the control connection says (the source's Abort), if it says it.
    let mut echo = None;
    for r in results {
        match r {
            Ok((pages, passes)) => {
                got.pages += pages;
                got.passes = got.passes.max(passes);
            }
            Err(e) if is_echo(&e) => {
                echo.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    let (state, missing) = state?;
    if let Some(e) = echo {
        return Err(e);
    }
    got.state_bytes = state.len() as u64;
    let t = Instant::now();
    let vm: &V = vm;
    let postcopy = match &missing {
        Some(runs) => {
            let set = PageSet::from_runs(runs).map_err(EngineError::Vm)?;
            // What was not dropped ahead (dirtied since, or no Discard at all) goes now.
            let early = PageSet::from_runs(&discarded).map_err(EngineError::Vm)?;
            for r in set.runs_except(usize::MAX, Some(&early)) {
                ok(vm.discard(&r))?;
            }
            ok(vm.begin_postcopy())?;
            tracing::debug!(runs = runs.len(), pages = set.len(), took = ?t.elapsed(), "post-copy: pages dropped, userfaultfd on");
            Some(PostCopyDest::new(vm, set, hello.session))
        }
        None => None,
    };
    ok(vm.load_state(&state))?;
    let loaded = t.elapsed();
    send(ctl, &Message::Ready)?;
    expect(ctl, Message::Commit)?;
    *committed = true;
    ok(vm.before_resume())?;
    let committed = t.elapsed();
    let Some(pc) = postcopy else {
        ok(vm.resume())?;
        tracing::debug!(?loaded, ?committed, resumed = ?t.elapsed(), "switch-over (from State)");
        send(ctl, &Message::Resumed)?;
        return Ok(got);
    };
    let ctl = ctl.try_clone().map_err(ProtocolError::Io)?;
    got.postcopy = Some(pc.run(ctl, streams, acc)?);
    Ok(got)
}

/// How the receivers are doing: all well, one saw its connection end (the cause is probably
/// on the control connection), or one found a fault in its stream (it is the cause).
const OK: u8 = 0;
const ECHO: u8 = 1;
const FAULT: u8 = 2;

fn is_echo(e: &EngineError) -> bool {
    match e {
        EngineError::Aborted => true,
        EngineError::Protocol(p) => p.is_connection_loss(),
        _ => false,
    }
}

/// The VM's state, and for post-copy the pages the destination lacks.
type StateAndMissing = (Vec<u8>, Option<Vec<(u64, u64)>>);

/// Waits on the control connection for the VM's state, which comes after every page (and, in
/// post-copy, after the list of pages still missing). It is quiet until then, so it is watched
/// in short steps: when a receiver has failed, the source's reason (its Abort) gets a moment
/// to arrive, then the wait ends.
fn wait_state(
    ctl: &mut Conn,
    failed: &AtomicU8,
    idle: (&Activity, Duration),
    mut hint: impl FnMut(Vec<(u64, u64)>),
    mut discard: impl FnMut(Vec<(u64, u64)>) -> Result<(), EngineError>,
) -> Result<StateAndMissing, EngineError> {
    let mut missing: Option<Vec<(u64, u64)>> = None;
    loop {
        wait_readable(ctl, failed, idle)?;
        let m = recv(ctl)?;
        idle.0.touch();
        match m {
            Message::Populated(r) => hint(r),
            Message::Missing(r) => missing.get_or_insert_with(Vec::new).extend(r),
            Message::Discard(r) => {
                discard(r)?;
                send(ctl, &Message::Discarded)?;
            }
            Message::State(s) => return Ok((s, missing)),
            Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
            m => return Err(m.unexpected("State").into()),
        }
    }
}

/// When anything last arrived on any connection of a migration.
struct Activity {
    t0: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .fetch_max(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.t0
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Returns once the control connection has something to read (or has ended); fails when the
/// receivers have, or when nothing has arrived on any connection for the I/O timeout (a
/// source that stopped sending without closing).
fn wait_readable(
    ctl: &Conn,
    failed: &AtomicU8,
    (activity, io_timeout): (&Activity, Duration),
) -> Result<(), EngineError> {
    let mut grace = None;
    loop {
        if ctl
            .readable(Duration::from_millis(20))
            .map_err(ProtocolError::Io)?
        {
            return Ok(());
        }
        let f = failed.load(Ordering::SeqCst);
        if f == FAULT {
            return Err(EngineError::Aborted);
        }
        if f == ECHO {
            let until = *grace.get_or_insert_with(|| Instant::now() + ABORT_GRACE);
            if Instant::now() >= until {
                return Err(EngineError::Aborted);
            }
        }
        if activity.idle() > io_timeout {
            return Err(EngineError::Stalled(format!(
                "nothing arrived from the source on any connection for {io_timeout:?}"
            )));
        }
    }
}

/// Bytes mapped per prefault call: a stop (State has arrived) is noticed within one call,
/// ~0.2 ms here, so a late prefault barely touches the downtime.
const PREFAULT_STEP: u64 = 512 << 10;

/// Maps the announced page ranges, in order, until told to stop (the source's State: from
/// then on it would only delay the switch-over).
fn prefault<V: DestinationVm>(
    vm: &V,
    hints: std::sync::mpsc::Receiver<Vec<(u64, u64)>>,
    stop: &AtomicBool,
) {
    loop {
        let ranges = match hints.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => {
                continue
            }
            Err(_) => return,
        };
        for (gpa, pages) in ranges {
            let end = gpa + pages * PAGE as u64;
            let mut at = gpa;
            while at < end {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let len = PREFAULT_STEP.min(end - at);
                let _ = vm.prefault(at, len); // a hint: pages that fail fault in on write
                at += len;
            }
        }
    }
}

/// Takes the `n` data connections of `session` from the acceptor (Joins of other sessions
/// are closed). With `abandon_on_hello` (a post-copy resume), a newer Hello from the source
/// ends the wait at once: this attempt is stale.
pub(super) fn accept_data(
    acc: &Acceptor,
    session: u64,
    n: u32,
    abandon_on_hello: bool,
) -> Result<Vec<Conn>, EngineError> {
    let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let mut have = 0;
    let join_timeout = acc.limits().join_timeout;
    let deadline = Instant::now() + join_timeout;
    while have < n {
        if abandon_on_hello && acc.hello_waiting() {
            return Err(EngineError::Stalled(
                "a newer reconnect from the source arrived; this one is abandoned".into(),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(EngineError::Stalled(format!(
                "only {have} of {n} data connections joined within {join_timeout:?}"
            )));
        }
        let Some(i) = acc.next_join(left.min(Duration::from_millis(50))) else {
            continue;
        };
        match i.first {
            Message::Join { session: id, index }
                if id == session && index < n && slots[index as usize].is_none() =>
            {
                slots[index as usize] = Some(i.conn);
                have += 1;
            }
            _ => tracing::warn!(
                "closed a data connection from {} that belongs to no migration here",
                i.peer
            ),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// One data connection: pages go straight from the frame into the VM. Returns the pages
/// written and the passes seen.
fn receive_share<V: DestinationVm>(
    vm: &V,
    s: &mut Conn,
    barrier: &PassBarrier,
    ack: &Mutex<Conn>,
    activity: &Activity,
) -> Result<(u64, u32), EngineError> {
    let mut frame = Vec::new();
    let mut page = vec![0u8; PAGE];
    let mut pages = 0u64;
    let mut passes = 0u32;
    loop {
        let kind = recv_raw(s, &mut frame)?;
        activity.touch();
        if kind == KIND_PAGES {
            pages += for_each_page(&frame, |gpa, d| {
                let data = match d {
                    PageRef::Raw(b) => b,
                    _ => {
                        d.decode(&mut page)?;
                        &page
                    }
                };
                ok(vm.write_page(gpa, data))
            })? as u64;
            continue;
        }
        match parse(kind, std::mem::take(&mut frame))? {
            Message::EndOfPass { pass, last } => {
                if pass != passes + 1 {
                    return Err(ProtocolError::Malformed {
                        what: "EndOfPass",
                        why: format!("pass {pass} after pass {passes}"),
                    }
                    .into());
                }
                passes = pass;
                if barrier.wait()? {
                    let mut c = ack.lock().unwrap_or_else(|e| e.into_inner());
                    send(&mut *c, &Message::EndOfPass { pass, last })?;
                }
                if last {
                    return Ok((pages, passes));
                }
            }
            Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
            m => return Err(m.unexpected("Pages or EndOfPass").into()),
        }
    }
}

/// A barrier the receivers meet at after each pass, which a failing receiver breaks for all.
struct PassBarrier {
    n: usize,
    /// Arrived so far, generation, broken.
    m: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl PassBarrier {
    fn new(n: usize) -> Self {
        PassBarrier {
            n,
            m: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        }
    }

    /// Waits for every receiver; true for the one that arrived last.
    fn wait(&self) -> Result<bool, EngineError> {
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        if g.2 {
            return Err(EngineError::Aborted);
        }
        g.0 += 1;
        let generation = g.1;
        if g.0 == self.n {
            g.0 = 0;
            g.1 += 1;
            self.cv.notify_all();
            return Ok(true);
        }
        while g.1 == generation && !g.2 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.1 == generation {
            return Err(EngineError::Aborted);
        }
        Ok(false)
    }

    fn fail(&self) {
        self.m.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
        self.cv.notify_all();
    }
}
