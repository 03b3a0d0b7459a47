//! TLS 1.3 with mutual authentication for migration connections.
//!
//! rustls does the handshake (certificates checked against one CA, expiry, the peer's name
//! against an allow-list), then hands over the traffic secrets ([`rustls::kernel`], the API
//! kTLS uses); records are sealed and opened here with rustls's own TLS 1.3 record
//! protection (`MessageEncrypter`/`MessageDecrypter` of the negotiated AES-GCM suite).
//! Why not rustls's stream: a migration connection is read by one thread while others write
//! to it (acknowledgements, post-copy demands) and is shut down from a third to wake a
//! blocked sender; a buffered rustls connection is one `&mut` object for both directions.
//! With the secrets split, each direction has its own lock, the socket stays an ordinary
//! `TcpStream`, and the wire is standard TLS 1.3 (key updates included: AES-GCM keys are
//! renewed before rustls's confidentiality limit of the suite).
use crate::transport::{Conn, Peek};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::UnbufferedClientConnection;
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{
    ClientConfig, ConnectionTrafficSecrets, ContentType, DigitallySignedStruct, DistinguishedName,
    ProtocolVersion, RootCertStore, ServerConfig, SignatureScheme,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS setup: {0}")]
    Config(String),
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
}

/// Plaintext bytes per record (TLS's maximum).
const RECORD: usize = 16 * 1024;
/// Sealed records gathered before one socket write.
const WRITE_BATCH: usize = 256 * 1024;
/// Longest record accepted: the maximum ciphertext TLS 1.3 allows.
const MAX_CIPHERTEXT: usize = RECORD + 256;
const HEADER: usize = 5;

/// Certificates and the peers this host accepts, as given on the command line.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This host's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM; must not be readable by group or others).
    pub key: PathBuf,
    /// The CA peers' certificates must chain to (PEM).
    pub ca: PathBuf,
    /// Names a peer's certificate must be valid for (DNS names or IP addresses); empty: any
    /// certificate from the CA.
    pub peers: Vec<String>,
}

impl TlsFiles {
    /// These credentials, accepting any peer certificate of the CA (no allow-list).
    pub fn any_peer(cert: PathBuf, key: PathBuf, ca: PathBuf) -> TlsFiles {
        TlsFiles {
            cert,
            key,
            ca,
            peers: Vec::new(),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-GCM only (AES-NI on x86): the suites whose secrets the record layer here handles.
    // AES-128 first: ~12 % faster than AES-256 here (openssl speed: 2.27 vs 2.02 GB/s).
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.into(),
        why: why.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Loads a private key, refusing a file others can read (the key would be as good as public).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| file_err(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(file_err(
            path,
            format!(
                "the private key is readable by others (mode {:o}); chmod 600 it",
                mode & 0o777
            ),
        ));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut r = RootCertStore::empty();
    for c in load_certs(ca)? {
        r.add(c).map_err(|e| file_err(ca, e))?;
    }
    Ok(Arc::new(r))
}

fn names(peers: &[String]) -> Result<Vec<ServerName<'static>>, TlsError> {
    peers
        .iter()
        .map(|p| {
            ServerName::try_from(p.clone())
                .map_err(|e| TlsError::Config(format!("peer name {p:?}: {e}")))
        })
        .collect()
}

/// The first allowed name `cert` is valid for.
fn allowed_name(cert: &CertificateDer<'_>, allowed: &[ServerName<'static>]) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    allowed
        .iter()
        .find(|n| ee.verify_is_valid_for_subject_name(n).is_ok())
        .map(|n| n.to_str().into_owned())
}

