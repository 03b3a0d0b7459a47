//! Helpers for tests that run the `ferry` binary.
#![allow(dead_code)]
use ferry_guest::console::{read_lines, TimedLine};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

pub fn ferry(args: &[&str]) -> Output {
    Command::new(FERRY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry")
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `ferry run` in the background with its console read line by line.
pub struct Running {
    pub child: Child,
    pub lines: Receiver<TimedLine>,
    pub seen: Vec<TimedLine>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        Self::start_cmd("run", args)
    }

    pub fn start_cmd(cmd: &str, args: &[&str]) -> Running {
        let mut child = Command::new(FERRY)
            .arg(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry run");
        let lines = read_lines(child.stdout.take().unwrap());
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> TimedLine {
        ferry_guest::console::wait_for(&self.lines, &mut self.seen, Duration::from_secs(30), pred)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for exit (bounded); returns the status code and stderr.
    pub fn finish(mut self) -> (i32, String, Vec<TimedLine>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ferry run did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        use std::io::Read;
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        // The reader thread ends at EOF; collect what is left.
        std::thread::sleep(Duration::from_millis(20));
        self.seen.extend(self.lines.try_iter());
        (
            status.code().unwrap_or(-1),
            err,
            std::mem::take(&mut self.seen),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process in bytes.
pub fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A memory figure (e.g. `VmHWM:`, the peak resident memory) of a process, in bytes.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Runs `ferry ARGS` and asserts it succeeded (stderr shown if not).
pub fn ferry_ok(args: &[&str]) -> Output {
    let out = ferry(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Checks the guest's console across a move between two processes: vCPU 0's heartbeat goes
/// on with no number lost or repeated, and no line is torn at the hand-off. The destination's
/// very last line may be cut short: it was shut down mid-line and prints what the guest wrote.
pub fn assert_guest_moved_cleanly(src: &[TimedLine], dst: &[TimedLine]) {
    use ferry_guest::heartbeat::{parse_line, GuestLine, HeartbeatLog};
    let mut log = HeartbeatLog::default();
    let whole = dst.len().saturating_sub(1);
    for (i, (at, l)) in src.iter().chain(dst).enumerate() {
        let last = i == src.len() + whole;
        match parse_line(l) {
            GuestLine::Heartbeat { cpu: 0, seq, tsc } => log.push(*at, seq, tsc),
            GuestLine::Other(_) if last => {}
            GuestLine::Other(_) => panic!("torn console line {l:?}"),
            _ => {}
        }
    }
    log.check_continuous()
        .expect("no heartbeat lost or repeated across the move");
}

/// The highest heartbeat number vCPU 0 has printed in `lines`.
pub fn last_beat(lines: &[TimedLine]) -> u64 {
    use ferry_guest::heartbeat::{parse_line, GuestLine};
    lines
        .iter()
        .filter_map(|l| match parse_line(&l.1) {
            GuestLine::Heartbeat { cpu: 0, seq, .. } => Some(seq),
            _ => None,
        })
        .max()
        .expect("a heartbeat")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 2-vCPU, 256 MiB `ferry run` with API socket `sock` running `guest` (vCPU 1 verifying
/// its region), once vCPU 1 has checked its region once.
pub fn source_vm(sock: &std::path::Path, guest: &str) -> Running {
    let mut src = Running::start(&[
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--guest",
        guest,
    ]);
    src.wait_line(|l| l.starts_with("V1 1 ok"));
    src
}

/// Starts `ferry receive` on a free port with an API socket; returns it and its address.
pub fn receiver(sock: &std::path::Path) -> (Running, String) {
    receiver_with(sock, &[])
}

/// As [`receiver`], with more arguments (e.g. `--storage-dir DIR`).
pub fn receiver_with(sock: &std::path::Path, extra: &[&str]) -> (Running, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--insecure",
        "--listen",
        &addr,
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = Running::start_cmd("receive", &args);
    // The receiver takes the first connection as its migration: wait for its socket file,
    // not its port.
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (r, addr)
}

/// Runs `ferry migrate --insecure --to TO --api-socket SOCK EXTRA...` and asserts it succeeded.
pub fn migrate_ok(to: &str, sock: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", "--insecure", "--to", to, "--api-socket", sock];
    args.extend_from_slice(extra);
    ferry_ok(&args)
}

/// Starts `ferry migrate --to TO --api-socket SOCK EXTRA...` in the background, its output
/// piped (read it with `wait_with_output`).
pub fn spawn_migrate(to: &str, sock: &str, extra: &[&str]) -> Child {
    Command::new(FERRY)
        .args(["migrate", "--insecure", "--to", to, "--api-socket", sock])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry migrate")
}

/// One HTTP/1.1 request on a fresh connection; (status, body), or (0, "") when the
/// connection fails.
pub fn exchange<S: std::io::Read + std::io::Write>(
    mut s: S,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).and_then(|_| s.flush()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw); // what came before an error or a reset still counts
    let out = String::from_utf8_lossy(&raw);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// One request over a VMM's API socket, which must exist; (status, body).
pub fn api(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    try_api(sock, method, path, body).expect("connect to the API socket")
}

/// As [`api`], None when nothing listens on the socket.
pub fn try_api(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    Some(exchange(s, method, path, body))
}

static AGENT_TLS: std::sync::OnceLock<ferry_migration::tls::TlsClient> = std::sync::OnceLock::new();

/// From now on [`http`] calls agents over TLS with these credentials (agents started with
/// `--tls-cert`).
pub fn http_tls(cert: &str, key: &str, ca: &str) {
    let files = ferry_migration::tls::TlsFiles {
        cert: cert.into(),
        key: key.into(),
        ca: ca.into(),
        peers: Vec::new(),
    };
    let _ = AGENT_TLS.set(ferry_migration::tls::TlsClient::new(&files).unwrap());
}

/// One request to a cluster agent's API over TCP (TLS after [`http_tls`]); (0, "") when it
/// cannot be reached.
/// Counter or gauge `name` from the agent (or VMM API) at `addr`'s `/metrics`.
pub fn metric_at(addr: &str, name: &str) -> Option<u64> {
    let (_, body) = http(addr, "GET", "/metrics", "");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    match AGENT_TLS.get() {
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            match tls.handshake(s, host) {
                Ok(c) => exchange(c, method, path, body),
                Err(_) => (0, String::new()),
            }
        }
        None => exchange(s, method, path, body),
    }
}
