//! The sending side: a coordinator (this thread) decides passes and switch-over; one sender
//! thread per data connection reads, encodes and sends pages, taking chunks of the pass's page
//! list from a shared cursor so fast connections carry more.
use super::{ok, EngineError, Monitor, Options, Pass, Phase, Report, SourceVm, TimeoutPolicy};
use crate::protocol::{
    expect, recv, send, Hello, Message, PagesBuf, ProtocolError, KIND_ABORT, MAGIC, MAX_BATCH,
    MAX_CONNECTIONS, MAX_RANGES, PAGE, PAGE_HEADER_LEN, VERSION,
};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A predicted downtime so short that another pass is not worth it.
const GOOD_ENOUGH: Duration = Duration::from_millis(1);
/// Pages a sender takes from the pass's list at a time.
const CHUNK: usize = 64;
/// First throttle step of auto-converge, the step after it, and the ceiling (percent).
const THROTTLE_START: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 99;

/// One pass, shared by the senders.
struct Job {
    pass: u32,
    pages: Vec<u64>,
    /// Next index of `pages` to take.
    next: AtomicUsize,
    /// Set to stop the pass early (timeout, or another sender failed).
    cut: AtomicBool,
    last: bool,
}

pub(super) struct Shared<'a> {
    pub(super) opts: &'a Options,
    pub(super) mon: &'a Monitor,
    pub(super) started: Instant,
    /// Bytes sent by all senders (for the bandwidth cap).
    pub(super) sent: AtomicU64,
}

impl<'a> Shared<'a> {
    pub(super) fn new(opts: &'a Options, mon: &'a Monitor) -> Self {
        Shared {
            opts,
            mon,
            started: Instant::now(),
            sent: AtomicU64::new(0),
        }
    }
}

type Done = Result<Pass, EngineError>;

/// Sends `vm` to the destination whose control connection is `ctl`; `connect` opens each data
/// connection. On error before commit the VM is running again (unthrottled) when this returns.
pub fn migrate<V: SourceVm>(
    vm: &V,
    mut ctl: TcpStream,
    connect: &(dyn Fn() -> std::io::Result<TcpStream> + Sync),
    opts: &Options,
    mon: &Monitor,
) -> Result<Report, EngineError> {
    let mut undo = Undo::default();
    let _ = ctl.set_nodelay(true);
    let mut r = run_source(vm, &mut ctl, connect, opts, mon, &mut undo);
    if let Err(EngineError::Protocol(ProtocolError::Io(_) | ProtocolError::Closed)) = &r {
        // A connection broke: the destination may have said why on the control connection.
        let _ = ctl.set_read_timeout(Some(Duration::from_secs(2)));
        if let Ok(Message::Abort(why)) = recv(&mut ctl) {
            r = Err(ProtocolError::Peer(why).into());
        }
    }
    let _ = vm.throttle(0);
    mon.throttle.store(0, Ordering::Relaxed);
    match &r {
        Ok(_) => {}
        Err(e) if e.committed() => {}
        Err(e) => {
            if !undo.told {
                let _ = send(&mut ctl, &Message::Abort(e.to_string()));
            }
            if undo.paused {
                // Before commit: the source carries on as if nothing happened.
                if let Err(re) = vm.resume() {
                    r = Err(EngineError::Vm(format!(
                        "{e}; and resuming the source failed: {re}"
                    )));
                }
            }
        }
    }
    let _ = vm.stop_dirty_log();
    mon.finish(&r);
    r
}

/// What a failed migration must undo on the source.
#[derive(Default)]
struct Undo {
    /// The VM was paused for switch-over (before commit: resume it).
    paused: bool,
    /// The destination has been sent our Abort already.
    told: bool,
}

/// Opens the `n` data connections of `session`.
pub(super) fn join_data(
    connect: &(dyn Fn() -> std::io::Result<TcpStream> + Sync),
    session: u64,
    n: u32,
) -> Result<Vec<TcpStream>, EngineError> {
    let mut streams = Vec::new();
    for index in 0..n {
        let mut s = connect().map_err(ProtocolError::Io)?;
        send(&mut s, &Message::Join { session, index })?;
        streams.push(s);
    }
    Ok(streams)
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 40) ^ 0x9E37_79B9_7F4A_7C15
}

