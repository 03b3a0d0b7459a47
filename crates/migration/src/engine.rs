//! The pre-copy engine: source and destination sides of one migration over one stream.
//!
//! Source: handshake; dirty logging on; pass 1 sends every populated page; each further pass
//! sends the pages dirtied during the previous one, measuring bandwidth and dirty rate and
//! predicting the downtime of stopping now (pages left ÷ bandwidth); when the prediction is
//! under the limit (or the pass limit is reached) it pauses the VM, sends the last dirty pages
//! and the VM's state, waits for Ready, sends Commit, and waits for Resumed.
//!
//! Guarantees: any failure before Commit resumes the source as if nothing happened, and the
//! destination, which resumes only on Commit, discards everything. After Commit the source
//! never resumes by itself: without Resumed the outcome is in doubt and the source VM stays
//! paused (two running copies are worse than a stopped one).
use crate::protocol::{
    expect, recv, send, Compression, Hello, Message, PagesBuf, ProtocolError, MAGIC, MAX_BATCH,
    PAGE, PAGE_HEADER_LEN, VERSION,
};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// What the engine needs from the VM being sent. Errors are the VM layer's text.
pub trait SourceVm {
    /// The VM's configuration, sent so the destination builds an identical VM.
    fn config(&self) -> Vec<u8>;
    /// Pages the guest may have written (the first pass sends these; the rest are zero).
    fn populated(&self) -> Result<Vec<u64>, String>;
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String>;
    fn start_dirty_log(&self) -> Result<(), String>;
    fn stop_dirty_log(&self) -> Result<(), String>;
    /// Pages dirtied since the last call (or since logging started), in ascending order.
    fn fetch_dirty(&self) -> Result<Vec<u64>, String>;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// Every vCPU's and device's state (VM paused).
    fn save_state(&self) -> Result<Vec<u8>, String>;
}

/// What the engine needs from the VM being received.
pub trait DestinationVm {
    /// Builds the VM from the source's configuration (not started).
    fn prepare(&mut self, config: &[u8]) -> Result<(), String>;
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), String>;
    fn load_state(&mut self, state: &[u8]) -> Result<(), String>;
    fn resume(&mut self) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("VM: {0}")]
    Vm(String),
    #[error("migration committed, but the destination did not confirm it runs the VM ({0}); the source VM stays paused: check the destination before resuming it")]
    InDoubt(String),
}

/// Tuning of the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Switch over once the predicted downtime is under this.
    pub downtime_limit: Duration,
    /// Switch over after this many passes whatever the prediction (0: no limit).
    pub max_passes: u32,
    pub compression: Compression,
    /// Bytes per second on the wire (None: as fast as the link goes).
    pub max_bandwidth: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            downtime_limit: Duration::from_millis(30),
            max_passes: 30,
            compression: Compression::None,
            max_bandwidth: None,
        }
    }
}

/// One pass of the source.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pass {
    pub pages: u64,
    pub zero_pages: u64,
    pub wire_bytes: u64,
    pub ms: f64,
    /// Pages per second the guest dirtied during this pass (what the next pass must carry).
    pub dirty_pages_per_s: f64,
}

/// What a migration did, source side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub passes: Vec<Pass>,
    /// Downtime the engine predicted when it decided to switch over.
    pub predicted_downtime_ms: f64,
    /// Source pause to the destination's Resumed.
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub wire_bytes: u64,
    /// Bytes not sent thanks to zero pages and compression.
    pub saved_bytes: u64,
    pub bandwidth_bytes_per_s: f64,
}

fn ok<T>(r: Result<T, String>) -> Result<T, EngineError> {
    r.map_err(EngineError::Vm)
}

struct Sender<'a, S: Write> {
    s: &'a mut S,
    opts: &'a Options,
    frame: PagesBuf,
    /// Bytes in `frame` not yet sent.
    pending: u64,
    started: Instant,
    sent: u64,
}

