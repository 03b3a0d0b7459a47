//! Post-copy through the CLI: `ferry migrate --postcopy-after 0` between two processes; the
//! link (a proxy) dies in the middle of the post-copy, the source's automatic retries cannot
//! reach it, and `ferry migrate --resume-postcopy --to` a new path finishes the move. The
//! guest's heartbeat is continuous across both processes and its own memory check passes.
mod common;
use common::*;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A TCP forwarder that can be killed: its listener closes and every connection through it
/// is cut.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn new(to: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((a, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                a.set_nonblocking(false).unwrap();
                let Ok(b) = TcpStream::connect(&to) else {
                    continue;
                };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                {
                    let mut g = c.lock().unwrap();
                    g.push(a.try_clone().unwrap());
                    g.push(b.try_clone().unwrap());
                }
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Proxy { port, conns, stop }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The migration's status (Null before one has begun).
fn migration_status(sock: &str) -> serde_json::Value {
    let out = ferry(&["vm", "migration", "--api-socket", sock]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn wait_phase(sock: &str, phase: &str) -> serde_json::Value {
    for _ in 0..300 {
        let v = migration_status(sock);
        if v["phase"] == phase {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("never reached phase {phase}: {}", migration_status(sock));
}

#[test]
fn post_copy_survives_a_dead_link_and_resumes_over_a_new_path() {
    let s = Scratch::new("postcopy");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let a = a.to_str().unwrap().to_string();
    let mut src = Running::start(&[
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--api-socket",
        &a,
        "--guest",
        "dirty size=64M rate=20M hb=2000 ; verify size=16M",
    ]);
    // Once the dirty region has been written whole, ~85 MiB are populated: all of it moves
    // after the switch.
    src.wait_line(|l| l.starts_with("V1 1 ok"));
    src.wait_line(|l| l == "D0 1");
    let (mut dst, addr) = receiver(&b);
    let first = Proxy::new(addr.clone());
    let mig = spawn_migrate(
        &first.addr(),
        &a,
        &["--postcopy-after", "0", "--max-bandwidth", "12M", "--quiet"],
    );
    // ~85 MiB at 12 MB/s: several seconds of post-copy. The VM runs on the destination, whose
    // API serves it already, but refuses what would read memory that has not arrived.
    let v = wait_phase(&a, "post_copy");
    assert!(v["pass_pages"].as_u64().unwrap() > 0, "{v}");
    dst.wait_line(|l| l.starts_with("H0 "));
    let b_sock = b.to_str().unwrap();
    let out = ferry_ok(&["vm", "info", "--api-socket", b_sock]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
    let out = ferry(&[
        "migrate",
        "--insecure",
        "--api-socket",
        b_sock,
        "--to",
        "127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("still arriving by post-copy"));
    // A migration cannot be cancelled once the destination runs the VM, and the source's
    // paused copy can be neither resumed (two running copies) nor shut down (pages lost).
    let out = ferry(&["vm", "cancel-migration", "--api-socket", &a]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("switch-over"));
    for op in ["resume", "shutdown"] {
        let out = ferry(&["vm", op, "--api-socket", &a]);
        assert_eq!(out.status.code(), Some(1), "{op}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("migration of this VM is running"));
    }
    std::thread::sleep(Duration::from_millis(500));
    first.kill();
    if migration_status(&a).is_null() {
        let out = mig.wait_with_output().unwrap();
        panic!(
            "the source ended early: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v = wait_phase(&a, "post_copy_paused");
    assert!(
        v["error"].as_str().unwrap_or("").contains("link lost"),
        "{v}"
    );
    // The automatic retries go to the dead proxy; an operator points it at a new path.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(migration_status(&a)["phase"], "post_copy_paused");
    let second = Proxy::new(addr);
    let out = ferry_ok(&[
        "migrate",
        "--insecure",
        "--api-socket",
        &a,
        "--resume-postcopy",
        "--to",
        &second.addr(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("reconnect"));
    let out = mig.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("post-copy:") && text.contains("1 link recoveries"),
        "{text}"
    );
    let (code, _, src_lines) = src.finish();
    assert_eq!(code, 0, "the source stops once every page has gone");
    // The guest goes on, and its own memory check keeps passing.
    let n = dst.seen.len();
    dst.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok "));
    dst.wait_line(|l| l.starts_with("D0 "));
    assert!(dst.seen.len() > n);
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("post-copy:"), "{err}");
    assert!(!dst_lines.iter().any(|l| l.1.contains("BAD")));
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
}

#[test]
fn a_destination_killed_in_post_copy_leaves_the_source_paused_never_running_twice() {
    let s = Scratch::new("postcopy-kill");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let a = a.to_str().unwrap().to_string();
    let mut src = Running::start(&[
        "--memory",
        "256M",
        "--api-socket",
        &a,
        "--guest",
        "dirty size=32M rate=40M hb=2000",
    ]);
    src.wait_line(|l| l == "D0 1");
    let (mut dst, addr) = receiver(&b);
    let mig = spawn_migrate(
        &addr,
        &a,
        &["--postcopy-after", "0", "--max-bandwidth", "4M", "--quiet"],
    );
    wait_phase(&a, "post_copy");
    dst.wait_line(|l| l.starts_with("H0 "));
    dst.child.kill().unwrap();
    let v = wait_phase(&a, "post_copy_paused");
    assert!(
        v["error"].as_str().unwrap_or("").contains("link lost"),
        "{v}"
    );
    // Part of the VM's newest memory died with the destination: the source never resumes its
    // older copy by itself, and refuses to be resumed while the migration waits.
    std::thread::sleep(Duration::from_millis(1500));
    let info = ferry_ok(&["vm", "info", "--api-socket", &a]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("paused"));
    let out = ferry(&["vm", "resume", "--api-socket", &a]);
    assert_eq!(out.status.code(), Some(1));
    src.seen.extend(src.lines.try_iter());
    let n = src.seen.len();
    std::thread::sleep(Duration::from_millis(500));
    src.seen.extend(src.lines.try_iter());
    assert!(
        !src.seen[n..].iter().any(|l| l.1.starts_with("H0 ")),
        "the source's guest stays stopped"
    );
    src.child.kill().unwrap();
    let _ = mig.wait_with_output();
}