fn not_allowed(allowed: &[ServerName<'static>]) -> rustls::Error {
    let list: Vec<_> = allowed.iter().map(|n| n.to_str().into_owned()).collect();
    rustls::Error::General(format!(
        "the peer's certificate names none of the allowed peers ({})",
        list.join(", ")
    ))
}

/// The signature checks of a verifier that wraps webpki's (`self.inner`): only the
/// certificate check differs.
macro_rules! signatures_by_inner {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// The destination's side: accepts sources whose certificate the CA signed and whose name is
/// allowed.
pub struct TlsServer {
    config: Arc<ServerConfig>,
    peers: Vec<ServerName<'static>>,
    rekey: Option<u64>,
}

#[derive(Debug)]
struct AllowListClients {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for AllowListClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() || allowed_name(end_entity, &self.allowed).is_some() {
            return Ok(ok);
        }
        Err(not_allowed(&self.allowed))
    }
    signatures_by_inner!();
}

impl TlsServer {
    pub fn new(f: &TlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(roots(&f.ca)?, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let peers = names(&f.peers)?;
        let verifier = Arc::new(AllowListClients {
            inner,
            allowed: peers.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(load_certs(&f.cert)?, load_key(&f.key)?)
            .map_err(|e| file_err(&f.cert, e))?;
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0; // no resumption: nothing arrives after the handshake
        Ok(TlsServer {
            config: Arc::new(config),
            peers,
            rekey: None,
        })
    }

    /// Renews the sending key after `records` records instead of near the suite's limit
    /// (tests of the key update).
    #[doc(hidden)]
    pub fn rekey_after(mut self, records: u64) -> Self {
        self.rekey = Some(records);
        self
    }

    /// Its rustls configuration (TLS 1.3, client certificates of the CA required, the
    /// allow-list checked), for a server that speaks TLS through rustls itself (the cluster
    /// API, over tokio-rustls).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Runs the server handshake on an accepted socket (its timeouts bound it).
    pub fn accept(&self, sock: TcpStream) -> Result<Conn, TlsError> {
        let peer = peer_of(&sock);
        let c = UnbufferedServerConnection::new(self.config.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        establish(
            c,
            sock,
            &peer,
            &self.peers,
            "a certificate of the CA".into(),
            self.rekey,
        )
    }
}

/// The source's side: connects only to destinations whose certificate the CA signed and
/// whose name is allowed.
pub struct TlsClient {
    config: Arc<ClientConfig>,
    peers: Vec<ServerName<'static>>,
    rekey: Option<u64>,
}

#[derive(Debug)]
struct AllowListServers {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AllowListServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.allowed.is_empty() {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        // Chain, expiry and name through webpki, for each allowed name until one fits.
        let mut first = None;
        for n in &self.allowed {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, n, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ))
                | Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or_else(|| not_allowed(&self.allowed)))
    }
    signatures_by_inner!();
}

impl TlsClient {
    pub fn new(f: &TlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(&f.ca)?,
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let peers = names(&f.peers)?;
        let verifier = Arc::new(AllowListServers {
            inner,
            allowed: peers.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(load_certs(&f.cert)?, load_key(&f.key)?)
            .map_err(|e| file_err(&f.cert, e))?;
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            peers,
            rekey: None,
        })
    }

    /// As [`TlsServer::rekey_after`].
    #[doc(hidden)]
    pub fn rekey_after(mut self, records: u64) -> Self {
        self.rekey = Some(records);
        self
    }

    /// Its rustls configuration (TLS 1.3, this host's certificate, servers checked against
    /// the CA and the allow-list), as [`TlsServer::config`].
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Runs the client handshake on a connected socket (its timeouts bound it). `host` is the
    /// name checked when no allow-list was given.
    pub fn handshake(&self, sock: TcpStream, host: &str) -> Result<Conn, TlsError> {
        let peer = peer_of(&sock);
        let name = match self.peers.first() {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| TlsError::Config(format!("host {host:?}: {e}")))?,
        };
        let shown = name.to_str().into_owned();
        let c = UnbufferedClientConnection::new(self.config.clone(), name)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        establish(c, sock, &peer, &self.peers, shown, self.rekey)
    }
}

fn peer_of(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "the peer".into())
}

fn handshake_err(peer: &str, e: impl std::fmt::Display) -> TlsError {
    let why = e.to_string();
    let why = if why.contains("received fatal alert") {
        format!("the peer refused this host ({why}): check this host's certificate and that the peer allows its name")
    } else {
        why
    };
    TlsError::Handshake {
        peer: peer.into(),
        why,
    }
}

/// Either side's unbuffered connection, for the one handshake loop.
trait Handshaking {
    type Data;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn peer_certs(&self) -> Option<&[CertificateDer<'static>]>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshaking for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(buf)
    }
    fn peer_certs(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates()
    }
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
        let (s, k) = self.dangerous_into_kernel_connection()?;
        Ok((s, Kernel::Server(k)))
    }
}

