//! Live-migration helpers of the KVM test binaries: a destination VM on a thread (directly or
//! behind a frame-aware proxy that can tamper or cut), sending, and the checks after.
use super::*;
use ferry_guest::console::{wait_for, LineSink, TimedLine};
use ferry_guest::heartbeat::{parse_line, GuestLine, HeartbeatLog};
use ferry_guest::verify::verify_dirty_region;
use ferry_migration::engine::{
    migrate, receive, Acceptor, EngineError, Limits, Monitor, Options, Report,
};
use ferry_migration::transport::Conn;
use ferry_vmm::live::{LiveDestination, LiveSource};
use ferry_vmm::Vm;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::Duration;

pub type Dest = thread::JoinHandle<(Result<(), EngineError>, Option<Vm>, Receiver<TimedLine>)>;

/// Decides, per frame from the source (connection in accept order, 0 = control; frame kind;
/// the frame's bytes, header included, which it may change), whether the proxy passes it on;
/// false kills every connection there, both ways, as if the destination host died.
pub type Hook = Box<dyn FnMut(usize, u8, &mut Vec<u8>) -> bool + Send>;

/// A destination VM on its own thread, reached directly or through a frame-aware proxy.
pub fn destination(hook: Option<Hook>) -> (std::net::SocketAddr, Dest) {
    destination_with(hook, None)
}

/// As [`destination`], accepting TLS connections with `tls`.
pub fn destination_with(
    hook: Option<Hook>,
    tls: Option<std::sync::Arc<ferry_migration::tls::TlsServer>>,
) -> (std::net::SocketAddr, Dest) {
    destination_full(hook, tls, None)
}

/// As [`destination`], creating the disks of a shared-nothing migration in `storage`.
pub fn destination_storing(
    hook: Option<Hook>,
    storage: &std::path::Path,
) -> (std::net::SocketAddr, Dest) {
    destination_full(hook, None, Some(storage.to_owned()))
}

fn destination_full(
    hook: Option<Hook>,
    tls: Option<std::sync::Arc<ferry_migration::tls::TlsServer>>,
    storage: Option<std::path::PathBuf>,
) -> (std::net::SocketAddr, Dest) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let acc = Acceptor::new(l, tls, Limits::default()).unwrap();
    let h = thread::spawn(move || {
        let first = acc.next_hello(None).unwrap();
        let (sink, rx) = LineSink::new();
        let mut d = LiveDestination::new(Box::new(sink));
        if let Some(dir) = storage {
            d = d.storage_dir(dir);
        }
        let r = receive(&mut d, first, &acc).map(|_| ());
        (r, d.into_vm(), rx)
    });
    match hook {
        None => (addr, h),
        Some(hook) => (proxy(addr, hook), h),
    }
}

