//! Post-copy, source side. The VM runs on the destination and stays paused here; the pages it
//! lacks live only here until they are sent. Two paths carry them: the data connections push
//! every missing page in the background (each pusher claims 64 neighbouring pages at a time),
//! and the control connection answers the destination's demand requests at once, ahead of
//! the push; after each demand the push jumps to that neighbourhood, where the next faults
//! are likely. When a connection breaks, nothing is given up: the source reconnects (every
//! second, or at once when asked through [`Monitor::resume_postcopy`]), the destination names
//! the pages it still lacks, and the push goes on from there.
use super::pageset::PageSet;
use super::source::{deadlines, flush, join_data, Connect, Shared};
use super::{EngineError, Monitor, Options, Phase, PostCopyReport, SourceVm};
use crate::protocol::{
    recv, send, Compression, Hello, Message, PagesBuf, PostCopyFigures, ProtocolError, CAP_RESUME,
    MAGIC, MAX_BATCH, VERSION,
};
use crate::transport::Conn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How often a broken post-copy tries to reconnect by itself.
const RETRY: Duration = Duration::from_secs(1);

pub(super) struct PostCopySource<'a, V> {
    vm: &'a V,
    sh: Shared<'a>,
    session: u64,
    connections: u32,
    pushed: AtomicU64,
    demanded: AtomicU64,
}

impl<'a, V: SourceVm> PostCopySource<'a, V> {
    pub(super) fn new(
        vm: &'a V,
        opts: &'a Options,
        mon: &'a Monitor,
        session: u64,
        connections: u32,
    ) -> Self {
        PostCopySource {
            vm,
            sh: Shared::new(opts, mon),
            session,
            connections,
            pushed: AtomicU64::new(0),
            demanded: AtomicU64::new(0),
        }
    }

    /// Sends the pages of `set` until the destination holds every page; `down_ms` is the switch-over's
    /// downtime (pause to resume), the start of the "released" clock.
    pub(super) fn run(
        &self,
        mut set: PageSet,
        ctl: &mut Conn,
        streams: Vec<Conn>,
        connect: Connect,
        down_ms: f64,
    ) -> Result<PostCopyReport, EngineError> {
        let t0 = Instant::now();
        let mon = self.sh.mon;
        let pages = set.len();
        let mut recoveries = 0u32;
        let mut link = match ctl.try_clone() {
            Ok(c) if !streams.is_empty() => Some((c, streams)),
            _ => None,
        };
        let figures = loop {
            mon.begin_pass(0, set.len(), Phase::PostCopy);
            let r = match link.take() {
                Some((mut c, s)) => self.round(&set, &mut c, s),
                None => Err(EngineError::Protocol(ProtocolError::Closed)),
            };
            let e = match r {
                Ok(f) => break f,
                // Not the link: this side cannot go on (a page it cannot read).
                Err(e @ EngineError::PostCopy(_)) => return Err(e),
                Err(e) => e,
            };
            tracing::warn!("post-copy link lost ({e}); reconnecting");
            mon.update(|s| {
                s.phase = Phase::PostCopyPaused;
                s.error = Some(format!("link lost: {e}; reconnecting"));
            });
            let (c, s, missing) = self.reconnect(connect);
            set = missing;
            link = Some((c, s));
            recoveries += 1;
            mon.update(|s| s.error = None);
        };
        let pc_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(PostCopyReport {
            pages,
            pushed: self.pushed.load(Ordering::Relaxed),
            demanded: self.demanded.load(Ordering::Relaxed),
            destination: figures,
            released_ms: down_ms + pc_ms,
            postcopy_ms: pc_ms,
            recoveries,
        })
    }