impl Handshaking for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(buf)
    }
    fn peer_certs(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates()
    }
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
        let (s, k) = self.dangerous_into_kernel_connection()?;
        Ok((s, Kernel::Client(k)))
    }
}

/// Either side's handshake to its end, then its secrets handed to a [`TlsSession`]. The
/// session is named by the first allowed name the peer's certificate is valid for (else
/// `fallback`).
fn establish<C: Handshaking>(
    c: C,
    sock: TcpStream,
    peer: &str,
    allowed: &[ServerName<'static>],
    fallback: String,
    rekey: Option<u64>,
) -> Result<Conn, TlsError> {
    let (c, leftover) = drive(c, &sock, peer)?;
    let name = c
        .peer_certs()
        .and_then(|certs| certs.first())
        .and_then(|ee| allowed_name(ee, allowed))
        .unwrap_or(fallback);
    let (secrets, kernel) = c.into_kernel().map_err(|e| handshake_err(peer, e))?;
    let s = TlsSession::new(secrets, kernel, leftover, name, peer, rekey)?;
    Ok(Conn::with_tls(sock, Arc::new(s)))
}

/// What a handshake leaves behind: records the peer sent right behind its Finished, opened by
/// rustls (plaintext) and not yet opened (sealed).
struct Leftover {
    plain: Vec<u8>,
    sealed: Vec<u8>,
}

/// Drives a handshake to its end on `sock`.
fn drive<C: Handshaking>(
    mut c: C,
    sock: &TcpStream,
    peer: &str,
) -> Result<(C, Leftover), TlsError> {
    let mut plain = Vec::new();
    let mut incoming = vec![0u8; 2 * MAX_CIPHERTEXT];
    let mut used = 0usize;
    let mut out = vec![0u8; 2 * MAX_CIPHERTEXT];
    let mut out_used = 0usize;
    let err = |e: rustls::Error| handshake_err(peer, e);
    loop {
        let UnbufferedStatus { mut discard, state } = c.process(&mut incoming[..used]);
        let mut done = false;
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                // Tell the peer why (rustls queues the alert for the next call, which must
                // see the same buffer less what it consumed), so its error names the cause.
                incoming.copy_within(discard..used, 0);
                used -= discard;
                send_alert(&mut c, sock, &mut incoming[..used]);
                return Err(err(e));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut e) => loop {
                match e.encode(&mut out[out_used..]) {
                    Ok(n) => {
                        out_used += n;
                        break;
                    }
                    Err(rustls::unbuffered::EncodeError::InsufficientSize(s)) => {
                        out.resize(out_used + s.required_size, 0);
                    }
                    Err(e) => return Err(handshake_err(peer, e)),
                }
            },
            ConnectionState::TransmitTlsData(t) => {
                (&*sock).write_all(&out[..out_used])?;
                out_used = 0;
                t.done();
            }
            ConnectionState::BlockedHandshake => {
                if used == incoming.len() {
                    incoming.resize(used * 2, 0);
                }
                let n = (&*sock).read(&mut incoming[used..]).map_err(|e| {
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) {
                        TlsError::Handshake {
                            peer: peer.into(),
                            why: "the peer went silent during the handshake".into(),
                        }
                    } else {
                        TlsError::Io(e)
                    }
                })?;
                if n == 0 {
                    return Err(TlsError::Handshake {
                        peer: peer.into(),
                        why: "the peer closed the connection during the handshake (is it \
                              expecting plain TCP, or did it refuse this host's certificate?)"
                            .into(),
                    });
                }
                used += n;
            }
            ConnectionState::WriteTraffic(_) => done = true,
            // The client's first frame right behind its Finished (the server side).
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(err)?;
                    discard += rec.discard;
                    plain.extend_from_slice(rec.payload);
                }
            }
            ConnectionState::ReadEarlyData(_) => {
                return Err(TlsError::Handshake {
                    peer: peer.into(),
                    why: "0-RTT data offered (not accepted here)".into(),
                })
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(TlsError::Handshake {
                    peer: peer.into(),
                    why: "the peer closed the TLS session during the handshake".into(),
                })
            }
            _ => {
                return Err(TlsError::Handshake {
                    peer: peer.into(),
                    why: "unexpected handshake state".into(),
                })
            }
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if done {
            if out_used > 0 {
                (&*sock).write_all(&out[..out_used])?;
            }
            incoming.truncate(used);
            return Ok((
                c,
                Leftover {
                    plain,
                    sealed: incoming,
                },
            ));
        }
    }
}

