//! Shared-nothing migration: the VM's disks travel too, on a storage connection of their own
//! (`CAP_STORAGE`; frames in `disk_wire`).
//!
//! Source: after `Welcome` it sends `Disks` (id, size, format, file name, and where
//! `--disk-map` asks for it); the destination creates every disk, empty, and answers
//! `DisksReady`. The storage connection joins (index = the data connections' count). Each
//! disk's image is mirrored onto the link (the VM layer's mirror: one bulk copy of the
//! allocated data; a guest write below the copy's cursor goes onto the link too before it
//! completes), and the bulk copy runs to the end before the memory passes start; then a
//! `DiskSync` makes the copy durable on the destination, off the downtime. During the
//! memory passes the mirrors keep sending the guest's writes. At the switch-over, with the VM
//! paused (so no request is in flight), a last `DiskSync` (`last`) is answered once every
//! write is durable and the images are closed on the destination; only then the state goes.
//!
//! One connection, written under one lock by the copy and by the mirrored writes, keeps the
//! order of everything sent for a disk: the destination applies it in arrival order.
//! Any failure before commit: the source's disks are its own images again (never touched by
//! the migration), and the destination deletes what it created.
use super::source::{deadlines, destination_gone};
use super::{ok, DestinationVm, EngineError, Monitor, Phase, SourceVm};
use crate::disk_wire::{self, DiskFrame, DiskSpec};
use crate::protocol::{recv_raw, send, Message, ProtocolError, KIND_ABORT};
use crate::transport::Conn;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the bulk copy of the disks stands (from `SourceVm::copy_disks`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskCopy {
    pub done: bool,
    /// Sum of the disks' sizes, and of how far each copy has got.
    pub size: u64,
    pub cursor: u64,
    /// Data the bulk copy read and sent.
    pub copied: u64,
}

/// The disks' part of a migration report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StorageReport {
    pub disks: u32,
    /// Sum of the disks' sizes.
    pub size_bytes: u64,
    /// Data the bulk copy sent (holes are skipped).
    pub copied_bytes: u64,
    /// Every byte on the storage connection (copy, guest writes mirrored, framing).
    pub wire_bytes: u64,
    pub bulk_ms: f64,
    /// The last sync, in the downtime.
    pub final_sync_ms: f64,
}

struct Link {
    conn: Mutex<Conn>,
    /// For reading the destination's answers without holding the writers' lock.
    answers: Mutex<Conn>,
    /// For shutting the connection down while a writer is blocked in it (holding its lock).
    killer: Conn,
    bytes: AtomicU64,
}

/// The source's end of the storage connection, shared by the disks' mirrors and the engine.
#[derive(Clone)]
pub struct DiskLink(Arc<Link>);

impl DiskLink {
    fn new(c: Conn) -> Result<DiskLink, EngineError> {
        let answers = c.try_clone().map_err(ProtocolError::Io)?;
        let killer = c.try_clone().map_err(ProtocolError::Io)?;
        Ok(DiskLink(Arc::new(Link {
            conn: Mutex::new(c),
            answers: Mutex::new(answers),
            killer,
            bytes: AtomicU64::new(0),
        })))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Conn) -> R) -> R {
        f(&mut self.0.conn.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sends `data` for `offset` of disk `disk` (index in the `Disks` list).
    pub fn write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        let frames = data.len().div_ceil(disk_wire::MAX_DISK_DATA) as u64;
        self.0
            .bytes
            .fetch_add(data.len() as u64 + frames * 28, Ordering::Relaxed);
        self.with(|c| disk_wire::send_data(c, disk, offset, data))
            .map_err(|e| format!("storage connection: {e}"))
    }

    /// The range of disk `disk` reads as zeroes (a discard or write-zeroes).
    pub fn zero(&self, disk: u32, offset: u64, len: u64) -> Result<(), String> {
        self.0.bytes.fetch_add(36, Ordering::Relaxed);
        self.with(|c| disk_wire::send_zero(c, disk, offset, len))
            .map_err(|e| format!("storage connection: {e}"))
    }

    /// Asks the destination to make everything sent so far durable and waits for its answer
    /// (the mirrors go on sending meanwhile).
    fn sync(&self, last: bool) -> Result<(), EngineError> {
        self.with(|c| disk_wire::send_sync(c, last))?;
        let mut r = self.0.answers.lock().unwrap_or_else(|e| e.into_inner());
        let mut p = Vec::new();
        let kind = recv_raw(&mut *r, &mut p)?;
        if kind == KIND_ABORT {
            return Err(ProtocolError::Peer(String::from_utf8_lossy(&p).into_owned()).into());
        }
        match disk_wire::parse(kind, &p)? {
            DiskFrame::Sync { last: l } if l == last => Ok(()),
            _ => Err(ProtocolError::Unexpected {
                got: crate::protocol::kind_name(kind),
                want: "DiskSync",
            }
            .into()),
        }
    }

    fn shutdown(&self) {
        self.0.killer.shutdown();
    }
}