impl<S: Write> Sender<'_, S> {
    fn page(
        &mut self,
        gpa: u64,
        data: &[u8],
        pass: &mut Pass,
        saved: &mut u64,
    ) -> Result<(), EngineError> {
        let (n, zero) = self.frame.push(gpa, data, self.opts.compression);
        let n = n as u64;
        if zero {
            pass.zero_pages += 1;
        }
        *saved += (PAGE + PAGE_HEADER_LEN) as u64 - n;
        pass.pages += 1;
        pass.wire_bytes += n;
        self.pending += n;
        if self.frame.pages() >= MAX_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.frame.send(self.s)?;
        self.sent += std::mem::take(&mut self.pending);
        if let Some(cap) = self.opts.max_bandwidth.filter(|&c| c > 0) {
            let due = Duration::from_secs_f64(self.sent as f64 / cap as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// Sends `vm` over `stream`. On error before commit the VM is running again when this returns.
pub fn migrate<V: SourceVm, S: Read + Write>(
    vm: &V,
    stream: &mut S,
    opts: &Options,
) -> Result<Report, EngineError> {
    let mut paused = false;
    let mut r = run_source(vm, stream, opts, &mut paused);
    if let Err(EngineError::Protocol(ProtocolError::Io(_))) = &r {
        // The connection broke under a write: the destination may have said why first.
        if let Ok(Message::Abort(why)) = recv(stream) {
            r = Err(ProtocolError::Peer(why).into());
        }
    }
    match &r {
        Err(EngineError::InDoubt(_)) | Ok(_) => {}
        Err(e) => {
            let _ = send(stream, &Message::Abort(e.to_string()));
            if paused {
                // Before commit: the source carries on as if nothing happened.
                if let Err(re) = vm.resume() {
                    return Err(EngineError::Vm(format!(
                        "{e}; and resuming the source failed: {re}"
                    )));
                }
            }
        }
    }
    let _ = vm.stop_dirty_log();
    r
}

fn run_source<V: SourceVm, S: Read + Write>(
    vm: &V,
    stream: &mut S,
    opts: &Options,
    paused: &mut bool,
) -> Result<Report, EngineError> {
    let t0 = Instant::now();
    send(
        stream,
        &Message::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            caps: 0,
            config: vm.config(),
        }),
    )?;
    expect(stream, Message::Welcome)?;
    ok(vm.start_dirty_log())?;
    let mut report = Report::default();
    let mut tx = Sender {
        s: stream,
        opts,
        frame: PagesBuf::default(),
        pending: 0,
        started: Instant::now(),
        sent: 0,
    };
    let mut buf = vec![0u8; PAGE];
    let mut todo = ok(vm.populated())?;
    let mut bandwidth = f64::INFINITY;
    loop {
        let start = Instant::now();
        let mut pass = Pass::default();
        for &gpa in &todo {
            ok(vm.read_page(gpa, &mut buf))?;
            tx.page(gpa, &buf, &mut pass, &mut report.saved_bytes)?;
        }
        tx.flush()?;
        let secs = start.elapsed().as_secs_f64().max(1e-6);
        pass.ms = secs * 1e3;
        todo = ok(vm.fetch_dirty())?;
        pass.dirty_pages_per_s = todo.len() as f64 / secs;
        if pass.wire_bytes > 0 {
            bandwidth = pass.wire_bytes as f64 / secs;
        }
        report.passes.push(pass);
        let predicted = todo.len() as f64 * PAGE as f64 / bandwidth;
        report.predicted_downtime_ms = predicted * 1e3;
        let limit_reached = opts.max_passes > 0 && report.passes.len() as u32 >= opts.max_passes;
        if predicted <= opts.downtime_limit.as_secs_f64() || limit_reached {
            break;
        }
    }
    // Switch-over.
    let t_pause = Instant::now();
    ok(vm.pause())?;
    *paused = true;
    let mut last = todo;
    last.extend(ok(vm.fetch_dirty())?);
    last.sort_unstable();
    last.dedup();
    let mut pass = Pass::default();
    for &gpa in &last {
        ok(vm.read_page(gpa, &mut buf))?;
        tx.page(gpa, &buf, &mut pass, &mut report.saved_bytes)?;
    }
    tx.flush()?;
    pass.ms = t_pause.elapsed().as_secs_f64() * 1e3;
    report.passes.push(pass);
    let state = ok(vm.save_state())?;
    send(tx.s, &Message::State(state))?;
    expect(tx.s, Message::Ready)?;
    send(tx.s, &Message::Commit).map_err(|e| EngineError::InDoubt(e.to_string()))?;
    match recv(tx.s) {
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
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    report.wire_bytes = report.passes.iter().map(|p| p.wire_bytes).sum();
    report.bandwidth_bytes_per_s = if bandwidth.is_finite() {
        bandwidth
    } else {
        0.0
    };
    Ok(report)
}

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Received {
    pub pages: u64,
    pub state_bytes: u64,
}

/// Receives a VM from `stream` into `vm`. The VM is resumed only after the source's Commit;
/// on any error it is left unstarted (the caller discards it).
pub fn receive<V: DestinationVm, S: Read + Write>(
    vm: &mut V,
    stream: &mut S,
) -> Result<Received, EngineError> {
    let r = run_destination(vm, stream);
    if let Err(e) = &r {
        if !matches!(e, EngineError::Protocol(ProtocolError::Peer(_))) {
            let _ = send(stream, &Message::Abort(e.to_string()));
        }
    }
    r
}

fn run_destination<V: DestinationVm, S: Read + Write>(
    vm: &mut V,
    stream: &mut S,
) -> Result<Received, EngineError> {
    let hello = match recv(stream)? {
        Message::Hello(h) => h,
        m => {
            return Err(ProtocolError::Unexpected {
                got: m.name(),
                want: "Hello",
            }
            .into())
        }
    };
    if hello.magic != MAGIC {
        return Err(ProtocolError::BadMagic.into());
    }
    if hello.version != VERSION {
        return Err(ProtocolError::Version {
            peer: hello.version,
        }
        .into());
    }
    ok(vm.prepare(&hello.config))?;
    send(stream, &Message::Welcome)?;
    let mut got = Received::default();
    let mut page = vec![0u8; PAGE];
    loop {
        match recv(stream)? {
            Message::Pages(batch) => {
                for (gpa, d) in batch {
                    d.decode(&mut page)?;
                    ok(vm.write_page(gpa, &page))?;
                    got.pages += 1;
                }
            }
            Message::State(s) => {
                got.state_bytes = s.len() as u64;
                ok(vm.load_state(&s))?;
                send(stream, &Message::Ready)?;
                expect(stream, Message::Commit)?;
                ok(vm.resume())?;
                send(stream, &Message::Resumed)?;
                return Ok(got);
            }
            Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
            m => {
                return Err(ProtocolError::Unexpected {
                    got: m.name(),
                    want: "Pages or State",
                }
                .into())
            }
        }
    }
}
