//! Frames that reach a VM's old host during a live migration's switch-over, forwarded to its
//! new one (docs/network.md, "What is guaranteed for open connections"). From the pause on,
//! the source VMM takes no frame from its taps, and until every peer's host has rewritten its
//! forwarding the peers' frames still arrive at the source: without this they are lost and
//! the peers' TCP retransmits them a round trip or more later. The source agent watches the
//! VM's networks' VXLAN devices from the start of the migration (AF_PACKET: what arrives
//! from other hosts for the VM's MACs, stamped on arrival); once the hand-over has moved the
//! VM, it sends what came since the pause, and what comes for a little longer, to the new
//! host's agent, which writes each frame into the VM's tap there (AF_PACKET on the tap: a
//! frame sent to a tap goes to its reader, the VMM, as any frame from the host does).
//! Frames from the old host's own other VMs (bridged locally, never on the VXLAN device) are
//! not caught.
use ferry_net::wire::Leg;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames kept at most (the oldest go first).
const KEPT: usize = 4096;
/// How long after the hand-over frames are still forwarded.
pub const AFTER: Duration = Duration::from_millis(150);

/// A frame for NIC `nic` that arrived at CLOCK_MONOTONIC `ns`.
type Caught = (u64, usize, Vec<u8>);

/// Frames arriving for a VM's NICs on this host's VXLAN devices.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<VecDeque<Caught>>>,
}

impl Capture {
    /// Watches each `(VXLAN device, MAC)` of NIC index i for frames to that MAC.
    pub fn start(nics: &[(String, [u8; 6])]) -> Result<Capture, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(VecDeque::new()));
        let mut devs: Vec<&str> = nics.iter().map(|n| n.0.as_str()).collect();
        devs.sort();
        devs.dedup();
        for dev in devs {
            let leg = Leg::open(dev).map_err(|e| e.to_string())?;
            let macs: Vec<(usize, [u8; 6])> = nics
                .iter()
                .enumerate()
                .filter(|(_, n)| n.0 == dev)
                .map(|(i, n)| (i, n.1))
                .collect();
            let (stop, frames) = (stop.clone(), frames.clone());
            std::thread::Builder::new()
                .name("ferry-capture".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::SeqCst) {
                        let n = match leg.recv(&mut buf) {
                            Ok(Some(n)) => n,
                            Ok(None) => continue,
                            Err(_) => return,
                        };
                        let ns = ferry_storage::fence::monotonic_ns();
                        let Some(dst) = buf.get(..6) else { continue };
                        if let Some((i, _)) = macs.iter().find(|(_, m)| m == dst) {
                            let mut f = frames.lock().unwrap_or_else(|e| e.into_inner());
                            if f.len() == KEPT {
                                f.pop_front();
                            }
                            f.push_back((ns, *i, buf[..n].to_vec()));
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(Capture { stop, frames })
    }

    /// Takes the frames that arrived after `ns` (older ones are dropped); the latest
    /// arrival time among them.
    pub fn take_after(&self, ns: u64) -> (Vec<(usize, Vec<u8>)>, u64) {
        let mut f = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = ns;
        let out = f
            .drain(..)
            .filter(|(t, _, _)| *t > ns)
            .map(|(t, i, b)| {
                last = last.max(t);
                (i, b)
            })
            .collect();
        (out, last)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The body of `POST /cluster/local/inject/NAME`: `{"frames": [[nic, "hex"], ...]}`.
pub fn body(frames: &[(usize, Vec<u8>)]) -> String {
    let v: Vec<serde_json::Value> = frames
        .iter()
        .map(|(i, b)| serde_json::json!([i, hex(b)]))
        .collect();
    serde_json::json!({ "frames": v }).to_string()
}

/// The frames of such a body (malformed entries skipped).
pub fn parse(v: &serde_json::Value) -> Vec<(usize, Vec<u8>)> {
    v["frames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let i = e.get(0)?.as_u64()? as usize;
                    let b = unhex(e.get(1)?.as_str()?)?;
                    (14..=65535).contains(&b.len()).then_some((i, b))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Writes each frame into its NIC's tap (`taps[nic]`); how many went.
pub fn inject(taps: &[String], frames: &[(usize, Vec<u8>)]) -> usize {
    let legs: Vec<Option<Leg>> = taps.iter().map(|t| Leg::open(t).ok()).collect();
    frames
        .iter()
        .filter(|(i, b)| {
            legs.get(*i)
                .and_then(|l| l.as_ref())
                .is_some_and(|l| l.send(b).is_ok())
        })
        .count()
}

/// A capture and where it goes: the new host's agent, on a connection opened when the
/// migration began.
pub struct Forwarder {
    pub capture: Capture,
    pub to_agent: String,
    conn: Mutex<Option<super::client::Conn>>,
}

impl Forwarder {
    pub fn new(capture: Capture, to_agent: String) -> Forwarder {
        let conn = match super::client::Conn::open(&to_agent, Duration::from_secs(5)) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("no connection to {to_agent} for forwarded frames yet: {e:#}");
                None
            }
        };
        Forwarder {
            capture,
            to_agent,
            conn: Mutex::new(conn),
        }
    }

    /// Sends frames for VM `vm` to the new host: on the open connection, or on a new one
    /// if that has failed (an idle connection the agent closed).
    fn send(&self, vm: &str, frames: &[(usize, Vec<u8>)]) -> anyhow::Result<()> {
        let uri = format!("/cluster/local/inject/{vm}");
        let limit = Duration::from_secs(5);
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = conn.as_mut() {
            if let Ok((200, _)) = c.call(hyper::Method::POST, &uri, Some(body(frames)), limit) {
                return Ok(());
            }
        }
        *conn = None;
        super::client::call(
            &self.to_agent,
            hyper::Method::POST,
            &uri,
            Some(body(frames)),
        )?;
        Ok(())
    }
}

/// After the hand-over moved the VM: sends what `fw` caught since the pause (`paused_ns`),
/// then what it catches for [`AFTER`] more, to the new host's agent.
pub fn forward(fw: Arc<Forwarder>, paused_ns: u64, vm: String, count: Arc<super::host::Shared>) {
    let r = std::thread::Builder::new()
        .name("ferry-forward".into())
        .spawn(move || {
            let until = Instant::now() + AFTER;
            let (mut since, mut sent) = (paused_ns, 0usize);
            loop {
                let (frames, last) = fw.capture.take_after(since);
                since = last;
                if !frames.is_empty() {
                    match fw.send(&vm, &frames) {
                        Ok(()) => {
                            sent += frames.len();
                            count
                                .forwarded
                                .fetch_add(frames.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!("VM {vm}: forwarding frames to {}: {e:#}", fw.to_agent)
                        }
                    }
                }
                if Instant::now() >= until {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            tracing::info!("VM {vm}: {sent} frames that reached the old host forwarded");
        });
    if let Err(e) = r {
        tracing::warn!("no thread to forward frames: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_go_through_the_body_and_bad_entries_are_skipped() {
        let f = vec![(0usize, vec![0xffu8; 60]), (1, (0..=255u8).collect())];
        let v: serde_json::Value = serde_json::from_str(&body(&f)).unwrap();
        assert_eq!(parse(&v), f);
        let bad = serde_json::json!({"frames": [[0, "abc"], [0, "zz"], ["x", "00"], [0, "00"]]});
        assert!(parse(&bad).is_empty());
    }
}
