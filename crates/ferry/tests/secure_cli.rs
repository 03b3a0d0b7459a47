//! A receiver nothing knocks over, and TLS migrations with `ferry certs`, through the CLI.
mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn wait_for_socket(p: &std::path::Path) {
    for _ in 0..500 {
        if p.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never appeared", p.display());
}

fn source(sock: &std::path::Path) -> Running {
    source_vm(sock, "dirty size=16M rate=20M hb=2000 ; verify size=8M")
}

/// The receiver's stderr lines that report an ignored connection.
fn ignored(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| l.contains("ignored a connection"))
        .collect()
}

#[test]
fn probes_garbage_silence_and_old_versions_do_not_stop_a_receiver() {
    let s = Scratch::new("knock");
    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let src = source(&a);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
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
    wait_for_socket(&b);
    // A port probe, garbage, a silent connection held open, an older Ferry's Hello.
    drop(TcpStream::connect(&addr).unwrap());
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[42u8; 64]).unwrap();
    let silent = TcpStream::connect(&addr).unwrap();
    let silent_since = Instant::now();
    let mut old = TcpStream::connect(&addr).unwrap();
    let mut payload = b"FERRYMIG".to_vec();
    payload.extend([1u8, 0, 0]); // postcard varints: version 1, caps 0, empty config
    let mut frame = vec![1u8, 0, 0, 0];
    frame.extend((payload.len() as u32).to_le_bytes());
    frame.extend(crc32c::crc32c(&payload).to_le_bytes());
    frame.extend([0u8; 4]);
    frame.extend(&payload);
    old.write_all(&frame).unwrap();
    match ferry_migration::protocol::recv(&mut old) {
        Ok(ferry_migration::protocol::Message::Abort(why)) => assert!(
            why.contains(&format!(
                "peer speaks migration protocol version 1, this Ferry speaks {}",
                ferry_migration::protocol::VERSION
            )),
            "{why}"
        ),
        other => panic!("the older Ferry hears why: {other:?}"),
    }
    // A real migration, with the silent connection still open.
    let out = migrate_ok(&addr, a.to_str().unwrap(), &["--quiet"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("downtime"));
    let (code, _, src_lines) = src.finish();
    assert_eq!(code, 0);
    dst.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok "));
    // The silent connection is closed after its deadline (5 s), not waited on.
    while silent_since.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0, "{err}");
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
    let lines = ignored(&err);
    assert_eq!(
        lines.len(),
        4,
        "one line per connection turned away:\n{err}"
    );
    for what in [
        "closed without sending anything",
        "unknown frame kind 42",
        "version 1",
        "sent nothing within 5s",
    ] {
        assert_eq!(
            lines.iter().filter(|l| l.contains(what)).count(),
            1,
            "{what}:\n{err}"
        );
    }
    assert!(!err.contains("(os error 11): Resource"), "{err}");
    drop((garbage, silent));
}

struct Pki(std::path::PathBuf);

impl Pki {
    fn new(s: &Scratch) -> Self {
        let d = s.path("pki");
        let dir = d.to_str().unwrap();
        ferry_ok(&["certs", "init", "--dir", dir]);
        for n in ["src.test", "dst.test", "other.test"] {
            let out = ferry_ok(&["certs", "issue", n, "--dir", dir]);
            assert!(String::from_utf8_lossy(&out.stdout).contains("--tls-cert"));
        }
        // "foreign": src.test's name from another CA; "old": src.test from this CA, expired.
        let other = s.path("other-ca");
        ferry_ok(&["certs", "init", "--dir", other.to_str().unwrap()]);
        ferry_ok(&[
            "certs",
            "issue",
            "src.test",
            "--dir",
            other.to_str().unwrap(),
        ]);
        let old = s.path("old");
        std::fs::create_dir_all(&old).unwrap();
        for f in ["ca.pem", "ca.key"] {
            std::fs::copy(d.join(f), old.join(f)).unwrap();
        }
        let past = time::OffsetDateTime::now_utc() - time::Duration::days(100);
        ferry_migration::certs::issue_at(&old, "src.test", past, 30).unwrap();
        for (from, to) in [(&other, "foreign"), (&old, "old")] {
            for ext in ["pem", "key"] {
                std::fs::copy(
                    from.join(format!("src.test.{ext}")),
                    d.join(format!("{to}.{ext}")),
                )
                .unwrap();
            }
        }
        Pki(d)
    }