/// Sends the alert rustls queued after a handshake error, if it did (best effort; a panic in
/// this path of rustls must not take the thread with it).
fn send_alert<C: Handshaking>(c: &mut C, sock: &TcpStream, incoming: &mut [u8]) {
    let mut out = vec![0u8; 1024];
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = c.process(incoming);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    if let Ok(n) = e.encode(&mut out) {
                        let _ = (&*sock).write_all(&out[..n]);
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
    }));
}

enum Kernel {
    Server(KernelConnection<rustls::server::ServerConnectionData>),
    Client(KernelConnection<rustls::client::ClientConnectionData>),
}

impl Kernel {
    fn update(&mut self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, tx) {
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
        }
    }
}

fn keys(
    s: ConnectionTrafficSecrets,
) -> Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv), rustls::Error> {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => Ok((key, iv)),
        _ => Err(rustls::Error::General("not an AES-GCM suite".into())),
    }
}

struct Tx {
    seal: Box<dyn MessageEncrypter>,
    seq: u64,
    /// Plaintext not yet sealed (less than a record).
    pending: Vec<u8>,
    /// Sealed records not yet written.
    out: Vec<Vec<u8>>,
    /// Bytes in `out`.
    out_len: usize,
    /// Key updates sent.
    updates: u64,
}

/// The receive side. One buffer holds what was read from the socket: records are opened in
/// place, and the plaintext of the last one opened is served from where it lies, so a byte
/// is copied once (to the reader) after the kernel's copy.
struct Rx {
    open: Box<dyn MessageDecrypter>,
    seq: u64,
    buf: Vec<u8>,
    /// Plaintext not yet read: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// Sealed bytes not yet opened: `buf[sealed.0..sealed.1]`.
    sealed: (usize, usize),
    /// The peer sent close_notify.
    closed: bool,
}

/// Room for several records per socket read.
const RX_BUF: usize = 256 * 1024;

impl Rx {
    fn has_plaintext(&self) -> bool {
        self.plain.0 < self.plain.1
    }

    /// Makes room to read more: what is not yet opened moves to the front (called only when
    /// no plaintext is pending). Returns the free tail.
    fn room(&mut self) -> &mut [u8] {
        let (s, e) = self.sealed;
        if self.buf.len() - e < MAX_CIPHERTEXT + HEADER || (s > 0 && s == e) {
            self.buf.copy_within(s..e, 0);
            self.sealed = (0, e - s);
            self.plain = (0, 0);
        }
        let end = self.sealed.1;
        &mut self.buf[end..]
    }
}

/// One connection's TLS state after the handshake: each direction under its own lock.
pub(crate) struct TlsSession {
    suite: &'static rustls::Tls13CipherSuite,
    /// Records one key may seal (the suite's confidentiality limit, with a margin).
    limit: u64,
    kernel: Mutex<Kernel>,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    peer_name: String,
}

/// Writes the sealed records with one gathering write where the socket takes them all (no
/// copy into one buffer), and empties `tx.out`.
fn write_records(sock: &TcpStream, tx: &mut Tx) -> std::io::Result<()> {
    let (mut rec, mut at) = (0usize, 0usize);
    while rec < tx.out.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&tx.out[rec][at..])
            .chain(tx.out[rec + 1..].iter().map(|r| &r[..]))
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = match (&*sock).write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while rec < tx.out.len() && n > 0 {
            let left = tx.out[rec].len() - at;
            if n >= left {
                n -= left;
                rec += 1;
                at = 0;
            } else {
                at += n;
                n = 0;
            }
        }
    }
    tx.out.clear();
    tx.out_len = 0;
    Ok(())
}

/// The KeyUpdate handshake message, update_not_requested (RFC 8446 §4.6.3).
const KEY_UPDATE: [u8; 5] = [24, 0, 0, 1, 0];