    /// One connection set's worth of post-copy: pushers on the data connections, the demand
    /// server on the control connection. Ends when the destination has every page, or when a
    /// connection breaks.
    fn round(
        &self,
        set: &PageSet,
        ctl: &mut Conn,
        streams: Vec<Conn>,
    ) -> Result<PostCopyFigures, EngineError> {
        let cursor = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let mut handles: Vec<Conn> = streams.iter().filter_map(|s| s.try_clone().ok()).collect();
        handles.extend(ctl.try_clone().ok());
        let stop_all = || {
            failed.store(true, Ordering::SeqCst);
            for h in &handles {
                h.shutdown();
            }
        };
        std::thread::scope(|scope| {
            let pushers: Vec<_> = streams
                .into_iter()
                .map(|s| {
                    let (cursor, failed, done, stop_all) = (&cursor, &failed, &done, &stop_all);
                    scope.spawn(move || {
                        let r = self.push(set, cursor, s, failed);
                        if r.is_err() && !done.load(Ordering::SeqCst) {
                            stop_all();
                        }
                        r
                    })
                })
                .collect();
            let r = self.serve_demands(set, &cursor, ctl, &failed);
            match &r {
                Ok(_) => done.store(true, Ordering::SeqCst),
                Err(_) => stop_all(),
            }
            let mut first = None;
            for p in pushers {
                match p.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first.get_or_insert(e);
                    }
                    Err(_) => {
                        first.get_or_insert(EngineError::PostCopy("a pusher panicked".into()));
                    }
                }
            }
            match (r, first) {
                // Once the destination has every page, a pusher cut short no longer matters.
                (Ok(f), _) => Ok(f),
                // The demand server stopped because a pusher failed: that is the cause.
                (Err(EngineError::Aborted), Some(e)) => Err(e),
                (Err(e), _) => Err(e),
            }
        })
    }

    /// Background push on one data connection until no page is left to claim.
    fn push(
        &self,
        set: &PageSet,
        cursor: &AtomicUsize,
        mut s: Conn,
        failed: &AtomicBool,
    ) -> Result<(), EngineError> {
        let mut frame = PagesBuf::default();
        let words = set.words();
        loop {
            if failed.load(Ordering::SeqCst) {
                return Err(EngineError::Aborted);
            }
            let mut w = cursor.fetch_add(1, Ordering::SeqCst);
            if w >= words {
                // The end: sweep up what was skipped when a demand moved the cursor.
                match set.next_word(0) {
                    None => break,
                    Some(x) => {
                        cursor.store(x + 1, Ordering::SeqCst);
                        w = x;
                    }
                }
            }
            let bits = set.take_word(w);
            for gpa in PageSet::pages_of(w, bits) {
                frame
                    .push_with(gpa, self.sh.opts.compression, |b| self.vm.read_page(gpa, b))
                    .map_err(EngineError::PostCopy)?;
                if frame.pages() >= MAX_BATCH {
                    flush(&mut s, &mut frame, &self.sh)?;
                }
            }
            let n = bits.count_ones() as u64;
            self.pushed.fetch_add(n, Ordering::Relaxed);
            self.sh.mon.pass_sent.fetch_add(n, Ordering::Relaxed);
        }
        flush(&mut s, &mut frame, &self.sh)?;
        send(
            &mut s,
            &Message::EndOfPass {
                pass: 0,
                last: true,
            },
        )?;
        Ok(())
    }

    /// Answers demand requests on the control connection until the destination reports every
    /// page in.
    fn serve_demands(
        &self,
        set: &PageSet,
        cursor: &AtomicUsize,
        ctl: &mut Conn,
        failed: &AtomicBool,
    ) -> Result<PostCopyFigures, EngineError> {
        let mut frame = PagesBuf::default();
        loop {
            wait_readable(ctl, failed)?;
            match recv(ctl)? {
                Message::Demand(gpas) => {
                    for &gpa in &gpas {
                        // Sent even when a pusher has it in flight: the page here no longer
                        // changes, so a second copy is harmless, and the wait is shorter.
                        if set.take(gpa) {
                            // Progress counts every page sent for the first time, either way.
                            self.sh.mon.pass_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        frame
                            .push_with(gpa, Compression::None, |b| self.vm.read_page(gpa, b))
                            .map_err(EngineError::PostCopy)?;
                        self.demanded.fetch_add(1, Ordering::Relaxed);
                        if frame.pages() >= MAX_BATCH {
                            let n = frame.send(ctl)?;
                            self.sh
                                .mon
                                .wire_bytes
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    let n = frame.send(ctl)?;
                    self.sh
                        .mon
                        .wire_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if let Some(&g) = gpas.last() {
                        cursor.store(PageSet::word_of(g), Ordering::SeqCst);
                    }
                }
                Message::PostCopyDone(f) => return Ok(f),
                Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
                m => return Err(m.unexpected("Demand or PostCopyDone").into()),
            }
        }
    }

    /// Re-establishes the link: retries every [`RETRY`] (or at once when asked) until the
    /// destination takes it back. Returns the new connections and what is still missing.
    fn reconnect(&self, connect: Connect) -> (Conn, Vec<Conn>, PageSet) {
        let mon = self.sh.mon;
        loop {
            mon.wait_resume_request(RETRY);
            match self.try_reconnect(connect) {
                Ok(x) => return x,
                Err(e) => {
                    tracing::info!("post-copy reconnect failed: {e}");
                    mon.update(|s| s.error = Some(format!("reconnecting: {e}")));
                }
            }
        }
    }

    fn try_reconnect(&self, connect: Connect) -> Result<(Conn, Vec<Conn>, PageSet), EngineError> {
        let mut c = connect().map_err(ProtocolError::Io)?;
        deadlines(&c, self.sh.opts.io_timeout)?;
        send(
            &mut c,
            &Message::Hello(Hello {
                magic: MAGIC,
                version: VERSION,
                caps: CAP_RESUME,
                session: self.session,
                connections: self.connections,
                config: Vec::new(),
            }),
        )?;
        let mut runs = Vec::new();
        loop {
            match recv(&mut c)? {
                Message::Missing(r) => runs.extend(r),
                Message::Welcome => break,
                Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
                m => return Err(m.unexpected("Missing or Welcome").into()),
            }
        }
        let set = PageSet::from_runs(&runs).map_err(EngineError::PostCopy)?;
        let streams = join_data(
            connect,
            self.session,
            self.connections,
            self.sh.opts.io_timeout,
        )?;
        tracing::info!(missing = set.len(), "post-copy link re-established");
        Ok((c, streams, set))
    }
}

/// Waits until the control connection has something to read; fails when a pusher has failed.
/// The control connection may stay quiet for long (no faults) without that meaning anything.
fn wait_readable(ctl: &Conn, failed: &AtomicBool) -> Result<(), EngineError> {
    loop {
        if failed.load(Ordering::SeqCst) {
            return Err(EngineError::Aborted);
        }
        if ctl
            .readable(Duration::from_millis(50))
            .map_err(ProtocolError::Io)?
        {
            return Ok(());
        }
    }
}
