//! The sending side: a coordinator (this thread) decides passes and switch-over; one sender
//! thread per data connection re-arms, reads, encodes and sends pages, claiming the pass's
//! page set 4096 pages at a time from a shared cursor so fast connections carry more.
use super::storage::StorageSource;
use super::{
    ok, CommitHold, EngineError, Monitor, Options, PageSet, Pass, Phase, Report, SourceVm,
    TimeoutPolicy,
};
use crate::protocol::{
    expect, recv, send, Hello, Message, ProtocolError, CAP_SEEDED, CAP_STORAGE, KIND_ABORT, MAGIC,
    MAX_CONNECTIONS, MAX_RANGES, VERSION,
};
use crate::transport::{Conn, Peek};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A predicted downtime so short that another pass is not worth it.
const GOOD_ENOUGH: Duration = Duration::from_millis(1);
/// What the switch-over costs besides the pages, the last harvest and one round trip (vCPU and
/// device state saved, sent and loaded, Commit and Resumed exchanged): a flat figure from this
/// host's switch-over timelines with the test guest; the prediction adds it.
const SWITCH_FIXED: Duration = Duration::from_micros(600);
/// First throttle step of auto-converge, the step after it, and the ceiling (percent).
const THROTTLE_START: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 99;

pub(super) struct Shared<'a> {
    pub(super) opts: &'a Options,
    pub(super) mon: &'a Monitor,
    /// When the bytes sent so far by all senders are due at the bandwidth cap.
    due: Mutex<Instant>,
}

/// Credit an idle link may bank under a bandwidth cap: after a pause (a post-copy reconnect,
/// a pass waiting for the dirty log) the senders go at the cap, not in a burst above it.
const BURST: Duration = Duration::from_millis(50);

impl<'a> Shared<'a> {
    pub(super) fn new(opts: &'a Options, mon: &'a Monitor) -> Self {
        Shared {
            opts,
            mon,
            due: Mutex::new(Instant::now()),
        }
    }

    /// Books `n` bytes against the cap; returns how long the sender should wait.
    pub(super) fn pace(&self, n: u64, cap: u64) -> Option<Duration> {
        let now = Instant::now();
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        let from = now
            .checked_sub(BURST)
            .map_or(*due, |floor| (*due).max(floor));
        *due = from + Duration::from_secs_f64(n as f64 / cap as f64);
        due.checked_duration_since(now)
    }
}

pub(super) use super::sender::flush;
use super::sender::{sender, Done, Job};

/// Opens one more connection to the destination (a data connection, or a post-copy
/// reconnect).
pub type Connect<'c> = &'c (dyn Fn() -> std::io::Result<Conn> + Sync);

/// Every send and receive on `c` fails after `t` without progress.
pub(super) fn deadlines(c: &Conn, t: Duration) -> Result<(), ProtocolError> {
    c.set_io_timeout(t).map_err(ProtocolError::Io)
}