fn run_source<V: SourceVm>(
    vm: &V,
    ctl: &mut TcpStream,
    connect: &(dyn Fn() -> std::io::Result<TcpStream> + Sync),
    opts: &Options,
    mon: &Monitor,
    undo: &mut Undo,
) -> Result<Report, EngineError> {
    let t0 = Instant::now();
    let n = opts.connections.clamp(1, MAX_CONNECTIONS);
    let session = session_id();
    send(
        ctl,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps: 0,
            session,
            connections: n,
            config: vm.config(),
        }),
    )?;
    expect(ctl, Message::Welcome)?;
    let streams = join_data(connect, session, n)?;
    // Clones to unblock senders stuck in a write when the migration fails.
    let handles: Vec<TcpStream> = streams.iter().filter_map(|s| s.try_clone().ok()).collect();
    // Post-copy at once sends no pass: what to fetch is read after the pause, so no dirty
    // log (its first harvest write-protects all of memory: ~60 ms per GiB here).
    let at_once = opts.postcopy_after == Some(0);
    if !at_once {
        ok(vm.start_dirty_log())?;
    }
    let sh = Shared::new(opts, mon);
    let (r, streams) = std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel();
        let mut jobs = Vec::new();
        let mut senders = Vec::new();
        for s in streams {
            let (tx, rx) = mpsc::channel();
            jobs.push(tx);
            let (done, sh) = (done_tx.clone(), &sh);
            senders.push(scope.spawn(move || sender(vm, s, sh, rx, done)));
        }
        drop(done_tx);
        let coord = Coordinator {
            vm,
            sh: &sh,
            jobs,
            done: done_rx,
            watch: ctl.try_clone().ok(),
            handles: &handles,
        };
        let r = coord.run(ctl, t0, &mut undo.paused);
        if let Err(e) = &r {
            if !matches!(
                e,
                EngineError::Protocol(ProtocolError::Io(_) | ProtocolError::Closed)
            ) {
                // Our own reason goes first, before the data connections close under the
                // destination.
                let _ = send(ctl, &Message::Abort(e.to_string()));
                undo.told = true;
            }
            for h in &handles {
                let _ = h.shutdown(Shutdown::Both);
            }
        }
        drop(coord);
        let streams: Vec<TcpStream> = senders.into_iter().filter_map(|h| h.join().ok()).collect();
        (r, streams)
    });
    let (mut report, pending) = r?;
    let Some(pending) = pending else {
        return Ok(report);
    };
    // Committed: the VM runs on the destination, which fetches what it lacks from here.
    let streams = if streams.len() == n as usize {
        streams
    } else {
        Vec::new() // a sender thread panicked: reconnect for fresh data connections
    };
    let pc = super::postcopy_src::PostCopySource::new(vm, opts, mon, session, n);
    report.postcopy = Some(pc.run(&pending, ctl, streams, connect, report.downtime_ms)?);
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    report.wire_bytes = mon.wire_bytes.load(Ordering::Relaxed);
    Ok(report)
}

struct Coordinator<'a, V> {
    vm: &'a V,
    sh: &'a Shared<'a>,
    jobs: Vec<mpsc::Sender<Arc<Job>>>,
    done: mpsc::Receiver<Done>,
    /// The control connection, watched during passes for the destination's Abort or end.
    watch: Option<TcpStream>,
    /// The data connections, shut down to free senders stuck in a write.
    handles: &'a [TcpStream],
}