    fn args(&self, me: &str) -> Vec<String> {
        let p = |f: &str| self.0.join(f).to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            p(&format!("{me}.pem")),
            "--tls-key".into(),
            p(&format!("{me}.key")),
            "--tls-ca".into(),
            p("ca.pem"),
        ]
    }
}

#[test]
fn tls_migration_with_ferry_certs_refuses_every_wrong_peer_first() {
    let s = Scratch::new("tls");
    let pki = Pki::new(&s);
    // A key others can read is refused before anything listens.
    let loose = s.path("loose.key");
    std::fs::copy(pki.0.join("dst.test.key"), &loose).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bad = pki.args("dst.test");
    bad[3] = loose.to_string_lossy().into_owned();
    let mut argv = vec!["receive", "--listen", "127.0.0.1:0"];
    argv.extend(bad.iter().map(String::as_str));
    let out = ferry(&argv);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by others"), "{err}");
    assert!(!err.contains("BEGIN"), "no key material: {err}");

    let (a, b) = (s.path("a.sock"), s.path("b.sock"));
    let mut src = source(&a);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut argv = vec![
        "--listen".to_string(),
        addr.clone(),
        "--api-socket".into(),
        b.to_string_lossy().into_owned(),
        "--tls-peer".into(),
        "src.test".into(),
    ];
    argv.extend(pki.args("dst.test"));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut dst = Running::start_cmd("receive", &argv);
    wait_for_socket(&b);
    let migrate = |me: &str, peer: &str, extra: &[&str]| {
        let mut argv = vec![
            "migrate".to_string(),
            "--to".into(),
            addr.clone(),
            "--api-socket".into(),
            a.to_string_lossy().into_owned(),
            "--quiet".into(),
        ];
        if me.is_empty() {
            argv.push("--insecure".into());
        } else {
            argv.extend(pki.args(me));
            argv.extend(["--tls-peer".into(), peer.into()]);
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        ferry(&argv)
    };
    // Neither TLS nor --insecure: refused before connecting.
    let out = ferry(&[
        "migrate",
        "--to",
        &addr,
        "--api-socket",
        a.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    // A source whose name the receiver does not allow; a destination the source does not
    // expect; plain TCP against TLS: each refused, the VM runs on here.
    for (me, peer, want) in [
        ("other.test", "dst.test", "refused this host"),
        ("foreign", "dst.test", "alert UnknownCA"),
        ("old", "dst.test", "refused this host"),
        (
            "src.test",
            "elsewhere.test",
            "allowed peers (elsewhere.test)",
        ),
        ("", "", "does it expect TLS"),
    ] {
        let out = migrate(me, peer, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{me}: {err}");
        assert!(err.contains("the VM keeps running here"), "{me}: {err}");
        assert!(err.contains(want), "{me}: {err}");
        let n = src.seen.len();
        src.wait_line(|l| l.starts_with("H0 "));
        assert!(src.seen.len() > n);
    }
    // The right pair of certificates.
    let out = migrate("src.test", "dst.test", &["--connections", "2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, src_lines) = src.finish();
    assert_eq!(code, 0);
    dst.wait_line(|l| l.starts_with("V1 ") && l.contains(" ok "));
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, dst_lines) = dst.finish();
    assert_eq!(code, 0, "{err}");
    assert_guest_moved_cleanly(&src_lines, &dst_lines);
    assert!(err.contains("TLS 1.3"), "{err}");
    let lines = ignored(&err);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("none of the allowed peers (src.test)")),
        "{err}"
    );
    for why in ["UnknownIssuer", "certificate expired"] {
        assert!(lines.iter().any(|l| l.contains(why)), "{why}: {err}");
    }
    assert!(lines.len() >= 5, "{err}");
}
