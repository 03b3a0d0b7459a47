//! The receiving side: the control connection carries the handshake and the switch-over; one
//! receiver thread per data connection writes pages straight from the frame into the VM, and
//! the receivers meet at every end of pass so passes never overtake each other.
use super::postcopy_dst::PostCopyDest;
use super::{ok, DestinationVm, EngineError, PageSet};
use crate::protocol::{
    expect, for_each_page, parse, recv, recv_raw, send, Message, PageRef, PostCopyFigures,
    ProtocolError, KIND_PAGES, MAX_CONNECTIONS, PAGE,
};
use serde::{Deserialize, Serialize};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the data connections have to join after Welcome.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A data connection silent for this long is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
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
}

/// Receives a VM into `vm`: `ctl` is the accepted control connection, `listener` accepts the
/// data connections. The VM is resumed only after the source's Commit; on any error before it,
/// it is left unstarted (the caller discards it) and the source is told why. In post-copy this
/// returns once every page is in, the VM running since the switch-over; a broken link is
/// waited out (the source reconnects through `listener`).
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    mut ctl: TcpStream,
    listener: &TcpListener,
) -> Result<Received, EngineError> {
    // Small frames (acknowledgements, post-copy demand requests) must not wait for Nagle.
    let _ = ctl.set_nodelay(true);
    let r = run_destination(vm, &mut ctl, listener);
    if let Err(e) = &r {
        if !matches!(e, EngineError::Protocol(ProtocolError::Peer(_))) {
            let _ = send(&mut ctl, &Message::Abort(e.to_string()));
        }
    }
    r
}

fn run_destination<V: DestinationVm>(
    vm: &mut V,
    ctl: &mut TcpStream,
    listener: &TcpListener,
) -> Result<Received, EngineError> {
    let hello = match recv(ctl)? {
        Message::Hello(h) => h,
        Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
        m => return Err(m.unexpected("Hello").into()),
    };
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
    send(ctl, &Message::Welcome)?;
    let data = accept_data(listener, hello.session, n)?;
    let handles: Vec<TcpStream> = data.iter().filter_map(|s| s.try_clone().ok()).collect();
    let failed = AtomicU8::new(OK);
    let stop_all = |how: u8| {
        failed.fetch_max(how, Ordering::SeqCst);
        for h in &handles {
            let _ = h.shutdown(Shutdown::Both);
        }
    };
    let barrier = PassBarrier::new(n as usize);
    // The last receiver to finish a pass acknowledges it on the control connection, so the
    // source times passes end to end (its rate includes the destination's work).
    let ack = Mutex::new(ctl.try_clone().map_err(ProtocolError::Io)?);
    let shared: &V = vm;
    let stop_prefault = AtomicBool::new(false);
    // Pages dropped ahead of a post-copy switch-over (Discard).
    let mut discarded: Vec<(u64, u64)> = Vec::new();
    let (results, state, streams) = std::thread::scope(|scope| {
        let workers: Vec<_> = data
            .into_iter()
            .map(|mut s| {
                let (barrier, stop_all, ack) = (&barrier, &stop_all, &ack);
                scope.spawn(move || {
                    let r = receive_share(shared, &mut s, barrier, ack);
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
        tracing::debug!(drained = ?t_state.elapsed(), "receivers done after State");
        (results, state, streams)
    });
    let mut got = Received {
        connections: n,
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
    let committed = t.elapsed();
    let Some(pc) = postcopy else {
        ok(vm.resume())?;
        tracing::debug!(?loaded, ?committed, resumed = ?t.elapsed(), "switch-over (from State)");
        send(ctl, &Message::Resumed)?;
        return Ok(got);
    };
    let ctl = ctl.try_clone().map_err(ProtocolError::Io)?;
    got.postcopy = Some(pc.run(ctl, streams, listener)?);
    Ok(got)
}

/// How the receivers are doing: all well, one saw its connection end (the cause is probably
/// on the control connection), or one found a fault in its stream (it is the cause).
const OK: u8 = 0;
const ECHO: u8 = 1;
const FAULT: u8 = 2;

fn is_echo(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Aborted | EngineError::Protocol(ProtocolError::Closed | ProtocolError::Io(_))
    )
}

/// The VM's state, and for post-copy the pages the destination lacks.
type StateAndMissing = (Vec<u8>, Option<Vec<(u64, u64)>>);

/// Waits on the control connection for the VM's state, which comes after every page (and, in
/// post-copy, after the list of pages still missing). It is quiet until then, so it is watched
/// in short steps: when a receiver has failed, the source's reason (its Abort) gets a moment
/// to arrive, then the wait ends.
fn wait_state(
    ctl: &mut TcpStream,
    failed: &AtomicU8,
    mut hint: impl FnMut(Vec<(u64, u64)>),
    mut discard: impl FnMut(Vec<(u64, u64)>) -> Result<(), EngineError>,
) -> Result<StateAndMissing, EngineError> {
    let mut missing: Option<Vec<(u64, u64)>> = None;
    loop {
        wait_readable(ctl, failed)?;
        ctl.set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(ProtocolError::Io)?;
        match recv(ctl)? {
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

/// Returns once the control connection has something to read (or has ended), or fails
/// when the receivers have.
fn wait_readable(ctl: &mut TcpStream, failed: &AtomicU8) -> Result<(), EngineError> {
    let mut grace = None;
    ctl.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(ProtocolError::Io)?;
    loop {
        match ctl.peek(&mut [0u8]) {
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
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
            }
            Err(e) => return Err(ProtocolError::Io(e).into()),
        }
    }
    Ok(())
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

/// Accepts the `n` data connections of `session`. A connection that does not open with the
/// right `Join` (a port probe, another migration) is closed and does not count.
pub(super) fn accept_data(
    l: &TcpListener,
    session: u64,
    n: u32,
) -> Result<Vec<TcpStream>, EngineError> {
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut have = 0;
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while have < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((mut s, _)) = accept_within(l, left).map_err(ProtocolError::Io)? else {
            return Err(ProtocolError::Malformed {
                what: "Join",
                why: format!("only {have} of {n} data connections joined within {JOIN_TIMEOUT:?}"),
            }
            .into());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_nodelay(true);
        if let Ok(Message::Join { session: id, index }) = recv(&mut s) {
            if id == session && index < n && slots[index as usize].is_none() {
                let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
                slots[index as usize] = Some(s);
                have += 1;
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Accepts one connection (blocking), waiting at most `wait`; None when none came.
pub(super) fn accept_within(
    l: &TcpListener,
    wait: Duration,
) -> std::io::Result<Option<(TcpStream, std::net::SocketAddr)>> {
    l.set_nonblocking(true)?;
    let until = Instant::now() + wait;
    let r = loop {
        match l.accept() {
            Ok(x) => break Ok(Some(x)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    break Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => break Err(e),
        }
    };
    let _ = l.set_nonblocking(false);
    if let Ok(Some((s, _))) = &r {
        s.set_nonblocking(false)?;
    }
    r
}

/// One data connection: pages go straight from the frame into the VM. Returns the pages
/// written and the passes seen.
fn receive_share<V: DestinationVm>(
    vm: &V,
    s: &mut TcpStream,
    barrier: &PassBarrier,
    ack: &Mutex<TcpStream>,
) -> Result<(u64, u32), EngineError> {
    let mut frame = Vec::new();
    let mut page = vec![0u8; PAGE];
    let mut pages = 0u64;
    let mut passes = 0u32;
    loop {
        let kind = recv_raw(s, &mut frame)?;
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
