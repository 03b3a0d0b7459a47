//! Migrations under TLS against the fake VM: page-exact with several connections and
//! compression, a post-copy, and an altered byte refused without resuming anything.
mod fake;
use fake::*;
use ferry_migration::certs;
use ferry_migration::engine::{EngineError, Options};
use ferry_migration::protocol::{Compression, ProtocolError};
use ferry_migration::tls::{TlsClient, TlsFiles, TlsServer};
use std::path::PathBuf;

struct Pki(PathBuf);

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pki(tag: &str) -> (Pki, TlsServer, TlsClient) {
    let d = std::env::temp_dir().join(format!("ferry-fake-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    certs::init_ca(&d, 1).unwrap();
    certs::issue(&d, "src.test", 1).unwrap();
    certs::issue(&d, "dst.test", 1).unwrap();
    let files = |me: &str, peer: &str| {
        let (cert, key) = certs::host_paths(&d, me);
        TlsFiles {
            cert,
            key,
            ca: certs::ca_paths(&d).0,
            peers: vec![peer.into()],
        }
    };
    let server = TlsServer::new(&files("dst.test", "src.test")).unwrap();
    let client = TlsClient::new(&files("src.test", "dst.test")).unwrap();
    (Pki(d), server, client)
}

#[test]
fn a_tls_migration_over_four_connections_arrives_page_exact() {
    let (_pki, server, client) = pki("exact");
    let src = FakeSource::new(8192, 256);
    let p = pair_tls(None, server, client);
    assert!(p.ctl.is_tls());
    let opts = Options {
        connections: 4,
        compression: Compression::Zstd,
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    assert!(rep.passes.len() >= 2);
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn a_tls_post_copy_arrives_page_exact() {
    let (_pki, server, client) = pki("pc");
    let src = FakeSource::new(4096, 64);
    let p = pair_tls(None, server, client);
    let opts = Options {
        postcopy_after: Some(1),
        connections: 2,
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    assert!(rep.postcopy.is_some());
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}

#[test]
fn a_byte_altered_under_tls_fails_cleanly_and_nothing_resumes() {
    for victim in [0usize, 1] {
        let (_pki, server, client) = pki(&format!("flip{victim}"));
        let src = FakeSource::new(4096, 16);
        // Past the handshake (a client's first two writes: ClientHello, then its certificate
        // flight) and its first frame: inside a record of the migration itself.
        let mut chunks = std::collections::HashMap::<usize, usize>::new();
        let tamper: Tamper = Box::new(move |conn, _, chunk: &mut Vec<u8>| {
            let n = chunks.entry(conn).or_default();
            *n += 1;
            if conn == victim && *n == 4 {
                let i = chunk.len() / 2;
                chunk[i] ^= 0x01;
            }
            Flow::Go
        });
        let p = pair_tls(Some(tamper), server, client);
        let opts = Options {
            connections: 2,
            ..Options::default()
        };
        let e = p.migrate(&src, &opts).unwrap_err();
        let de = assert_rolled_back(&src, p);
        let all = format!("{e} / {de}");
        assert!(all.contains("integrity check"), "{victim}: {all}");
        assert!(
            matches!(de, EngineError::Protocol(ProtocolError::Tls(_)))
                || matches!(e, EngineError::Protocol(ProtocolError::Tls(_))),
            "{all}"
        );
    }
}

#[test]
fn a_tls_post_copy_recovers_a_cut_link_with_fresh_tls_connections() {
    let (_pki, server, client) = pki("recover");
    let src = FakeSource::new(4096, 64);
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = cut.clone();
    let tamper: Tamper = Box::new(move |conn, seen, _| {
        use std::sync::atomic::Ordering;
        (!(conn == 1 && seen > 4 << 20 && !c.swap(true, Ordering::SeqCst))).into()
    });
    let p = pair_tls(Some(tamper), server, client);
    let opts = Options {
        postcopy_after: Some(0),
        max_bandwidth: Some(8 << 20),
        ..Options::default()
    };
    let rep = p.migrate(&src, &opts).unwrap();
    assert!(cut.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(rep.postcopy.unwrap().recoveries, 1);
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
}
