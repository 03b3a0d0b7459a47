//! The source's sender threads, one per data connection: each takes groups of the pass's
//! page set from a shared cursor, re-arms their dirty tracking, reads, encodes and sends
//! them (in pass 1 of a seeded migration, skipping the pages the destination holds as they
//! are), and ends its share with EndOfPass.
use super::source::Shared;
use super::{EngineError, PageSet, Pass, SourceVm};
use crate::protocol::{send, Message, PagesBuf, MAX_BATCH, PAGE, PAGE_HEADER_LEN};
use crate::transport::Conn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// Words (of 64 pages) re-armed for dirty tracking at once, right before they are read: the
/// guest's writes to at most 2 MiB wait on one re-protection.
const REARM_WORDS: usize = 8;

pub(super) type Done = Result<Pass, EngineError>;

/// One pass, shared by the senders.
pub(super) struct Job<'s> {
    pub(super) pass: u32,
    /// What the pass sends; senders claim it 4096 pages (one summary word) at a time.
    pub(super) set: &'s PageSet,
    /// Next group of `set` to claim.
    pub(super) next: AtomicUsize,
    /// Set to stop the pass early (timeout, or another sender failed).
    pub(super) cut: AtomicBool,
    pub(super) last: bool,
    /// Pass 1 of a seeded migration: the destination's pages; one whose content hash
    /// matches is not sent.
    pub(super) held: Option<&'s super::seeded::Held>,
}

/// One data connection's thread: takes each pass's pages group by group until none are left.
/// Gives its connection back (post-copy goes on with it).
pub(super) fn sender<'s, V: SourceVm>(
    vm: &V,
    mut s: Conn,
    sh: &Shared,
    jobs: mpsc::Receiver<Arc<Job<'s>>>,
    done: mpsc::Sender<Done>,
) -> Conn {
    sh.opts.copy_priority.apply();
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
    s: &mut Conn,
    sh: &Shared,
    job: &Job,
    frame: &mut PagesBuf,
) -> Result<Pass, EngineError> {
    let mut pass = Pass::default();
    let mut claimed: Vec<(usize, u64)> = Vec::with_capacity(64);
    let mut bits: Vec<u64> = Vec::with_capacity(REARM_WORDS);
    let mut page = vec![0u8; PAGE];
    loop {
        if sh.mon.cancelled() {
            return Err(EngineError::Cancelled);
        }
        if job.cut.load(Ordering::SeqCst) {
            break;
        }
        let g = job.next.fetch_add(1, Ordering::SeqCst);
        if g >= job.set.groups() {
            break;
        }
        claimed.clear();
        job.set.take_group(g, |w, b| claimed.push((w, b)));
        // What this sender claimed it sends whole, even when the pass is cut meanwhile.
        let mut i = 0;
        while i < claimed.len() {
            // Up to REARM_WORDS consecutive words: re-armed together, then read.
            let first = claimed[i].0;
            bits.clear();
            while i < claimed.len()
                && bits.len() < REARM_WORDS
                && claimed[i].0 == first + bits.len()
            {
                bits.push(claimed[i].1);
                i += 1;
            }
            vm.rearm(first, &bits).map_err(EngineError::Vm)?;
            let mut n = 0u64;
            for (k, &word) in bits.iter().enumerate() {
                for gpa in PageSet::pages_of(first + k, word) {
                    let seed = job.held.and_then(|h| h.get(&gpa));
                    let (len, zero) = if let Some(hash) = seed {
                        vm.read_page(gpa, &mut page).map_err(EngineError::Vm)?;
                        if crate::seed::page_hash(&page) == *hash {
                            pass.seeded_pages += 1;
                            continue;
                        }
                        frame.push(gpa, &page, sh.opts.compression)
                    } else {
                        frame
                            .push_with(gpa, sh.opts.compression, |b| vm.read_page(gpa, b))
                            .map_err(EngineError::Vm)?
                    };
                    pass.pages += 1;
                    pass.zero_pages += zero as u64;
                    pass.wire_bytes += len as u64;
                    pass.saved_bytes += (PAGE + PAGE_HEADER_LEN - len) as u64;
                    if frame.pages() >= MAX_BATCH {
                        flush(s, frame, sh)?;
                    }
                }
                n += word.count_ones() as u64;
            }
            sh.mon.pass_sent.fetch_add(n, Ordering::Relaxed);
        }
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
pub(super) fn flush(s: &mut Conn, frame: &mut PagesBuf, sh: &Shared) -> Result<(), EngineError> {
    let n = frame.send(s)? as u64;
    sh.mon.wire_bytes.fetch_add(n, Ordering::Relaxed);
    if let Some(cap) = sh.opts.max_bandwidth.filter(|&c| c > 0) {
        if let Some(wait) = sh.pace(n, cap) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}
