//! Post-copy, destination side. The VM runs here while some of its pages are still at the
//! source. A fault thread takes every touch of a missing page: a page the source will send is
//! asked for on the control connection (a demand request), any other page was never written
//! and is filled with zeros here. Receivers install the background push from the data
//! connections, a reader installs demand answers from the control connection; installing a
//! page wakes whoever waits for it. When the link breaks, vCPUs that touch a missing page wait
//! (the others run on) and the listener waits for the source to reconnect; the pages still
//! missing are named to it and the transfer goes on.
use super::acceptor::Acceptor;
use super::destination::accept_data;
use super::pageset::PageSet;
use super::{ok, DestinationVm, EngineError};
use crate::protocol::{
    for_each_page, parse, recv_raw, send, Message, PageRef, PostCopyFigures, ProtocolError,
    CAP_RESUME, KIND_PAGES, MAX_CONNECTIONS, MAX_RANGES, PAGE,
};
use crate::transport::Conn;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A demand request unanswered for this long means the link is dead even if TCP has not said
/// so: the connections are dropped and the source reconnects.
const DEMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// After `PostCopyDone`, how long the source has to close its connections.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub(super) struct PostCopyDest<'a, V> {
    vm: &'a V,
    /// Pages still missing here.
    set: PageSet,
    session: u64,
    /// Pages asked for and not yet installed, with when they were first asked for.
    requested: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    faults: AtomicU64,
    zero_faults: AtomicU64,
    pulled: AtomicU64,
    pushed: AtomicU64,
    /// Where demand requests go (None while the link is down).
    ctl_out: Mutex<Option<Conn>>,
    stop: AtomicBool,
    fatal: Mutex<Option<String>>,
}

impl<'a, V: DestinationVm> PostCopyDest<'a, V> {
    pub(super) fn new(vm: &'a V, set: PageSet, session: u64) -> Self {
        PostCopyDest {
            vm,
            set,
            session,
            requested: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            ctl_out: Mutex::new(None),
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }

    /// Resumes the VM (the caller has committed), tells the source, and serves faults until
    /// every page is in.
    pub(super) fn run(
        &self,
        ctl: Conn,
        streams: Vec<Conn>,
        acc: &Acceptor,
    ) -> Result<PostCopyFigures, EngineError> {
        let t0 = Instant::now();
        let r = std::thread::scope(|scope| {
            let faults = scope.spawn(|| self.fault_loop());
            let r = self.resume_and_serve(ctl, streams, acc);
            self.stop.store(true, Ordering::SeqCst);
            let _ = faults.join();
            r
        });
        let end = ok(self.vm.end_postcopy());
        let f = r?;
        end?;
        tracing::debug!(ms = ?t0.elapsed(), "post-copy finished on the destination");
        Ok(f)
    }

    fn resume_and_serve(
        &self,
        mut ctl: Conn,
        streams: Vec<Conn>,
        acc: &Acceptor,
    ) -> Result<PostCopyFigures, EngineError> {
        ok(self.vm.resume())?;
        // From here on the VM runs here: a failure below is waited out, never rolled back.
        let mut link = match send(&mut ctl, &Message::Resumed) {
            Ok(()) => Some((ctl, streams)),
            Err(e) => {
                tracing::warn!("post-copy: telling the source the VM runs here failed: {e}");
                None
            }
        };
        loop {
            if let Some((c, s)) = link.take() {
                match self.round(c, s) {
                    Ok(()) => return Ok(self.figures()),
                    Err(e @ EngineError::PostCopy(_)) => return Err(e),
                    Err(e) => tracing::warn!(
                        "post-copy link lost ({e}); {} pages missing; vCPUs that touch one wait \
                         until the source reconnects",
                        self.set.len()
                    ),
                }
            }
            link = Some(self.accept_resume(acc)?);
        }
    }

    fn figures(&self) -> PostCopyFigures {
        let mut l = self
            .latencies_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        l.sort_unstable();
        let pct = |p: usize| {
            if l.is_empty() {
                0
            } else {
                l[((l.len() - 1) * p) / 100]
            }
        };
        PostCopyFigures {
            faults: self.faults.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            pulled: self.pulled.load(Ordering::Relaxed),
            pushed: self.pushed.load(Ordering::Relaxed),
            latency_p50_us: pct(50),
            latency_p99_us: pct(99),
            latency_max_us: l.last().copied().unwrap_or(0),
        }
    }

    /// Takes every fault on a missing page until stopped.
    fn fault_loop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            match self.vm.next_fault(Duration::from_millis(20)) {
                Ok(Some(gpa)) => {
                    if let Err(e) = self.on_fault(gpa) {
                        *self.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    *self.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return;
                }
            }
        }
    }