pub fn proxy(to: std::net::SocketAddr, hook: Hook) -> std::net::SocketAddr {
    use ferry_migration::protocol::HEADER_LEN;
    use std::io::{Read, Write};
    let pl = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = pl.local_addr().unwrap();
    let hook = std::sync::Arc::new(std::sync::Mutex::new(hook));
    let all: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>> = Default::default();
    thread::spawn(move || {
        for (conn, from_src) in pl.incoming().enumerate() {
            let Ok(mut from_src) = from_src else { break };
            let (hook, all) = (hook.clone(), all.clone());
            thread::spawn(move || {
                let mut to_dst = TcpStream::connect(to).unwrap();
                {
                    let mut all = all.lock().unwrap();
                    all.push(from_src.try_clone().unwrap());
                    all.push(to_dst.try_clone().unwrap());
                }
                let (mut back_src, mut back_dst) =
                    (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut back_dst, &mut back_src);
                });
                let mut frame = vec![0u8; HEADER_LEN];
                loop {
                    frame.resize(HEADER_LEN, 0);
                    if from_src.read_exact(&mut frame).is_err() {
                        break;
                    }
                    let len = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
                    frame.resize(HEADER_LEN + len as usize, 0);
                    if from_src.read_exact(&mut frame[HEADER_LEN..]).is_err() {
                        break;
                    }
                    let kind = frame[0];
                    if !(hook.lock().unwrap())(conn, kind, &mut frame) {
                        for s in all.lock().unwrap().iter() {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                        break;
                    }
                    if to_dst.write_all(&frame).is_err() {
                        break;
                    }
                }
                let _ = to_dst.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Live-migrates `vm` to `addr` with `opts`.
pub fn send_vm(vm: &Vm, addr: std::net::SocketAddr, opts: &Options) -> Result<Report, EngineError> {
    send_vm_with(vm, addr, opts, None)
}

/// As [`send_vm`], over TLS with `tls`.
pub fn send_vm_with(
    vm: &Vm,
    addr: std::net::SocketAddr,
    opts: &Options,
    tls: Option<&ferry_migration::tls::TlsClient>,
) -> Result<Report, EngineError> {
    let connect = || -> std::io::Result<Conn> {
        Conn::connect(&addr.to_string(), tls, Duration::from_secs(30))
            .map_err(std::io::Error::other)
    };
    let ctl = connect().map_err(|e| EngineError::Vm(e.to_string()))?;
    migrate(
        &LiveSource::new(vm),
        ctl,
        &connect,
        opts,
        &Monitor::default(),
    )
}

pub fn beats(log: &mut HeartbeatLog, lines: &[TimedLine]) {
    for (at, l) in lines {
        if let GuestLine::Heartbeat { cpu: 0, seq, tsc } = parse_line(l) {
            log.push(*at, seq, tsc);
        }
    }
}

/// Boots a VM running a `dirty` workload on vCPU 0 and waits until it has written its region
/// once; returns the VM, its console, the lines so far and the region's base.
pub fn boot_dirtying(
    cpus: u8,
    memory: u64,
    work: &str,
) -> (Vm, Receiver<TimedLine>, Vec<TimedLine>, u64) {
    let (vm, rx) = boot(cpus, memory, work);
    let mut seen = Vec::new();
    // A whole first pass over a large region at a low rate takes a while: a wide safety net.
    wait_for(&rx, &mut seen, Duration::from_secs(120), |l| l == "D0 1").unwrap();
    let base = bases(&seen)[0];
    (vm, rx, seen, base)
}

/// After a successful migration: stops the source (keeping its last console lines in `seen`)
/// and returns the VM running on the destination with its console.
pub fn hand_over(
    src: &Vm,
    rx: &Receiver<TimedLine>,
    seen: &mut Vec<TimedLine>,
    dest: Dest,
) -> (Vm, Receiver<TimedLine>) {
    src.shutdown_after_handoff().unwrap();
    src.wait();
    seen.extend(rx.try_iter());
    let (r, vm, rx2) = dest.join().unwrap();
    r.unwrap();
    (vm.expect("destination VM"), rx2)
}

/// Stops the migrated VM and checks the dirty region at `base` page-exact and the heartbeat
/// continuous from the source's lines (`before`) through the destination's.
pub fn stop_exact_and_continuous(
    vm: Vm,
    rx: &Receiver<TimedLine>,
    mut after: Vec<TimedLine>,
    before: &[TimedLine],
    base: u64,
) {
    vm.pause().unwrap();
    verify_dirty_region(&reader(&vm), base).expect("destination memory exact");
    vm.shutdown().unwrap();
    vm.wait();
    after.extend(rx.try_iter());
    let mut log = HeartbeatLog::default();
    beats(&mut log, before);
    beats(&mut log, &after);
    log.check_continuous().expect("heartbeat continuous");
}

pub fn dirty_pass(seen: &[TimedLine]) -> u64 {
    seen.iter()
        .filter_map(|(_, l)| l.strip_prefix("D0 ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

pub const K_PAGES: u8 = 3;
pub const K_STATE: u8 = 4;
pub const K_MISSING: u8 = 12;
pub const K_END_OF_PASS: u8 = 10;