/// Sends `vm` to the destination whose control connection is `ctl`; `connect` opens each data
/// connection. On error before commit the VM is running again (unthrottled) when this returns.
pub fn migrate<V: SourceVm>(
    vm: &V,
    mut ctl: Conn,
    connect: Connect,
    opts: &Options,
    mon: &Monitor,
) -> Result<Report, EngineError> {
    let mut undo = Undo::default();
    let r = deadlines(&ctl, opts.io_timeout);
    if let Err(e) = r {
        let r = Err(e.into());
        mon.finish(&r);
        return r;
    }
    let mut r = run_source(vm, &mut ctl, connect, opts, mon, &mut undo);
    if matches!(&r, Err(EngineError::Protocol(e)) if e.is_connection_loss()) {
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
        Err(e @ EngineError::HandOverInDoubt(_)) => {
            // No Commit went: the destination discards the VM; this one stays paused.
            if !undo.told {
                let _ = send(&mut ctl, &Message::Abort(e.to_string()));
            }
        }
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

/// Looks at the control connection `c` without waiting: the destination's Abort, or its end,
/// means it is gone. An acknowledgement waiting there is left for its reader.
pub(super) fn destination_gone(c: &Conn) -> Option<EngineError> {
    match c.peek_now() {
        Ok(Peek::Closed) => Some(ProtocolError::Closed.into()),
        Ok(Peek::Byte(KIND_ABORT)) => match recv(&mut &*c) {
            Ok(Message::Abort(why)) => Some(ProtocolError::Peer(why).into()),
            Ok(_) => None,
            Err(e) => Some(e.into()),
        },
        Ok(_) => None,
        Err(e) => Some(ProtocolError::Io(e).into()),
    }
}

/// Opens the `n` data connections of `session`.
pub(super) fn join_data(
    connect: Connect,
    session: u64,
    n: u32,
    io_timeout: Duration,
) -> Result<Vec<Conn>, EngineError> {
    let mut streams = Vec::new();
    for index in 0..n {
        let mut s = connect().map_err(ProtocolError::Io)?;
        deadlines(&s, io_timeout)?;
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
    ctl: &mut Conn,
    connect: Connect,
    opts: &Options,
    mon: &Monitor,
    undo: &mut Undo,
) -> Result<Report, EngineError> {
    let t0 = Instant::now();
    let n = opts.connections.clamp(1, MAX_CONNECTIONS);
    let session = session_id();
    let specs = super::storage::offer(vm, opts)?;
    if opts.seeded && opts.postcopy_after == Some(0) {
        return Err(EngineError::Vm(
            "a seeded migration compares pages in a first pass: post-copy after 0 passes \
             sends none (use --postcopy-after 1 or more)"
                .into(),
        ));
    }
    let mut caps = if specs.is_some() { CAP_STORAGE } else { 0 };
    if opts.seeded {
        caps |= CAP_SEEDED;
    }
    send(
        ctl,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps,
            session,
            connections: n,
            config: vm.config(),
        }),
    )?;
    expect(ctl, Message::Welcome).map_err(|e| match e {
        // Before Welcome the destination has not looked at the VM: it refused the connection.
        ProtocolError::Closed => EngineError::Refused(
            "it closed the connection: does it expect TLS, or plain TCP (--insecure)?".into(),
        ),
        ProtocolError::Io(e) => EngineError::Refused(e.to_string()),
        e => e.into(),
    })?;
    let plan = if opts.seeded {
        Some(super::seeded::choose(vm, ctl)?)
    } else {
        None
    };
    let streams = join_data(connect, session, n, opts.io_timeout)?;
    let disks = match specs {
        Some(s) => Some(StorageSource::start(
            ctl,
            s,
            connect,
            session,
            n,
            opts.io_timeout,
        )?),
        None => None,
    };
    let r = run_passes(
        vm,
        ctl,
        streams,
        connect,
        opts,
        mon,
        undo,
        (t0, session, n),
        disks.as_ref(),
        plan.as_ref(),
    );
    if r.is_err() {
        if let Some(d) = &disks {
            // A mirror stuck in a write on a dead link lets go; the disks are the VM's own.
            d.shutdown();
        }
        vm.unmirror_disks();
    }
    let mut report = r?;
    report.storage = disks.map(|d| d.figures());
    Ok(report)
}

/// The storage bulk copy, the memory passes, the switch-over and, if asked, post-copy.
#[allow(clippy::too_many_arguments)]
fn run_passes<V: SourceVm>(
    vm: &V,
    ctl: &mut Conn,
    streams: Vec<Conn>,
    connect: Connect,
    opts: &Options,
    mon: &Monitor,
    undo: &mut Undo,
    (t0, session, n): (Instant, u64, u32),
    disks: Option<&StorageSource>,
    plan: Option<&super::seeded::Plan>,
) -> Result<Report, EngineError> {
    let no_held = super::seeded::Held::new();
    let (held, by_log) = match plan {
        Some(super::seeded::Plan::Hashes(h)) => (h, false),
        Some(super::seeded::Plan::DirtyLog) => (&no_held, true),
        None => (&no_held, false),
    };
    if let Some(d) = disks {
        d.bulk(vm, ctl, mon)?;
    }
    // Clones to unblock senders stuck in a write when the migration fails.
    let handles: Vec<Conn> = streams.iter().filter_map(|s| s.try_clone().ok()).collect();
    // Post-copy at once sends no pass: what to fetch is read after the pause, so no dirty
    // log (its first harvest write-protects all of memory: ~60 ms per GiB here).
    let at_once = opts.postcopy_after == Some(0);
    if !at_once {
        ok(vm.start_dirty_log())?;
    }
    let sh = Shared::new(opts, mon);
    let set = PageSet::new(vm.memory_end()).map_err(EngineError::Vm)?;
    let none = PageSet::new(0).map_err(EngineError::Vm)?;
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
            set: &set,
            none: &none,
            disks,
            held,
            by_log,
        };
        let r = coord.run(ctl, t0, &mut undo.paused);
        if let Err(e) = &r {
            if !matches!(e, EngineError::Protocol(p) if p.is_connection_loss()) {
                // Our own reason goes first, before the data connections close under the
                // destination.
                let _ = send(ctl, &Message::Abort(e.to_string()));
                undo.told = true;
            }
            for h in &handles {
                h.shutdown();
            }
        }
        drop(coord);
        let streams: Vec<Conn> = senders.into_iter().filter_map(|h| h.join().ok()).collect();
        (r, streams)
    });
    let (mut report, postcopy) = r?;
    if !postcopy {
        return Ok(report);
    }
    // Committed: the VM runs on the destination, which fetches what it lacks from here.
    let streams = if streams.len() == n as usize {
        streams
    } else {
        Vec::new() // a sender thread panicked: reconnect for fresh data connections
    };
    let pc = super::postcopy_src::PostCopySource::new(vm, opts, mon, session, n);
    report.postcopy = Some(pc.run(set, ctl, streams, connect, report.downtime_ms)?);
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    report.wire_bytes = mon.wire_bytes.load(Ordering::Relaxed);
    Ok(report)
}