    fn on_fault(&self, gpa: u64) -> Result<(), String> {
        if !self.set.contains(gpa) {
            // Never written at the source (or installed a moment ago: then this is a no-op).
            if self.vm.install_zero(gpa)? {
                self.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        let first = {
            let mut r = self.requested.lock().unwrap_or_else(|e| e.into_inner());
            let first = !r.contains_key(&gpa);
            r.entry(gpa).or_insert_with(Instant::now);
            first
        };
        if !first {
            return Ok(());
        }
        if !self.set.contains(gpa) {
            // Installed between the two looks: whoever installed it missed our entry.
            self.requested
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&gpa);
            return Ok(());
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.demand(&[gpa]);
        Ok(())
    }

    /// Asks the source for pages; while the link is down the request waits for the reconnect.
    fn demand(&self, gpas: &[u64]) {
        let mut g = self.ctl_out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_mut() {
            if send(c, &Message::Demand(gpas.to_vec())).is_err() {
                *g = None;
            }
        }
    }

    /// Installs the run of pages collected in `run` (pushed or pulled).
    fn install_run(&self, run: &mut Run, pulled: bool) -> Result<(), String> {
        if run.pages == 0 {
            return Ok(());
        }
        let mask = self
            .vm
            .install_pages(run.gpa, &run.buf[..run.pages * PAGE])?;
        self.arrived(run.gpa, run.pages, mask, pulled);
        run.pages = 0;
        Ok(())
    }

    /// Books `pages` consecutive pages from `gpa` that arrived (`installed`: bit k set when
    /// page k was installed by this call): each counted once, by whoever installed it first,
    /// and the latency of any demand that waited for one.
    fn arrived(&self, gpa: u64, pages: usize, installed: u64, pulled: bool) {
        let c = if pulled { &self.pulled } else { &self.pushed };
        for k in 0..pages {
            if installed & (1 << k) != 0 && self.set.take(gpa + (k * PAGE) as u64) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut r = self.requested.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_empty() {
            return;
        }
        let mut l = self.latencies_us.lock().unwrap_or_else(|e| e.into_inner());
        for k in 0..pages {
            if let Some(t) = r.remove(&(gpa + (k * PAGE) as u64)) {
                l.push(t.elapsed().as_micros() as u64);
            }
        }
    }

    /// Installs every page of a `Pages` frame: consecutive data pages a run (one ioctl) at a
    /// time, zero pages as the shared zero page (no memory allocated for them).
    fn install_frame(&self, frame: &[u8], run: &mut Run, pulled: bool) -> Result<(), EngineError> {
        let pc = EngineError::PostCopy;
        for_each_page(frame, |gpa, d| {
            let next = run.gpa + (run.pages * PAGE) as u64;
            let zero = matches!(d, PageRef::Zero);
            if run.pages == RUN_PAGES || (run.pages > 0 && (next != gpa || zero)) {
                self.install_run(run, pulled).map_err(pc)?;
            }
            if zero {
                let installed = self.vm.install_zero(gpa).map_err(pc)?;
                self.arrived(gpa, 1, installed as u64, pulled);
                return Ok(());
            }
            if run.pages == 0 {
                run.gpa = gpa;
            }
            let at = run.pages * PAGE;
            d.decode(&mut run.buf[at..at + PAGE])?;
            run.pages += 1;
            Ok::<(), EngineError>(())
        })?;
        self.install_run(run, pulled).map_err(pc)
    }

    /// One connection set: receivers on the data connections, a reader on the control
    /// connection. Ok once every page is in and the source has been told.
    fn round(&self, ctl: Conn, streams: Vec<Conn>) -> Result<(), EngineError> {
        let mut handles: Vec<Conn> = streams.iter().filter_map(|s| s.try_clone().ok()).collect();
        handles.push(ctl.try_clone().map_err(ProtocolError::Io)?);
        *self.ctl_out.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(ctl.try_clone().map_err(ProtocolError::Io)?);
        // Pages asked for before the link broke are asked for again.
        let waiting: Vec<u64> = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for chunk in waiting.chunks(4096) {
            self.demand(chunk);
        }
        // Those demands are as old as this link, whatever their vCPUs have waited.
        let asked = Instant::now();
        let broken: Mutex<Option<EngineError>> = Mutex::new(None);
        let done = AtomicBool::new(false);
        let fail = |e: EngineError| {
            if !done.load(Ordering::SeqCst) {
                broken
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
        };
        std::thread::scope(|scope| {
            let mut readers = Vec::new();
            for mut s in streams {
                let fail = &fail;
                readers.push(scope.spawn(move || {
                    if let Err(e) = self.receive_pages(&mut s, false) {
                        fail(e);
                    }
                }));
            }
            let fail = &fail;
            readers.push(scope.spawn(move || {
                let mut c = ctl;
                if let Err(e) = self.receive_pages(&mut c, true) {
                    fail(e);
                }
            }));
            let r = self.watch(&broken, &done, asked);
            if r.is_err() {
                for h in &handles {
                    h.shutdown();
                }
            } else {
                // Let the source read PostCopyDone and close first; then make sure.
                let until = Instant::now() + CLOSE_GRACE;
                while readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                for h in &handles {
                    h.shutdown();
                }
            }
            for r in readers {
                let _ = r.join();
            }
            *self.ctl_out.lock().unwrap_or_else(|e| e.into_inner()) = None;
            r
        })
    }

    /// Waits until every page is in (then tells the source) or the link breaks: a page asked
    /// for on this link (whose demands were all sent again at `asked`) that does not come
    /// within [`DEMAND_TIMEOUT`] means the link is dead.
    fn watch(
        &self,
        broken: &Mutex<Option<EngineError>>,
        done: &AtomicBool,
        asked: Instant,
    ) -> Result<(), EngineError> {
        loop {
            if let Some(e) = self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(EngineError::PostCopy(e));
            }
            if let Some(e) = broken.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(e);
            }
            if self.set.is_empty() {
                done.store(true, Ordering::SeqCst);
                let mut g = self.ctl_out.lock().unwrap_or_else(|e| e.into_inner());
                let c = g.as_mut().ok_or(ProtocolError::Closed)?;
                send(c, &Message::PostCopyDone(self.figures()))?;
                return Ok(());
            }
            let oldest = self
                .requested
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .min()
                .copied();
            if oldest.is_some_and(|t| t.max(asked).elapsed() > DEMAND_TIMEOUT) {
                return Err(EngineError::Stalled(format!(
                    "a page asked for {DEMAND_TIMEOUT:?} ago has not come: the link is dead"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Installs the pages arriving on one connection: the background push on a data
    /// connection (until its final EndOfPass), or the demand answers on the control
    /// connection (`pulled`; until the source closes it).
    fn receive_pages(&self, s: &mut Conn, pulled: bool) -> Result<(), EngineError> {
        s.set_read_timeout(None).map_err(ProtocolError::Io)?;
        let mut frame = Vec::new();
        let mut run = Run::default();
        loop {
            let kind = recv_raw(s, &mut frame)?;
            if kind == KIND_PAGES {
                self.install_frame(&frame, &mut run, pulled)?;
                continue;
            }
            match parse(kind, std::mem::take(&mut frame))? {
                Message::EndOfPass { last: true, .. } if !pulled => return Ok(()),
                Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
                m => return Err(m.unexpected("Pages or EndOfPass").into()),
            }
        }
    }

    /// Waits for the source to reconnect: its `Hello` must name this migration. Any other
    /// Hello is turned away; a reconnect whose data connections do not all join is abandoned
    /// as soon as a newer Hello arrives.
    fn accept_resume(&self, acc: &Acceptor) -> Result<(Conn, Vec<Conn>), EngineError> {
        loop {
            if let Some(e) = self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(EngineError::PostCopy(e));
            }
            let Some(i) = acc.next_hello(Some(Duration::from_millis(200))) else {
                continue;
            };
            let (mut c, peer) = (i.conn, i.peer);
            let Message::Hello(hello) = i.first else {
                continue;
            };
            let n = hello.connections;
            if hello.caps & CAP_RESUME == 0
                || hello.session != self.session
                || n == 0
                || n > MAX_CONNECTIONS
            {
                let _ = send(
                    &mut c,
                    &Message::Abort(
                        "this host is finishing the post-copy of another migration".into(),
                    ),
                );
                continue;
            }
            let r = (|| {
                for runs in self.set.runs(MAX_RANGES) {
                    send(&mut c, &Message::Missing(runs))?;
                }
                send(&mut c, &Message::Welcome)?;
                accept_data(acc, self.session, n, true)
            })();
            match r {
                Ok(data) => {
                    tracing::info!(%peer, missing = self.set.len(), "post-copy link re-established");
                    return Ok((c, data));
                }
                Err(e) => tracing::warn!("post-copy reconnect from {peer} failed: {e}"),
            }
        }
    }
}

/// Pages installed with one call at most.
const RUN_PAGES: usize = 64;

/// Consecutive pages decoded and waiting to be installed together.
struct Run {
    gpa: u64,
    pages: usize,
    buf: Vec<u8>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            gpa: 0,
            pages: 0,
            buf: vec![0; RUN_PAGES * PAGE],
        }
    }
}