/// The source's disks on their way: the link, and what the report says.
pub(super) struct StorageSource {
    link: DiskLink,
    report: Mutex<StorageReport>,
}

/// The disks to send, with `opts.disk_map` applied (None: no disks, or not asked to).
pub(super) fn offer<V: SourceVm>(
    vm: &V,
    opts: &super::Options,
) -> Result<Option<Vec<DiskSpec>>, EngineError> {
    if !opts.copy_storage {
        return Ok(None);
    }
    let mut specs = vm.disks();
    let known: Vec<String> = specs.iter().map(|d| d.id.clone()).collect();
    for (id, path, format) in &opts.disk_map {
        let d = specs.iter_mut().find(|d| &d.id == id).ok_or_else(|| {
            EngineError::Vm(format!(
                "--disk-map names disk {id:?}, which the VM does not have (its disks: {})",
                known.join(", ")
            ))
        })?;
        d.path = Some(path.clone());
        d.to_format = format.clone();
    }
    Ok((!specs.is_empty()).then_some(specs))
}

impl StorageSource {
    /// After `Welcome`: the destination creates the disks; the storage connection joins.
    pub fn start(
        ctl: &mut Conn,
        specs: Vec<DiskSpec>,
        connect: super::source::Connect,
        session: u64,
        index: u32,
        io_timeout: Duration,
    ) -> Result<StorageSource, EngineError> {
        let size_bytes = specs.iter().map(|d| d.size).sum();
        let disks = specs.len() as u32;
        send(ctl, &Message::Disks(specs))?;
        crate::protocol::expect(ctl, Message::DisksReady)?;
        let mut c = connect().map_err(ProtocolError::Io)?;
        deadlines(&c, io_timeout)?;
        send(&mut c, &Message::Join { session, index })?;
        Ok(StorageSource {
            link: DiskLink::new(c)?,
            report: Mutex::new(StorageReport {
                disks,
                size_bytes,
                ..StorageReport::default()
            }),
        })
    }