struct Coordinator<'a, 's, V> {
    vm: &'a V,
    sh: &'a Shared<'a>,
    jobs: Vec<mpsc::Sender<Arc<Job<'s>>>>,
    done: mpsc::Receiver<Done>,
    /// The control connection, watched during passes for the destination's Abort or end.
    watch: Option<Conn>,
    /// The data connections, shut down to free senders stuck in a write.
    handles: &'a [Conn],
    /// What the next pass sends: filled by the harvests, emptied by the senders.
    set: &'s PageSet,
    /// An empty set: the last pass of a post-copy carries no page.
    none: &'s PageSet,
    /// The disks' link, when they come too: their last sync is part of the switch-over.
    disks: Option<&'a StorageSource>,
    /// The destination's seeded pages (empty unless seeded).
    held: &'s super::seeded::Held,
    /// Seeded by the dirty log: pass 1 sends what changed since the seed.
    by_log: bool,
}

impl<'s, V: SourceVm> Coordinator<'_, 's, V> {
    /// Pre-copy passes, then the switch-over. Returns the report and whether it switched over
    /// to post-copy (the pages the destination still lacks are then left in `self.set`).
    fn run(
        &self,
        ctl: &mut Conn,
        t0: Instant,
        paused: &mut bool,
    ) -> Result<(Report, bool), EngineError> {
        let (vm, opts, mon, set) = (self.vm, self.sh.opts, self.sh.mon, self.set);
        let deadline = opts.timeout.map(|t| t0 + t);
        let mut report = Report {
            connections: self.jobs.len() as u32,
            seed_offered_pages: self.held.len() as u64,
            seed_by_dirty_log: self.by_log,
            ..Report::default()
        };
        if self.by_log {
            ok(vm.changed_since_seed(set))?;
        } else {
            ok(vm.populated(set))?;
        }
        // A page the seed holds that the guest never wrote here is zero now: it goes too.
        for &gpa in self.held.keys() {
            ok(set.insert(gpa))?;
        }
        if opts.postcopy_after != Some(0) {
            // Not worth it when no page will be sent before the switch. A hint: one frame.
            let mut first = Vec::new();
            let _ = set.for_each_frame(MAX_RANGES, None, |runs| {
                first = runs;
                Err(())
            });
            send(ctl, &Message::Populated(first))?;
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
            mon.begin_pass(number, set.len(), Phase::PreCopy);
            let start = Instant::now();
            let (mut pass, cut) = self.pass(number, set, false, deadline)?;
            let sent_at = Instant::now();
            expect_ack(ctl, number)?;
            let ack = sent_at.elapsed();
            let secs = start.elapsed().as_secs_f64().max(1e-6);
            pass.ms = secs * 1e3;
            pass.throttle_percent = throttle;
            let left = set.len();
            let harvest_start = Instant::now();
            ok(vm.fetch_dirty(set))?;
            let harvest = harvest_start.elapsed();
            pass.harvest_ms = harvest.as_secs_f64() * 1e3;
            let dirty = set.len();
            pass.dirty_pages_per_s = (dirty - left) as f64 / secs;
            if pass.pages > 0 {
                rate = pass.pages as f64 / secs;
                bandwidth = pass.wire_bytes as f64 / secs;
                live_bytes += pass.wire_bytes;
                live_secs += secs;
            }
            let sent = pass.pages;
            report.seeded_pages += pass.seeded_pages;
            report.passes.push(pass.clone());
            // The pause sends what is dirty now, after one more harvest like this one, then
            // the state, and waits for the destination's answers (one acknowledgement's
            // round trip at least).
            let predicted = dirty as f64 / rate
                + harvest.as_secs_f64()
                + ack.as_secs_f64()
                + SWITCH_FIXED.as_secs_f64();
            report.predicted_downtime_ms = predicted * 1e3;
            mon.update(|s| {
                s.bandwidth_bytes_per_s = bandwidth;
                s.dirty_pages_per_s = pass.dirty_pages_per_s;
                s.dirty_pages = dirty;
            });
            if cut {
                report.switch_reason = "timeout".into();
                postcopy = opts.auto_postcopy;
                break;
            }
            // The limit is a ceiling, not a target: while each pass still halves the dirty
            // set, one more (short) pass buys a shorter pause.
            let halving = dirty * 2 <= sent;
            if predicted <= opts.downtime_limit.as_secs_f64()
                && (!halving || predicted <= GOOD_ENOUGH.as_secs_f64())
            {
                report.switch_reason = "converged".into();
                break;
            }
            let stuck = number >= 2 && dirty > sent / 2;
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
            let frames = send_runs(ctl, set, Message::Discard)?;
            for _ in 0..frames {
                expect(ctl, Message::Discarded)?;
            }
        }
        // Switch-over.
        if let Some(d) = self.disks {
            // What the guest wrote to its disks during the passes goes to the destination's
            // disk now, while the guest still runs: the sync in the pause has only the last
            // moments' writes left to make durable.
            d.presync()?;
        }
        ok(vm.before_pause())?;
        let t_pause = Instant::now();
        ok(vm.pause())?;
        *paused = true;
        if report.passes.is_empty() && opts.postcopy_after == Some(0) {
            // Nothing sent yet, no dirty log: every page the guest may have written.
            ok(vm.populated(set))?;
        } else {
            ok(vm.fetch_dirty(set))?;
        }
        let number = report.passes.len() as u32 + 1;
        let t_paused = t_pause.elapsed();
        // Post-copy: the last pass is empty (it only ends the pre-copy on every data
        // connection); the pages it would carry are named instead and fetched later.
        let last = if postcopy { self.none } else { set };
        mon.begin_pass(number, last.len(), Phase::SwitchOver);
        let (mut pass, _) = self.pass(number, last, true, None)?;
        if let Some(d) = self.disks {
            d.finish(vm)?;
        }
        let t_pages = t_pause.elapsed();
        pass.ms = t_pause.elapsed().as_secs_f64() * 1e3;
        pass.harvest_ms = t_paused.as_secs_f64() * 1e3;
        pass.throttle_percent = throttle;
        report.passes.push(pass);
        let state = ok(vm.save_state())?;
        let t_state = t_pause.elapsed();
        if postcopy {
            send_runs(ctl, set, Message::Missing)?;
        }
        send(ctl, &Message::State(state))?;
        expect_ack(ctl, number)?;
        let t_ack = t_pause.elapsed();
        expect(ctl, Message::Ready)?;
        let t_ready = t_pause.elapsed();
        match vm.before_commit() {
            Ok(()) => {}
            Err(CommitHold::Refused(why)) => return Err(EngineError::Vm(why)),
            Err(CommitHold::InDoubt(why)) => return Err(EngineError::HandOverInDoubt(why)),
        }
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
        Ok((report, postcopy))
    }

    /// Looks at the control connection without waiting: the destination's Abort, or its
    /// end, means it is gone. An acknowledgement waiting there is left for its reader.
    fn destination_gone(&self) -> Option<EngineError> {
        destination_gone(self.watch.as_ref()?)
    }

    /// Runs one pass of `set` on every connection. Returns its figures and whether the
    /// deadline cut it short under the switch-over policy (what it did not send is still in
    /// `set`).
    fn pass(
        &self,
        number: u32,
        set: &'s PageSet,
        last: bool,
        deadline: Option<Instant>,
    ) -> Result<(Pass, bool), EngineError> {
        let job = Arc::new(Job {
            pass: number,
            set,
            next: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
            last,
            held: (number == 1 && !self.held.is_empty()).then_some(self.held),
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
                    total.seeded_pages += p.seeded_pages;
                }
                Ok(Err(e)) => {
                    got += 1;
                    job.cut.store(true, Ordering::SeqCst);
                    if first_err.is_none() {
                        // The migration has failed: a sender blocked on a connection nobody
                        // reads any more must not keep the source waiting.
                        for h in self.handles {
                            h.shutdown();
                        }
                    }
                    first_err.get_or_insert(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if first_err.is_none() {
                        if let Some(e) = self.destination_gone() {
                            // Senders may be blocked on full buffers nobody reads any more.
                            job.cut.store(true, Ordering::SeqCst);
                            for h in self.handles {
                                h.shutdown();
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
            return Ok((total, false));
        }
        match self.sh.opts.on_timeout {
            TimeoutPolicy::Cancel => Err(EngineError::Timeout(
                self.sh.opts.timeout.unwrap_or_default(),
            )),
            TimeoutPolicy::SwitchOver => Ok((total, true)),
        }
    }
}

/// Sends `set` as runs, as many `message` frames as they take; returns how many.
fn send_runs(
    ctl: &mut Conn,
    set: &PageSet,
    message: fn(Vec<(u64, u64)>) -> Message,
) -> Result<usize, ProtocolError> {
    let mut frames = 0;
    set.for_each_frame(MAX_RANGES, None, |runs| {
        frames += 1;
        send(ctl, &message(runs))
    })?;
    Ok(frames)
}

/// Waits for the destination to confirm it has written every page of pass `number`.
fn expect_ack(ctl: &mut Conn, number: u32) -> Result<(), EngineError> {
    match recv(ctl)? {
        Message::EndOfPass { pass, .. } if pass == number => Ok(()),
        Message::Abort(why) => Err(ProtocolError::Peer(why).into()),
        m => Err(m.unexpected("EndOfPass").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_capped_link_banks_no_more_than_a_burst() {
        let (opts, mon) = (Options::default(), Monitor::default());
        let sh = Shared::new(&opts, &mon);
        std::thread::sleep(Duration::from_millis(300));
        // 1 MB at 1 MB/s after 300 ms idle: 50 ms of credit, then the sender waits the rest.
        let w = sh.pace(1_000_000, 1_000_000).expect("a wait");
        assert!(
            w > Duration::from_millis(900) && w <= Duration::from_secs(1),
            "{w:?}"
        );
        // Back to back, the next megabyte is due a second later still.
        let w = sh.pace(1_000_000, 1_000_000).expect("a wait");
        assert!(w > Duration::from_millis(1900), "{w:?}");
    }
}