fn tls_io(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsSession {
    fn new(
        secrets: rustls::ExtractedSecrets,
        kernel: Kernel,
        leftover: Leftover,
        peer_name: String,
        peer: &str,
        rekey: Option<u64>,
    ) -> Result<Self, TlsError> {
        let suite = match &kernel {
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Client(k) => k.negotiated_cipher_suite(),
        };
        let t13 = suite.tls13().ok_or_else(|| TlsError::Handshake {
            peer: peer.into(),
            why: "not TLS 1.3".into(),
        })?;
        let err = |e| handshake_err(peer, e);
        let (tk, tiv) = keys(secrets.tx.1).map_err(err)?;
        let (rk, riv) = keys(secrets.rx.1).map_err(err)?;
        let limit = rekey
            .unwrap_or(t13.common.confidentiality_limit.saturating_sub(1024))
            .max(1);
        Ok(TlsSession {
            suite: t13,
            limit,
            kernel: Mutex::new(kernel),
            tx: Mutex::new(Tx {
                seal: t13.aead_alg.encrypter(tk, tiv),
                seq: secrets.tx.0,
                pending: Vec::with_capacity(RECORD),
                out: Vec::with_capacity(WRITE_BATCH / RECORD + 2),
                out_len: 0,
                updates: 0,
            }),
            rx: Mutex::new(Rx {
                open: t13.aead_alg.decrypter(rk, riv),
                seq: secrets.rx.0,
                buf: {
                    let mut b = leftover.plain.clone();
                    b.extend_from_slice(&leftover.sealed);
                    let n = b.len();
                    b.resize(RX_BUF.max(n + MAX_CIPHERTEXT), 0);
                    b
                },
                plain: (0, leftover.plain.len()),
                sealed: (
                    leftover.plain.len(),
                    leftover.plain.len() + leftover.sealed.len(),
                ),
                closed: false,
            }),
            peer_name,
        })
    }

    pub(crate) fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// Key updates this side has sent.
    pub(crate) fn key_updates(&self) -> u64 {
        self.tx().updates
    }

    fn tx(&self) -> std::sync::MutexGuard<'_, Tx> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rx(&self) -> std::sync::MutexGuard<'_, Rx> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn t13(&self) -> &'static rustls::Tls13CipherSuite {
        self.suite
    }

    /// Seals `data` as one record of type `typ` into `tx.out`, renewing the key first when it
    /// has sealed its share.
    fn seal(&self, tx: &mut Tx, typ: ContentType, data: &[u8]) -> std::io::Result<()> {
        if tx.seq >= self.limit {
            let m = OutboundPlainMessage {
                typ: ContentType::Handshake,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&KEY_UPDATE),
            };
            let rec = tx.seal.encrypt(m, tx.seq).map_err(tls_io)?;
            let rec = rec.encode();
            tx.out_len += rec.len();
            tx.out.push(rec);
            let (seq, s) = self
                .kernel
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .update(true)
                .map_err(tls_io)?;
            let (k, iv) = keys(s).map_err(tls_io)?;
            tx.seal = self.t13().aead_alg.encrypter(k, iv);
            tx.seq = seq;
            tx.updates += 1;
        }
        let m = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(data),
        };
        let rec = tx.seal.encrypt(m, tx.seq).map_err(tls_io)?;
        tx.seq += 1;
        let rec = rec.encode();
        tx.out_len += rec.len();
        tx.out.push(rec);
        Ok(())
    }

    pub(crate) fn write(&self, sock: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
        let mut tx = self.tx();
        let tx = &mut *tx;
        let mut rest = buf;
        while !rest.is_empty() {
            if tx.pending.is_empty() && rest.len() >= RECORD {
                self.seal(tx, ContentType::ApplicationData, &rest[..RECORD])?;
                rest = &rest[RECORD..];
            } else {
                let n = (RECORD - tx.pending.len()).min(rest.len());
                tx.pending.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if tx.pending.len() == RECORD {
                    let p = std::mem::take(&mut tx.pending);
                    self.seal(tx, ContentType::ApplicationData, &p)?;
                    tx.pending = p;
                    tx.pending.clear();
                }
            }
            if tx.out_len >= WRITE_BATCH {
                write_records(sock, tx)?;
            }
        }
        Ok(buf.len())
    }

    pub(crate) fn flush(&self, sock: &TcpStream) -> std::io::Result<()> {
        let mut tx = self.tx();
        let tx = &mut *tx;
        if !tx.pending.is_empty() {
            let p = std::mem::take(&mut tx.pending);
            self.seal(tx, ContentType::ApplicationData, &p)?;
            tx.pending = p;
            tx.pending.clear();
        }
        if !tx.out.is_empty() {
            write_records(sock, tx)?;
        }
        Ok(())
    }

    /// True when something already read from the socket waits here: opened plaintext, or
    /// sealed bytes (a record read along with the previous one, which the socket will not
    /// announce again). False too when a reader holds the receive side.
    pub(crate) fn has_plaintext(&self) -> bool {
        match self.rx.try_lock() {
            Ok(rx) => rx.has_plaintext() || rx.closed || rx.sealed.0 < rx.sealed.1,
            Err(_) => false,
        }
    }

    /// Opens whole records from `rx.sealed` until one has plaintext (or none is whole).
    fn open_ready(&self, rx: &mut Rx) -> std::io::Result<()> {
        while !rx.has_plaintext() && !rx.closed {
            let (s, e) = rx.sealed;
            if e - s < HEADER {
                return Ok(());
            }
            let h = &rx.buf[s..s + HEADER];
            let len = u16::from_be_bytes([h[3], h[4]]) as usize;
            if h[0] != u8::from(ContentType::ApplicationData) || len > MAX_CIPHERTEXT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "TLS: malformed record",
                ));
            }
            if e - s < HEADER + len {
                return Ok(());
            }
            let seq = rx.seq;
            rx.sealed.0 = s + HEADER + len;
            let base = rx.buf.as_ptr() as usize;
            let msg = InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                &mut rx.buf[s + HEADER..s + HEADER + len],
            );
            let plain = rx.open.decrypt(msg, seq).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "TLS: a record failed its integrity check (altered on the way, or not sent \
                     by the authenticated peer)",
                )
            })?;
            rx.seq += 1;
            match plain.typ {
                ContentType::ApplicationData => {
                    // Opened in place: the plaintext lies inside this record's bytes.
                    let at = plain.payload.as_ptr() as usize - base;
                    rx.plain = (at, at + plain.payload.len());
                }
                ContentType::Handshake if plain.payload.first() == Some(&KEY_UPDATE[0]) => {
                    let (seq, s) = self
                        .kernel
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .update(false)
                        .map_err(tls_io)?;
                    let (k, iv) = keys(s).map_err(tls_io)?;
                    rx.open = self.t13().aead_alg.decrypter(k, iv);
                    rx.seq = seq;
                }
                ContentType::Alert if plain.payload == [1, 0] => rx.closed = true,
                ContentType::Alert if plain.payload.len() == 2 => {
                    let what = rustls::AlertDescription::from(plain.payload[1]);
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        format!(
                            "the peer ended the TLS session with alert {what:?} (it does not \
                             accept this host's certificate or name)"
                        ),
                    ));
                }
                t => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("TLS: unexpected {t:?} record"),
                    ))
                }
            }
        }
        Ok(())
    }

    pub(crate) fn read(&self, sock: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut rx = self.rx();
        let rx = &mut *rx;
        loop {
            self.open_ready(rx)?;
            if rx.has_plaintext() {
                let (a, b) = rx.plain;
                let n = (b - a).min(buf.len());
                buf[..n].copy_from_slice(&rx.buf[a..a + n]);
                rx.plain.0 += n;
                return Ok(n);
            }
            if rx.closed {
                return Ok(0);
            }
            let n = (&*sock).read(rx.room())?;
            if n == 0 {
                return Ok(0);
            }
            rx.sealed.1 += n;
        }
    }

    /// The next plaintext byte without blocking or consuming it.
    pub(crate) fn peek_now(&self, sock: &TcpStream) -> std::io::Result<Peek> {
        let Ok(mut rx) = self.rx.try_lock() else {
            return Ok(Peek::Nothing);
        };
        let rx = &mut *rx;
        loop {
            self.open_ready(rx)?;
            if rx.has_plaintext() {
                return Ok(Peek::Byte(rx.buf[rx.plain.0]));
            }
            if rx.closed {
                return Ok(Peek::Closed);
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(sock);
            let room = rx.room();
            // SAFETY: `room` is writable memory of its length; MSG_DONTWAIT makes this one
            // call non-blocking without changing the socket for other handles.
            let n =
                unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(Peek::Nothing),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(Peek::Closed);
            }
            rx.sealed.1 += n as usize;
        }
    }
}
