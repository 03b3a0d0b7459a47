//! Collecting the guest's console as timestamped lines, from a pipe or an in-process sink.
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

/// A console line and when the host received it.
pub type TimedLine = (Instant, String);

/// Reads lines from `r` on a thread; each is timestamped on arrival.
pub fn read_lines<R: Read + Send + 'static>(r: R) -> Receiver<TimedLine> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(mut line) = line else { break };
            if line.ends_with('\r') {
                line.pop();
            }
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// A `Write` sink for an in-process VM's console: each complete line is sent, timestamped.
pub struct LineSink {
    tx: Sender<TimedLine>,
    partial: Vec<u8>,
}

impl LineSink {
    pub fn new() -> (Self, Receiver<TimedLine>) {
        let (tx, rx) = channel();
        (
            LineSink {
                tx,
                partial: Vec::new(),
            },
            rx,
        )
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        for &b in buf {
            if b == b'\n' {
                if self.partial.last() == Some(&b'\r') {
                    self.partial.pop();
                }
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                let _ = self.tx.send((now, line));
            } else {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits up to `timeout` for a line satisfying `pred`; returns every line seen so far
/// (`Err` with them if none matched in time).
pub fn wait_for(
    rx: &Receiver<TimedLine>,
    seen: &mut Vec<TimedLine>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<TimedLine, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if pred(&l.1) {
                    return Ok(l);
                }
            }
            Err(_) => {
                let tail: Vec<&str> = seen.iter().rev().take(10).map(|l| l.1.as_str()).collect();
                return Err(format!("timed out after {timeout:?}; last lines: {tail:?}"));
            }
        }
    }
}

/// Waits up to `timeout` until every line in `want` has been seen (in any order; lines
/// already in `seen` count).
pub fn wait_all(
    rx: &Receiver<TimedLine>,
    seen: &mut Vec<TimedLine>,
    timeout: Duration,
    want: &[String],
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    for w in want {
        if seen.iter().any(|l| &l.1 == w) {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        wait_for(rx, seen, left, |l| l == w).map_err(|e| format!("waiting for {w:?}: {e}"))?;
    }
    Ok(())
}
