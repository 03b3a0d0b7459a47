//! The cluster API over mutual TLS 1.3 (docs/cluster.md, "Authentication"). An agent started
//! with `--tls-cert/--tls-key/--tls-ca` serves its API only to clients presenting a
//! certificate of the cluster's CA (other agents, the VMMs it starts, `ferry cluster
//! --tls-*`), with the same rustls configuration its migrations use
//! (`ferry_migration::tls`). A process talks to agents over TLS once [`use_tls`] was called
//! in it; before that, plain HTTP.
use anyhow::{Context, Result};
use ferry_migration::tls::{TlsClient, TlsFiles, TlsServer};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// How long a client has for its TLS handshake before its connection is dropped.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const HALF_OPEN: usize = 64;

static CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// From now on this process calls agents over TLS with these credentials (the agent's
/// certificate must be valid for the address called). The first call wins.
pub fn use_tls(files: &TlsFiles) -> Result<()> {
    let c = TlsClient::new(files).context("cluster API credentials")?;
    let _ = CLIENT.set(c.config());
    Ok(())
}

/// Whether this process calls agents over TLS.
pub fn client_tls() -> bool {
    CLIENT.get().is_some()
}

/// A connection to an agent: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to the agent at `addr` (HOST:PORT), over TLS when [`use_tls`] was called.
pub async fn connect(addr: &str) -> Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the agent at {addr}"))?;
    let Some(config) = CLIENT.get() else {
        return Ok(Box::new(tcp));
    };
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("agent address {addr}"))?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .with_context(|| {
            format!("TLS handshake with the agent at {addr} (is its API TLS, from the same CA?)")
        })?;
    Ok(Box::new(tls))
}

/// Accepted TLS connections for `axum::serve`: handshakes run on tasks of their own (a
/// slow or silent client holds up nobody), each within [`HANDSHAKE`]; a refused client is
/// logged once and dropped.
pub struct Listener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl Listener {
    /// Serves TLS on `tcp` with `server`'s configuration (call inside a tokio runtime).
    pub fn new(tcp: TcpListener, server: &TlsServer) -> Result<Listener> {
        let addr = tcp.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server.config());
        let (tx, rx) = tokio::sync::mpsc::channel(HALF_OPEN);
        let slots = Arc::new(tokio::sync::Semaphore::new(HALF_OPEN));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (sock, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("cluster API: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(sock)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => eprintln!("ferry host: cluster API: refused {peer}: {e}"),
                        Err(_) => eprintln!(
                            "ferry host: cluster API: refused {peer}: no TLS handshake within \
                             {HANDSHAKE:?}"
                        ),
                    }
                });
            }
        });
        Ok(Listener { rx, addr })
    }
}

impl axum::serve::Listener for Listener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