    /// Mirrors every disk onto the link and runs the bulk copy to its end, then makes it
    /// durable on the destination. Watches `ctl` for the destination's Abort, and `mon` for
    /// a cancel, throughout (copy and sync).
    pub fn bulk<V: SourceVm>(&self, vm: &V, ctl: &Conn, mon: &Monitor) -> Result<(), EngineError> {
        let t = Instant::now();
        ok(vm.mirror_disks(self.link.clone()))?;
        mon.begin_pass(0, 0, Phase::Storage);
        // A watcher, so that a copy step blocked in a write (a destination that stopped
        // reading) ends at once on the destination's Abort or a cancel, not at the timeout.
        let done = std::sync::atomic::AtomicBool::new(false);
        let why: Mutex<Option<EngineError>> = Mutex::new(None);
        let r = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    let e = if mon.cancelled() {
                        Some(EngineError::Cancelled)
                    } else {
                        destination_gone(ctl)
                    };
                    if let Some(e) = e {
                        *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        self.link.shutdown();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            // The sync too: it waits for the destination's answer on the storage connection,
            // which a destination that refused a frame near the end never sends (found: the
            // source then waited out the I/O timeout, 1 run in 5).
            let r = self.copy_all(vm, mon).and_then(|()| self.link.sync(false));
            done.store(true, Ordering::SeqCst);
            r
        });
        if let Some(e) = why.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        if let Err(e) = r {
            // The link failing under a write is often the echo of the destination's refusal:
            // its reason may still be on its way on the control connection.
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                match destination_gone(ctl) {
                    Some(why @ EngineError::Protocol(ProtocolError::Peer(_))) => return Err(why),
                    Some(_) => return Err(e), // gone without a word: ours is the reason
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Err(e);
        }
        self.report().bulk_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    fn copy_all<V: SourceVm>(&self, vm: &V, mon: &Monitor) -> Result<(), EngineError> {
        loop {
            if mon.cancelled() {
                return Err(EngineError::Cancelled);
            }
            let c = ok(vm.copy_disks())?;
            let wire = self.link.0.bytes.load(Ordering::Relaxed);
            mon.update(|s| {
                s.disk_bytes = c.size;
                s.disk_cursor = c.cursor;
                s.disk_copied = c.copied;
                s.wire_bytes = wire;
            });
            self.report().copied_bytes = c.copied;
            if c.done {
                return Ok(());
            }
        }
    }

    /// Just before the pause: what was sent so far is made durable on the destination.
    pub fn presync(&self) -> Result<(), EngineError> {
        self.link.sync(false)
    }

    /// With the VM paused (nothing in flight): every mirror still whole, and everything
    /// durable on the destination, its images closed.
    pub fn finish<V: SourceVm>(&self, vm: &V) -> Result<(), EngineError> {
        let t = Instant::now();
        let c = ok(vm.copy_disks())?;
        if !c.done {
            return Err(EngineError::Vm("the disks' copy is not complete".into()));
        }
        self.link.sync(true)?;
        let mut r = self.report();
        r.final_sync_ms = t.elapsed().as_secs_f64() * 1e3;
        r.wire_bytes = self.link.0.bytes.load(Ordering::Relaxed);
        Ok(())
    }

    fn report(&self) -> std::sync::MutexGuard<'_, StorageReport> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the report says of the disks.
    pub fn figures(&self) -> StorageReport {
        self.report().clone()
    }

    /// Frees a mirror stuck in a write on a dead link (a failed migration).
    pub fn shutdown(&self) {
        self.link.shutdown();
    }
}

/// Destination, after `Welcome` with `CAP_STORAGE`: creates the disks the source names.
pub(super) fn create<V: DestinationVm>(vm: &mut V, ctl: &mut Conn) -> Result<u32, EngineError> {
    let specs = match crate::protocol::recv(ctl)? {
        Message::Disks(d) => d,
        Message::Abort(why) => return Err(ProtocolError::Peer(why).into()),
        m => return Err(m.unexpected("Disks").into()),
    };
    ok(vm.create_disks(&specs))?;
    send(ctl, &Message::DisksReady)?;
    Ok(specs.len() as u32)
}

/// Frames read ahead of the one being applied: the next ones are received while a write is
/// on its way to the file (the two otherwise take turns, and half of a core sits idle).
const READ_AHEAD: usize = 2;

/// Destination: applies what the storage connection carries, in order, answering each sync,
/// until a sync with `last == until` (the bulk copy's end: false; the switch-over: true).
/// Returns the bytes written. One thread reads and checks frames, another applies them in
/// arrival order and answers the syncs (each answer after everything before it is durable).
pub(super) fn receive<V: DestinationVm>(
    vm: &V,
    c: &mut Conn,
    disks: u32,
    until: bool,
) -> Result<u64, EngineError> {
    let mut answers = c.try_clone().map_err(ProtocolError::Io)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u8, Vec<u8>)>(READ_AHEAD);
    let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        // Err(None): the reader stopped first, and its error is the one to report.
        let writer = scope.spawn(move || -> Result<u64, Option<EngineError>> {
            let mut written = 0u64;
            let r = (|| {
                for (kind, p) in rx {
                    match disk_wire::parse(kind, &p)? {
                        DiskFrame::Data { disk, offset, data } => {
                            ok(vm.disk_write(disk, offset, data))?;
                            written += data.len() as u64;
                        }
                        DiskFrame::Zero { disk, offset, len } => {
                            ok(vm.disk_zero(disk, offset, len))?
                        }
                        DiskFrame::Sync { last } => {
                            ok(vm.disk_sync(last))?;
                            disk_wire::send_sync(&mut answers, last)?;
                            if last == until {
                                return Ok(Some(written));
                            }
                        }
                    }
                    let _ = spare_tx.send(p);
                }
                Ok::<_, EngineError>(None)
            })();
            match r {
                Ok(Some(n)) => Ok(n),
                Ok(None) => Err(None),
                Err(e) => {
                    // Unblock the reader (it may wait for frames the source will not send).
                    answers.shutdown();
                    Err(Some(e))
                }
            }
        });
        let read = read_frames(c, disks, until, &tx, &spare_rx);
        drop(tx);
        let applied = writer.join().unwrap_or_else(|_| {
            Err(Some(EngineError::Vm(
                "the disk writer thread panicked".into(),
            )))
        });
        match (applied, read) {
            (Ok(n), _) => Ok(n),
            (Err(Some(e)), _) => Err(e),
            (Err(None), Err(e)) => Err(e),
            (Err(None), Ok(())) => Err(ProtocolError::Closed.into()),
        }
    })
}

/// Reads, checks and hands on frames until the sync that ends this phase (or the writer
/// stops taking them).
fn read_frames(
    c: &mut Conn,
    disks: u32,
    until: bool,
    tx: &std::sync::mpsc::SyncSender<(u8, Vec<u8>)>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<(), EngineError> {
    loop {
        let mut p = spare.try_recv().unwrap_or_default();
        let kind = recv_raw(c, &mut p)?;
        if kind == KIND_ABORT {
            return Err(ProtocolError::Peer(String::from_utf8_lossy(&p).into_owned()).into());
        }
        let end = match disk_wire::parse(kind, &p)? {
            DiskFrame::Data { disk, .. } | DiskFrame::Zero { disk, .. } if disk >= disks => {
                return Err(ProtocolError::Malformed {
                    what: "storage frame",
                    why: format!("disk {disk} of {disks}"),
                }
                .into())
            }
            DiskFrame::Sync { last: true } if !until => {
                return Err(ProtocolError::Malformed {
                    what: "DiskSync",
                    why: "the last sync before the bulk copy ended".into(),
                }
                .into())
            }
            DiskFrame::Sync { last } => last == until,
            _ => false,
        };
        if tx.send((kind, p)).is_err() {
            return Ok(()); // the writer failed: its error is the one to report
        }
        if end {
            return Ok(());
        }
    }
}
