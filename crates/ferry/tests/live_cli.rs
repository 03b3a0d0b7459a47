//! Live migration through the CLI: `ferry receive` on one side, `ferry migrate --to` on the
//! other, the guest's heartbeat continuous across both processes and its own memory check
//! passing after the move; failures leave the source running and start nothing.
mod common;
use common::*;
use std::io::Write;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_listener(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("receiver never listened on {port}");
}

#[test]
fn live_migration_between_two_processes() {
    let s = Scratch::new("live");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut src = Running::start(&[
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--api-socket",
        a.to_str().unwrap(),
        "--guest",
        "dirty size=32M rate=20M hb=2000 ; verify size=16M",
    ]);
    src.wait_line(|l| l.starts_with("V1 1 ok"));
    // A migration to nowhere fails and changes nothing.
    let out = ferry(&[
        "migrate",
        "--to",
        "127.0.0.1:1",
        "--api-socket",
        a.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the VM keeps running here"));
    let mut dst = Running::start_cmd(
        "receive",
        &["--listen", &addr, "--api-socket", b.to_str().unwrap()],
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = ferry_ok(&[
        "migrate",
        "--to",
        &addr,
        "--api-socket",
        a.to_str().unwrap(),
        "--compress",
        "lz4",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("downtime") && text.contains("pass  1"),
        "{text}"
    );
    let (code, _, src_lines) = src.finish();
    assert_eq!(code, 0, "the source stops after the hand-off");
    // On the destination the guest goes on: heartbeats, dirty passes, memory checks.
    dst.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok "));
    let n = dst.seen.len();
    dst.wait_line(|l| l.starts_with("D0 "));
    assert!(dst.seen.len() > n);
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("it runs here now"), "{err}");
    assert!(
        !dst_lines.iter().any(|l| l.1.contains("BAD")),
        "the guest's memory check failed"
    );
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
}

#[test]
fn a_receiver_fed_garbage_starts_nothing() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = Running::start_cmd("receive", &["--listen", &addr]);
    wait_for_listener(port);
    // wait_for_listener's probe was the one connection the receiver accepts: it saw EOF.
    let (code, err, lines) = dst.finish();
    assert_eq!(code, 1);
    assert!(
        err.contains("nothing was started") && err.contains("closed"),
        "{err}"
    );
    assert!(lines.is_empty());

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = Running::start_cmd("receive", &["--listen", &addr]);
    let mut c = loop {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            break c;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    c.write_all(&[42u8; 64]).unwrap();
    let (code, err, lines) = dst.finish();
    assert_eq!(code, 1);
    assert!(err.contains("unknown frame kind 42"), "{err}");
    assert!(lines.is_empty());
}
