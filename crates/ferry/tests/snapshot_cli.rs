//! Quick migration and snapshots through the CLI: `ferry snapshot`, `ferry migrate --quick`,
//! `ferry restore`, with the guest's heartbeat checked across hosts and bad snapshot
//! directories refused before anything starts.
mod common;
use common::*;
use ferry_guest::console::TimedLine;
use std::path::Path;

/// Runs a VM with `guest` until a line starts with `ready`, saves it to `dir` with
/// `ferry snapshot --then stop`, and returns its console lines.
fn saved_vm(sock: &Path, dir: &Path, guest: &str, ready: &str) -> Vec<TimedLine> {
    let mut vm = Running::start(&[
        "--memory",
        "128M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--guest",
        guest,
    ]);
    vm.wait_line(|l| l.starts_with(ready));
    ferry_ok(&[
        "snapshot",
        "--api-socket",
        sock.to_str().unwrap(),
        "--to",
        dir.to_str().unwrap(),
        "--then",
        "stop",
    ]);
    let (code, _, lines) = vm.finish();
    assert_eq!(code, 0);
    lines
}

#[test]
fn quick_migration_continues_the_guest_on_the_other_host() {
    let s = Scratch::new("quick");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let via = s.path("shared/vm1");
    let mut src = Running::start(&[
        "--memory",
        "512M",
        "--api-socket",
        a.to_str().unwrap(),
        "--guest",
        "dirty size=32M rate=20M hb=2000",
    ]);
    src.wait_line(|l| l == "D0 1");
    // A diff needs a parent: refused, and the VM keeps running.
    let out = ferry(&[
        "snapshot",
        "--api-socket",
        a.to_str().unwrap(),
        "--to",
        s.path("x").to_str().unwrap(),
        "--diff",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a previous snapshot"));
    let info = ferry(&["vm", "info", "--api-socket", a.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"running\""));

    let out = ferry_ok(&[
        "migrate",
        "--insecure",
        "--quick",
        "--via",
        via.to_str().unwrap(),
        "--api-socket",
        a.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ferry restore --from"));
    let (code, _, src_lines) = src.finish();
    assert_eq!(code, 0, "the source stops cleanly after the hand-off");

    let mut dst = Running::start_cmd(
        "restore",
        &[
            "--from",
            via.to_str().unwrap(),
            "--api-socket",
            b.to_str().unwrap(),
        ],
    );
    let want = format!("H0 {} ", last_beat(&src_lines) + 50);
    dst.wait_line(|l| l.starts_with(&want));
    dst.wait_line(|l| l.starts_with("D0 "));
    assert_eq!(
        ferry(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0);
    assert!(err.contains("ready in"), "{err}");
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
}

#[test]
fn bad_snapshot_directories_start_nothing() {
    let s = Scratch::new("badsnap");
    let dir = s.path("snap");
    std::fs::create_dir_all(&dir).unwrap();
    let check = |expect: &str| {
        let out = ferry(&["restore", "--from", dir.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            out.stdout.is_empty(),
            "nothing may run: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expect), "{err:?} lacks {expect:?}");
    };
    check("snapshot.fsnap: No such file");
    std::fs::write(dir.join("snapshot.fsnap"), vec![7u8; 200]).unwrap();
    check("not a Ferry snapshot (bad magic)");
    // A real snapshot, then damaged in several ways.
    let sock = s.path("a.sock");
    saved_vm(&sock, &dir, "verify size=8M", "V0 0 ok");
    let state = std::fs::read(dir.join("snapshot.fsnap")).unwrap();
    let mem = std::fs::read(dir.join("memory.bin")).unwrap();
    let mut v = state.clone();
    v[8] = 9;
    std::fs::write(dir.join("snapshot.fsnap"), &v).unwrap();
    check("format version 9 is not supported");
    let mut v = state.clone();
    let n = v.len();
    v[n - 10] ^= 0xff;
    std::fs::write(dir.join("snapshot.fsnap"), &v).unwrap();
    check("CRC mismatch in section");
    std::fs::write(dir.join("snapshot.fsnap"), &state[..state.len() - 40]).unwrap();
    check("truncated");
    let mut v = state.clone();
    v[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(dir.join("snapshot.fsnap"), &v).unwrap();
    check("more than the");
    std::fs::write(dir.join("snapshot.fsnap"), &state).unwrap();
    let mut m = mem.clone();
    m[5000] ^= 1;
    std::fs::write(dir.join("memory.bin"), &m).unwrap();
    check("CRC mismatch in memory run");
    std::fs::write(dir.join("memory.bin"), &mem[..mem.len() / 2]).unwrap();
    check("truncated: run at gpa");
    // Intact again: it restores and the guest's own check passes.
    std::fs::write(dir.join("memory.bin"), &mem).unwrap();
    let mut r = Running::start_cmd(
        "restore",
        &[
            "--from",
            dir.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    r.wait_line(|l| l.starts_with("V0 2 ok"));
    assert_eq!(
        ferry(&["vm", "shutdown", "--api-socket", sock.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(r.finish().0, 0);
}

#[test]
fn migrate_needs_quick_for_now() {
    let out = ferry(&["migrate", "--via", "/tmp/x", "--api-socket", "/tmp/y"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--quick"));
}

#[test]
fn an_empty_vmm_takes_a_vm_through_the_api() {
    let s = Scratch::new("empty");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let dir = s.path("snap");
    let src_lines = saved_vm(&a, &dir, "heartbeat period=2000", "H0 10 ");
    // The destination VMM starts empty.
    let mut dst = Running::start(&["--api-socket", b.to_str().unwrap()]);
    let wait_sock = std::time::Instant::now();
    while !b.exists() && wait_sock.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let info = ferry(&["vm", "info", "--api-socket", b.to_str().unwrap()]);
    assert_eq!(info.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&info.stderr).contains("no VM here yet"));
    let bad = ferry(&[
        "vm",
        "restore",
        "--api-socket",
        b.to_str().unwrap(),
        "--from",
        "/nonexistent",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("restoring from /nonexistent"));
    ferry_ok(&[
        "vm",
        "restore",
        "--api-socket",
        b.to_str().unwrap(),
        "--from",
        dir.to_str().unwrap(),
    ]);
    let again = ferry(&[
        "vm",
        "restore",
        "--api-socket",
        b.to_str().unwrap(),
        "--from",
        dir.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a VM"));
    let want = format!("H0 {} ", last_beat(&src_lines) + 1);
    dst.wait_line(|l| l.starts_with(&want));
    assert_eq!(
        ferry(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(dst.finish().0, 0);
}

#[test]
fn a_restored_vm_announces_itself_on_its_tap() {
    let s = Scratch::new("announce");
    let tap = ferry_guest::net::HostTap::create(
        &format!("fra{}", std::process::id() % 10000),
        (std::process::id() % 200) as u8 + 20,
        0,
    )
    .expect("a tap (root and iproute2)");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let via = s.path("saved");
    let net = format!("tap={}", tap.name);
    let mut src = Running::start(&[
        "--memory",
        "128M",
        "--api-socket",
        a.to_str().unwrap(),
        "--guest",
        &format!("net ip={}", tap.guest()),
        "--net",
        &net,
    ]);
    src.wait_line(|l| l.starts_with("M0 52:54:00:12:34:56"));
    ferry_ok(&[
        "snapshot",
        "--api-socket",
        a.to_str().unwrap(),
        "--to",
        via.to_str().unwrap(),
        "--then",
        "stop",
    ]);
    assert_eq!(src.finish().0, 0);
    // Restored (here, or on another host that sees the same tap name), the VM announces
    // itself: five RARPs from its NIC.
    let watch = ferry_guest::net::RarpWatch::start(&tap.name).unwrap();
    let dst = Running::start_cmd(
        "restore",
        &[
            "--from",
            via.to_str().unwrap(),
            "--api-socket",
            b.to_str().unwrap(),
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let seen = watch.stop();
    assert_eq!(
        ferry(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let _ = dst.finish();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(_, m)| *m == [0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        "{seen:?}"
    );
}