impl<V: SourceVm> Coordinator<'_, V> {
    /// Pre-copy passes, then the switch-over. Returns the report and, when it switched over to
    /// post-copy, the pages the destination still lacks.
    fn run(
        &self,
        ctl: &mut TcpStream,
        t0: Instant,
        paused: &mut bool,
    ) -> Result<(Report, Option<Vec<u64>>), EngineError> {
        let (vm, opts, mon) = (self.vm, self.sh.opts, self.sh.mon);
        let deadline = opts.timeout.map(|t| t0 + t);
        let mut report = Report {
            connections: self.jobs.len() as u32,
            ..Report::default()
        };
        let mut todo = ok(vm.populated())?;
        if opts.postcopy_after != Some(0) {
            // Not worth it when no page will be sent before the switch.
            send(ctl, &Message::Populated(ranges(&todo)))?;
        }
        let mut postcopy = false;
        // Pages per second the link carried in the last pass that sent anything.
        let mut rate = f64::INFINITY;
        let mut bandwidth = 0.0;
        // Bytes and seconds of every live pass, for the report's average bandwidth.
        let (mut live_bytes, mut live_secs) = (0u64, 0f64);
        let mut throttle = 0u8;
        loop {
            let number = report.passes.len() as u32 + 1;
            if opts.postcopy_after.is_some_and(|n| number > n) {
                report.switch_reason = "post-copy requested".into();
                postcopy = true;
                break;
            }
            mon.begin_pass(number, todo.len() as u64, Phase::PreCopy);
            let start = Instant::now();
            let (mut pass, rest) = self.pass(number, todo, false, deadline)?;
            expect_ack(ctl, number)?;
            let secs = start.elapsed().as_secs_f64().max(1e-6);
            pass.ms = secs * 1e3;
            pass.throttle_percent = throttle;
            todo = ok(vm.fetch_dirty())?;
            pass.dirty_pages_per_s = todo.len() as f64 / secs;
            if pass.pages > 0 {
                rate = pass.pages as f64 / secs;
                bandwidth = pass.wire_bytes as f64 / secs;
                live_bytes += pass.wire_bytes;
                live_secs += secs;
            }
            let sent = pass.pages;
            report.passes.push(pass.clone());
            let predicted = todo.len() as f64 / rate;
            report.predicted_downtime_ms = predicted * 1e3;
            mon.update(|s| {
                s.bandwidth_bytes_per_s = bandwidth;
                s.dirty_pages_per_s = pass.dirty_pages_per_s;
                s.dirty_pages = todo.len() as u64;
            });
            if let Some(rest) = rest {
                todo.extend(rest);
                report.switch_reason = "timeout".into();
                postcopy = opts.auto_postcopy;
                break;
            }
            // The limit is a ceiling, not a target: while each pass still halves the dirty
            // set, one more (short) pass buys a shorter pause.
            let halving = (todo.len() as u64) * 2 <= sent;
            if predicted <= opts.downtime_limit.as_secs_f64()
                && (!halving || predicted <= GOOD_ENOUGH.as_secs_f64())
            {
                report.switch_reason = "converged".into();
                break;
            }
            let stuck = number >= 2 && todo.len() as u64 > sent / 2;
            if opts.auto_postcopy && stuck {
                // The guest re-dirtied more than half of what this pass sent: more passes
                // will not shrink the pause; move the VM now and fetch the rest after.
                report.switch_reason = "not converging".into();
                postcopy = true;
                break;
            }
            if opts.max_passes > 0 && number >= opts.max_passes {
                report.switch_reason = "max passes".into();
                postcopy = opts.auto_postcopy;
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                match opts.on_timeout {
                    TimeoutPolicy::Cancel => {
                        return Err(EngineError::Timeout(opts.timeout.unwrap_or_default()))
                    }
                    TimeoutPolicy::SwitchOver => {
                        report.switch_reason = "timeout".into();
                        postcopy = opts.auto_postcopy;
                        break;
                    }
                }
            }
            if opts.auto_converge && stuck {
                // The guest re-dirtied more than half of what this pass sent: not converging.
                throttle = match throttle {
                    0 => THROTTLE_START,
                    t => t.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
                };
                ok(vm.throttle(throttle))?;
                mon.throttle.store(throttle, Ordering::Relaxed);
                report.max_throttle_percent = throttle;
            }
        }
        if postcopy && !report.passes.is_empty() {
            // The destination drops its stale copies of what post-copy will fetch while the
            // VM still runs here: freeing them (~70 ms per GiB here) stays out of the pause.
            let frames = send_runs(ctl, &todo, Message::Discard)?;
            for _ in 0..frames {
                expect(ctl, Message::Discarded)?;
            }
        }
        // Switch-over.
        let t_pause = Instant::now();
        ok(vm.pause())?;
        *paused = true;
        if report.passes.is_empty() && opts.postcopy_after == Some(0) {
            // Nothing sent yet, no dirty log: every page the guest may have written.
            todo = ok(vm.populated())?;
        } else {
            todo.extend(ok(vm.fetch_dirty())?);
        }
        todo.sort_unstable();
        todo.dedup();
        let number = report.passes.len() as u32 + 1;
        let t_paused = t_pause.elapsed();
        // Post-copy: the last pass is empty (it only ends the pre-copy on every data
        // connection); the pages it would carry are named instead and fetched later.
        let (last, pending) = if postcopy {
            (Vec::new(), Some(todo))
        } else {
            (todo, None)
        };
        mon.begin_pass(number, last.len() as u64, Phase::SwitchOver);
        let (mut pass, _) = self.pass(number, last, true, None)?;
        let t_pages = t_pause.elapsed();
        pass.ms = t_pause.elapsed().as_secs_f64() * 1e3;
        pass.throttle_percent = throttle;
        report.passes.push(pass);
        let state = ok(vm.save_state())?;
        let t_state = t_pause.elapsed();
        if let Some(p) = &pending {
            send_runs(ctl, p, Message::Missing)?;
        }
        send(ctl, &Message::State(state))?;
        expect_ack(ctl, number)?;
        let t_ack = t_pause.elapsed();
        expect(ctl, Message::Ready)?;
        let t_ready = t_pause.elapsed();
        send(ctl, &Message::Commit).map_err(|e| EngineError::InDoubt(e.to_string()))?;
        match recv(ctl) {
            Ok(Message::Resumed) => {}
            Ok(m) => {
                return Err(EngineError::InDoubt(format!(
                    "got {} instead of Resumed",
                    m.name()
                )))
            }
            Err(e) => return Err(EngineError::InDoubt(e.to_string())),
        }
        report.downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(
            ?t_paused,
            ?t_pages,
            ?t_state,
            ?t_ack,
            ?t_ready,
            resumed = ?t_pause.elapsed(),
            "switch-over timeline (from pause)"
        );
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        report.wire_bytes = report.passes.iter().map(|p| p.wire_bytes).sum();
        report.saved_bytes = report.passes.iter().map(|p| p.saved_bytes).sum();
        report.bandwidth_bytes_per_s = live_bytes as f64 / live_secs.max(1e-6);
        Ok((report, pending))
    }

    /// Looks at the control connection without waiting: the destination's Abort, or its
    /// end, means it is gone. An acknowledgement waiting there is left for its reader.
    fn destination_gone(&self) -> Option<EngineError> {
        let c = self.watch.as_ref()?;
        c.set_nonblocking(true).ok()?;
        let mut b = [0u8];
        let r = c.peek(&mut b);
        let _ = c.set_nonblocking(false);
        match r {
            Ok(0) => Some(ProtocolError::Closed.into()),
            Ok(_) if b[0] == KIND_ABORT => match recv(&mut &*c) {
                Ok(Message::Abort(why)) => Some(ProtocolError::Peer(why).into()),
                Ok(_) => None,
                Err(e) => Some(e.into()),
            },
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => Some(ProtocolError::Io(e).into()),
        }
    }

    /// Runs one pass on every connection. Returns its figures and, when the deadline cut it
    /// short under the switch-over policy, the pages it did not send.
    fn pass(
        &self,
        number: u32,
        pages: Vec<u64>,
        last: bool,
        deadline: Option<Instant>,
    ) -> Result<(Pass, Option<Vec<u64>>), EngineError> {
        let job = Arc::new(Job {
            pass: number,
            pages,
            next: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
            last,
        });
        for tx in &self.jobs {
            tx.send(job.clone())
                .map_err(|_| EngineError::Vm("a sender thread has gone".into()))?;
        }
        let mut total = Pass::default();
        let mut first_err = None;
        let mut timed_out = false;
        let mut got = 0;
        while got < self.jobs.len() {
            match self.done.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(p)) => {
                    got += 1;
                    total.pages += p.pages;
                    total.zero_pages += p.zero_pages;
                    total.wire_bytes += p.wire_bytes;
                    total.saved_bytes += p.saved_bytes;
                }
                Ok(Err(e)) => {
                    got += 1;
                    job.cut.store(true, Ordering::SeqCst);
                    first_err.get_or_insert(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if first_err.is_none() {
                        if let Some(e) = self.destination_gone() {
                            // Senders may be blocked on full buffers nobody reads any more.
                            job.cut.store(true, Ordering::SeqCst);
                            for h in self.handles {
                                let _ = h.shutdown(Shutdown::Both);
                            }
                            first_err = Some(e);
                        }
                    }
                    if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
                        timed_out = true;
                        job.cut.store(true, Ordering::SeqCst);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    first_err.get_or_insert(EngineError::Vm("a sender thread has gone".into()));
                    break;
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if !timed_out {
            return Ok((total, None));
        }
        match self.sh.opts.on_timeout {
            TimeoutPolicy::Cancel => Err(EngineError::Timeout(
                self.sh.opts.timeout.unwrap_or_default(),
            )),
            TimeoutPolicy::SwitchOver => {
                let next = job.next.load(Ordering::SeqCst).min(job.pages.len());
                Ok((total, Some(job.pages[next..].to_vec())))
            }
        }
    }
}

/// Ascending page addresses as (first page, page count) runs, at most what one frame holds.
fn ranges(pages: &[u64]) -> Vec<(u64, u64)> {
    ranges_upto(pages).0
}

/// Sends ascending `pages` as runs, as many `message` frames as they take; returns how many.
fn send_runs(
    ctl: &mut TcpStream,
    pages: &[u64],
    message: fn(Vec<(u64, u64)>) -> Message,
) -> Result<usize, ProtocolError> {
    let (mut rest, mut frames) = (pages, 0);
    while !rest.is_empty() {
        let (runs, used) = ranges_upto(rest);
        send(ctl, &message(runs))?;
        rest = &rest[used..];
        frames += 1;
    }
    Ok(frames)
}

/// As [`ranges`], with how many of `pages` the runs cover.
fn ranges_upto(pages: &[u64]) -> (Vec<(u64, u64)>, usize) {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &gpa) in pages.iter().enumerate() {
        if let Some((start, n)) = out.last_mut() {
            if *start + *n * PAGE as u64 == gpa {
                *n += 1;
                continue;
            }
        }
        if out.len() == MAX_RANGES {
            return (out, i);
        }
        out.push((gpa, 1));
    }
    (out, pages.len())
}

