//! TLS 1.3 on migration connections: mutual authentication, refusals, full duplex, key updates.
use ferry_migration::certs;
use ferry_migration::protocol::{recv, send, Message};
use ferry_migration::tls::{TlsClient, TlsError, TlsFiles, TlsServer};
use ferry_migration::transport::Conn;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Pki {
    dir: PathBuf,
    other: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.other);
    }
}

fn pki(tag: &str) -> Pki {
    let base = std::env::temp_dir().join(format!("ferry-tls-{tag}-{}", std::process::id()));
    let (dir, other) = (base.join("ca"), base.join("other"));
    let _ = std::fs::remove_dir_all(&base);
    certs::init_ca(&dir, 30).unwrap();
    certs::issue(&dir, "src.test", 30).unwrap();
    certs::issue(&dir, "dst.test", 30).unwrap();
    certs::issue(&dir, "stranger.test", 30).unwrap();
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(400);
    certs::issue_at(&dir, "old.test", past, 30).unwrap();
    certs::init_ca(&other, 30).unwrap();
    certs::issue(&other, "src.test", 30).unwrap();
    Pki { dir, other }
}

fn files(dir: &Path, ca: &Path, name: &str, peers: &[&str]) -> TlsFiles {
    let (cert, key) = certs::host_paths(dir, name);
    TlsFiles {
        cert,
        key,
        ca: certs::ca_paths(ca).0,
        peers: peers.iter().map(|s| s.to_string()).collect(),
    }
}

/// A server that accepts one connection with `server`, echoes frames until the end, and
/// returns the handshake's result.
fn echo_server(server: TlsServer) -> (String, std::thread::JoinHandle<Result<(), TlsError>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let c = server.accept(s)?;
        // Full duplex: frames are read on this thread and answered from another.
        let (tx, rx) = std::sync::mpsc::channel();
        let w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            for m in rx {
                send(&mut w, &m).unwrap();
            }
        });
        let mut r = c;
        while let Ok(m) = recv(&mut r) {
            tx.send(m).unwrap();
        }
        drop(tx);
        writer.join().unwrap();
        Ok(())
    });
    (addr, h)
}

fn client(addr: &str, c: &TlsClient) -> Result<Conn, TlsError> {
    Conn::connect(addr, Some(c), Duration::from_secs(10))
}

#[test]
fn mutual_tls_carries_frames_both_ways_at_once_across_key_updates() {
    let p = pki("ok");
    let server = TlsServer::new(&files(&p.dir, &p.dir, "dst.test", &["src.test"]))
        .unwrap()
        .rekey_after(7);
    let (addr, h) = echo_server(server);
    let cl = TlsClient::new(&files(&p.dir, &p.dir, "src.test", &["dst.test"]))
        .unwrap()
        .rekey_after(5);
    let c = client(&addr, &cl).unwrap();
    assert!(c.is_tls());
    assert_eq!(c.peer_name().as_deref(), Some("dst.test"));
    let reader = c.try_clone().unwrap();
    let frames: Vec<Vec<u8>> = (0..200u32)
        .map(|i| {
            (0..(i as usize * 997) % 70_000)
                .map(|k| (k as u32 ^ i) as u8)
                .collect()
        })
        .collect();
    let expect = frames.clone();
    let got = std::thread::spawn(move || {
        let mut r = reader;
        (0..expect.len())
            .map(|_| match recv(&mut r).unwrap() {
                Message::State(s) => s,
                m => panic!("{}", m.name()),
            })
            .collect::<Vec<_>>()
            == expect
    });
    let mut w = c.try_clone().unwrap();
    for f in &frames {
        send(&mut w, &Message::State(f.clone())).unwrap();
    }
    assert!(got.join().unwrap(), "every frame came back intact");
    assert!(c.key_updates() > 100, "keys renewed ({})", c.key_updates());
    c.shutdown();
    h.join().unwrap().unwrap();
}

/// The server's and the client's error for a client with `client_files`.
fn refused(p: &Pki, client_files: TlsFiles, server_peers: &[&str]) -> (String, String) {
    let server = TlsServer::new(&files(&p.dir, &p.dir, "dst.test", server_peers)).unwrap();
    let (addr, h) = echo_server(server);
    let cl = TlsClient::new(&client_files).unwrap();
    let ce = match client(&addr, &cl) {
        // TLS 1.3: the client finishes first; the server's refusal shows on the first read.
        Ok(mut c) => {
            let _ = send(&mut c, &Message::Welcome);
            match recv(&mut c) {
                Ok(m) => panic!("the server answered {}", m.name()),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    };
    let se = h.join().unwrap().unwrap_err().to_string();
    (se, ce)
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let p = pki("ca");
    let (se, ce) = refused(
        &p,
        files(&p.other, &p.dir, "src.test", &["dst.test"]),
        &["src.test"],
    );
    assert!(se.contains("UnknownIssuer"), "{se}");
    assert!(!ce.is_empty());
}

#[test]
fn a_name_not_on_the_allow_list_is_refused() {
    let p = pki("name");
    let (se, _) = refused(
        &p,
        files(&p.dir, &p.dir, "stranger.test", &["dst.test"]),
        &["src.test"],
    );
    assert!(se.contains("none of the allowed peers (src.test)"), "{se}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let p = pki("old");
    let (se, _) = refused(
        &p,
        files(&p.dir, &p.dir, "old.test", &["dst.test"]),
        &["old.test"],
    );
    assert!(se.contains("certificate expired"), "{se}");
}

#[test]
fn the_source_refuses_a_destination_not_on_its_list() {
    let p = pki("srv");
    let server = TlsServer::new(&files(&p.dir, &p.dir, "stranger.test", &["src.test"])).unwrap();
    let (addr, h) = echo_server(server);
    let cl = TlsClient::new(&files(&p.dir, &p.dir, "src.test", &["dst.test"])).unwrap();
    let e = client(&addr, &cl).err().expect("refused").to_string();
    assert!(
        e.contains("NotValidForName") || e.contains("allowed"),
        "{e}"
    );
    assert!(h.join().unwrap().is_err());
}

#[test]
fn plain_tcp_and_tls_do_not_mix() {
    let p = pki("plain");
    // A plain client (no certificate) against a TLS server.
    let server = TlsServer::new(&files(&p.dir, &p.dir, "dst.test", &["src.test"])).unwrap();
    let (addr, h) = echo_server(server);
    let mut c = Conn::connect(&addr, None, Duration::from_secs(5)).unwrap();
    let _ = send(&mut c, &Message::Welcome);
    assert!(recv(&mut c).is_err());
    let se = h.join().unwrap().unwrap_err().to_string();
    assert!(se.contains("TLS handshake"), "{se}");
    // A TLS client against a plain peer that answers with a frame.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut c = Conn::plain(s);
        let _ = send(&mut c, &Message::Welcome);
        std::thread::sleep(Duration::from_millis(200));
    });
    let cl = TlsClient::new(&files(&p.dir, &p.dir, "src.test", &["dst.test"])).unwrap();
    let e = client(&addr, &cl).err().expect("refused").to_string();
    assert!(e.contains("TLS handshake"), "{e}");
}

#[test]
fn a_key_others_can_read_is_refused() {
    let p = pki("mode");
    let f = files(&p.dir, &p.dir, "src.test", &["dst.test"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = TlsClient::new(&f).err().expect("refused").to_string();
    assert!(e.contains("readable by others"), "{e}");
    assert!(
        !e.contains("PRIVATE KEY"),
        "no key material in the error: {e}"
    );
}
