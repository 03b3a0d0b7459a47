//! Live migration through the CLI: `ferry receive` on one side, `ferry migrate --to` on the
//! other, the guest's heartbeat continuous across both processes and its own memory check
//! passing after the move; failures leave the source running and start nothing.
mod common;
use common::*;

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
        "--insecure",
        "--to",
        "127.0.0.1:1",
        "--api-socket",
        a.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the VM keeps running here"));
    let mut dst = Running::start_cmd(
        "receive",
        &[
            "--insecure",
            "--listen",
            &addr,
            "--api-socket",
            b.to_str().unwrap(),
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = migrate_ok(&addr, a.to_str().unwrap(), &["--compress", "lz4"]);
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
fn ten_ping_pong_migrations_through_the_cli() {
    let s = Scratch::new("pingpong");
    let mut sock = s.path("h0.sock");
    let mut host = Running::start(&[
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--guest",
        "dirty size=16M rate=20M hb=2000 ; verify size=8M",
    ]);
    host.wait_line(|l| l.starts_with("V1 1 ok"));
    let mut all = Vec::new();
    for hop in 1..=10 {
        let next = s.path(&format!("h{hop}.sock"));
        let (mut dst, addr) = receiver(&next);
        let conns = if hop % 2 == 0 { "1" } else { "3" };
        let out = ferry_ok(&[
            "migrate",
            "--insecure",
            "--to",
            &addr,
            "--api-socket",
            sock.to_str().unwrap(),
            "--connections",
            conns,
            "--quiet",
        ]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("downtime"));
        let (code, err, lines) = host.finish();
        assert_eq!(
            code, 0,
            "hop {hop}: the source stops after the hand-off: {err}"
        );
        all.extend(lines);
        dst.wait_line(|l| l.starts_with("H0 "));
        host = dst;
        sock = next;
    }
    // The guest's own memory check runs on after ten moves.
    let n = host.seen.len();
    host.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok "));
    assert!(host.seen.len() > n);
    ferry_ok(&["vm", "shutdown", "--api-socket", sock.to_str().unwrap()]);
    let (code, err, lines) = host.finish();
    assert_eq!(code, 0, "{err}");
    assert!(
        !all.iter().chain(&lines).any(|l| l.1.contains("BAD")),
        "the guest's memory check failed"
    );
    assert_guest_moved_cleanly(&all, &lines);
}

#[test]
fn a_copy_behind_the_vcpus_still_moves_the_vm_intact() {
    let s = Scratch::new("lowprio");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let mut src = Running::start(&[
        "--memory",
        "128M",
        "--api-socket",
        a.to_str().unwrap(),
        "--guest",
        "verify size=16M hb=2000",
    ]);
    src.wait_line(|l| l.starts_with("V0 1 ok"));
    let (mut dst, addr) = receiver(&b);
    let out = migrate_ok(
        &addr,
        a.to_str().unwrap(),
        &["--copy-priority", "low", "--quiet"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("downtime"));
    let (code, err, src_lines) = src.finish();
    assert_eq!(code, 0, "the source stops after the hand-off: {err}");
    // The guest's own checksum of its memory goes on passing there.
    let n = dst.seen.len();
    dst.wait_line(|l| l.starts_with("V0 ") && l.contains(" ok "));
    assert!(dst.seen.len() > n);
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0, "{err}");
    assert!(
        !dst_lines.iter().any(|l| l.1.contains("BAD")),
        "the guest's memory check failed"
    );
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
}

#[test]
fn progress_is_visible_and_cancel_keeps_the_vm_here() {
    let s = Scratch::new("cancel");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let mut src = Running::start(&[
        "--memory",
        "256M",
        "--api-socket",
        a.to_str().unwrap(),
        "--guest",
        "dirty size=64M rate=10M hb=5000",
    ]);
    src.wait_line(|l| l == "D0 1");
    let (dst, addr) = receiver(&b);
    let mig = spawn_migrate(
        &addr,
        a.to_str().unwrap(),
        &["--max-bandwidth", "8M", "--connections", "2", "--quiet"],
    );
    // 64 MiB at 8 MB/s takes ~8 s: watch it, then cancel it.
    let mut progress = serde_json::Value::Null;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let out = ferry(&["vm", "migration", "--api-socket", a.to_str().unwrap()]);
        if out.status.success() {
            progress = serde_json::from_slice(&out.stdout).unwrap();
            if progress["pass_sent"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
    }
    assert_eq!(progress["phase"], "pre_copy", "{progress}");
    assert_eq!(progress["pass"], 1);
    assert!(
        progress["pass_pages"].as_u64().unwrap() >= 16384,
        "{progress}"
    );
    assert!(progress["wire_bytes"].as_u64().unwrap() > 0);
    ferry_ok(&[
        "vm",
        "cancel-migration",
        "--api-socket",
        a.to_str().unwrap(),
    ]);
    let out = mig.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cancelled") && err.contains("keeps running here"),
        "{err}"
    );
    let (code, err, lines) = dst.finish();
    assert_eq!(code, 1);
    assert!(
        err.contains("nothing was started") && err.contains("cancelled"),
        "{err}"
    );
    assert!(lines.is_empty());
    // The source goes on; its migration status says what happened.
    let n = src.seen.len();
    src.wait_line(|l| l.starts_with("H0 "));
    assert!(src.seen.len() > n);
    let out = ferry_ok(&["vm", "migration", "--api-socket", a.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "cancelled", "{v}");
    let out = ferry(&[
        "vm",
        "cancel-migration",
        "--api-socket",
        a.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "nothing left to cancel");
    ferry_ok(&["vm", "shutdown", "--api-socket", a.to_str().unwrap()]);
    assert_eq!(src.finish().0, 0);
}

#[test]
fn a_killed_receiver_leaves_the_source_running_and_exact() {
    let s = Scratch::new("killdst");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let mut src = source_vm(&a, "dirty size=32M rate=10M hb=5000 ; verify size=32M");
    let (mut dst, addr) = receiver(&b);
    let mig = spawn_migrate(
        &addr,
        a.to_str().unwrap(),
        &["--max-bandwidth", "16M", "--quiet"],
    );
    std::thread::sleep(std::time::Duration::from_millis(700));
    dst.child.kill().unwrap();
    let out = mig.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("keeps running here"), "{err}");
    // The source runs on and its own memory check keeps passing.
    let n = src.seen.len();
    src.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok ") && !l.starts_with("V1 1 "));
    assert!(src.seen.len() > n);
    ferry_ok(&["vm", "shutdown", "--api-socket", a.to_str().unwrap()]);
    let (code, _, lines) = src.finish();
    assert_eq!(code, 0);
    assert!(!lines.iter().any(|l| l.1.contains("BAD")));
}

/// `ferry seed create` (the VM runs on), `ferry receive --seed DIR` + `ferry migrate
/// --seeded`: the seed taken earlier is the destination's; the first pass sends only what changed since, the guest's own memory
/// check passes on the destination. A seed that cannot be read is refused before listening.
#[test]
fn a_seeded_migration_through_the_cli() {
    let s = Scratch::new("seeded");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let seed = s.path("seed");
    let out = ferry(&["receive", "--insecure", "--listen", "127.0.0.1:0", "--seed"])
        .status
        .code();
    assert_eq!(out, Some(2), "--seed needs a directory");
    let bad = ferry(&[
        "receive",
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--seed",
        seed.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains("--seed"), "{err}");
    let src = source_vm(&a, "dirty size=16M rate=8M hb=5000 ; verify size=64M");
    let upd = s.path("seed-u1");
    let sock = a.to_str().unwrap();
    let early = ferry(&[
        "seed",
        "update",
        "--api-socket",
        sock,
        "--to",
        upd.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&early.stderr);
    assert_eq!(early.status.code(), Some(1), "{err}");
    assert!(err.contains("needs a seed"), "{err}");
    let out = ferry_ok(&[
        "seed",
        "create",
        "--api-socket",
        a.to_str().unwrap(),
        "--to",
        seed.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("while the guest ran"), "{text}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = ferry_ok(&[
        "seed",
        "update",
        "--api-socket",
        sock,
        "--to",
        upd.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("seed update"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (mut dst, addr) = receiver_with(&b, &["--seed", upd.to_str().unwrap()]);
    let out = migrate_ok(&addr, a.to_str().unwrap(), &["--seeded", "--quiet"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("seeded: "))
        .unwrap_or_else(|| panic!("{text}"));
    // The seed and its update came from this VM, its dirty log running since: no hashes.
    assert!(line.contains("dirty log"), "{line}");
    let p1 = text
        .lines()
        .find(|l| l.starts_with("pass  1"))
        .unwrap_or_else(|| panic!("{text}"));
    let pages: u64 = p1
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        pages < 16384,
        "pass 1 sent what changed since the update: {p1}"
    );
    let (code, _, src_lines) = src.finish();
    assert_eq!(code, 0);
    let n = dst.seen.len();
    dst.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok "));
    assert!(dst.seen.len() > n);
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the seed gave"), "{err}");
    assert!(!dst_lines.iter().any(|l| l.1.contains("BAD")));
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
}