/// Waits for the destination to confirm it has written every page of pass `number`.
fn expect_ack(ctl: &mut TcpStream, number: u32) -> Result<(), EngineError> {
    match recv(ctl)? {
        Message::EndOfPass { pass, .. } if pass == number => Ok(()),
        Message::Abort(why) => Err(ProtocolError::Peer(why).into()),
        m => Err(m.unexpected("EndOfPass").into()),
    }
}

/// One data connection's thread: takes each pass's pages chunk by chunk until none are left.
/// Gives its connection back (post-copy goes on with it).
fn sender<V: SourceVm>(
    vm: &V,
    mut s: TcpStream,
    sh: &Shared,
    jobs: mpsc::Receiver<Arc<Job>>,
    done: mpsc::Sender<Done>,
) -> TcpStream {
    let mut frame = PagesBuf::default();
    while let Ok(job) = jobs.recv() {
        let r = send_share(vm, &mut s, sh, &job, &mut frame);
        let stop = r.is_err() || job.last;
        if done.send(r).is_err() || stop {
            break;
        }
    }
    s
}

fn send_share<V: SourceVm>(
    vm: &V,
    s: &mut TcpStream,
    sh: &Shared,
    job: &Job,
    frame: &mut PagesBuf,
) -> Result<Pass, EngineError> {
    let mut pass = Pass::default();
    loop {
        if sh.mon.cancelled() {
            return Err(EngineError::Cancelled);
        }
        if job.cut.load(Ordering::SeqCst) {
            break;
        }
        let start = job.next.fetch_add(CHUNK, Ordering::SeqCst);
        if start >= job.pages.len() {
            break;
        }
        let end = (start + CHUNK).min(job.pages.len());
        for &gpa in &job.pages[start..end] {
            let (n, zero) = frame
                .push_with(gpa, sh.opts.compression, |b| vm.read_page(gpa, b))
                .map_err(EngineError::Vm)?;
            pass.pages += 1;
            pass.zero_pages += zero as u64;
            pass.wire_bytes += n as u64;
            pass.saved_bytes += (PAGE + PAGE_HEADER_LEN - n) as u64;
            if frame.pages() >= MAX_BATCH {
                flush(s, frame, sh)?;
            }
        }
        sh.mon
            .pass_sent
            .fetch_add((end - start) as u64, Ordering::Relaxed);
    }
    flush(s, frame, sh)?;
    send(
        s,
        &Message::EndOfPass {
            pass: job.pass,
            last: job.last,
        },
    )?;
    Ok(pass)
}

/// Sends the frame, then sleeps as long as the bandwidth cap asks.
pub(super) fn flush(
    s: &mut TcpStream,
    frame: &mut PagesBuf,
    sh: &Shared,
) -> Result<(), EngineError> {
    let n = frame.send(s)? as u64;
    sh.mon.wire_bytes.fetch_add(n, Ordering::Relaxed);
    let sent = sh.sent.fetch_add(n, Ordering::Relaxed) + n;
    if let Some(cap) = sh.opts.max_bandwidth.filter(|&c| c > 0) {
        let due = Duration::from_secs_f64(sent as f64 / cap as f64);
        if let Some(wait) = due.checked_sub(sh.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}
