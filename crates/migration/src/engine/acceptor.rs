//! The destination's listener. Every connection gets a short deadline to finish its TLS
//! handshake (when TLS is on) and send its first frame; what does not (port probes, scanners,
//! garbage, silent sockets, peers without an accepted certificate) is closed, logged once
//! and forgotten, and the listener goes on. Connections that open with a `Hello` (a new
//! migration, or a post-copy resume) and with a `Join` (a data connection) wait in queues of
//! their own, so a resume Hello is never lost while data connections are awaited.
use super::Limits;
use crate::protocol::{recv, Message};
use crate::tls::TlsServer;
use crate::transport::Conn;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A connection that opened with a valid first frame.
pub struct Incoming {
    pub conn: Conn,
    pub peer: SocketAddr,
    pub first: Message,
}

#[derive(Default)]
struct Queue {
    q: Mutex<VecDeque<Incoming>>,
    cv: Condvar,
}

impl Queue {
    fn push(&self, i: Incoming) {
        self.q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(i);
        self.cv.notify_all();
    }

    fn pop(&self, wait: Option<Duration>) -> Option<Incoming> {
        let until = wait.map(|w| Instant::now() + w);
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = q.pop_front() {
                return Some(i);
            }
            let step = match until {
                Some(u) => u.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(1),
            };
            q = self
                .cv
                .wait_timeout(q, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn is_empty(&self) -> bool {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

struct Inner {
    hellos: Queue,
    joins: Queue,
    stop: AtomicBool,
    pending: AtomicUsize,
    refused: AtomicUsize,
    limits: Limits,
    tls: Option<Arc<TlsServer>>,
}

/// Accepts migration connections on a listener, on a thread of its own.
pub struct Acceptor {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

impl Acceptor {
    /// Starts accepting on `listener`; under TLS when `tls` is given (plain TCP otherwise).
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<TlsServer>>,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let inner = Arc::new(Inner {
            hellos: Queue::default(),
            joins: Queue::default(),
            stop: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            limits,
            tls,
        });
        let i = inner.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, i))?;
        Ok(Acceptor { inner, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// Connections closed because they were not a migration (or too many were pending).
    pub fn refused(&self) -> usize {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// The next connection that opened with a Hello; None when none within `wait` (None:
    /// wait as long as it takes).
    pub fn next_hello(&self, wait: Option<Duration>) -> Option<Incoming> {
        self.inner.hellos.pop(wait)
    }

    /// True when a Hello is waiting (a post-copy source reconnecting again).
    pub(super) fn hello_waiting(&self) -> bool {
        !self.inner.hellos.is_empty()
    }

    pub(super) fn next_join(&self, wait: Duration) -> Option<Incoming> {
        self.inner.joins.pop(Some(wait))
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(l: TcpListener, inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((s, peer)) => {
                if inner.pending.load(Ordering::SeqCst) >= inner.limits.max_pending {
                    inner.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "closed a connection from {peer}: {} others are still opening",
                        inner.limits.max_pending
                    );
                    continue;
                }
                inner.pending.fetch_add(1, Ordering::SeqCst);
                let i = inner.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("accept-one".into())
                        .spawn(move || {
                            classify(s, peer, &i);
                            i.pending.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    inner.pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                tracing::warn!("accepting a migration connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Handshake and first frame within the deadline, then into the right queue.
fn classify(s: TcpStream, peer: SocketAddr, inner: &Inner) {
    let lim = &inner.limits;
    let r = (|| -> Result<Incoming, String> {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        crate::transport::set_io_timeout(&s, lim.hello_timeout).map_err(|e| e.to_string())?;
        let conn = match &inner.tls {
            Some(t) => t.accept(s).map_err(|e| e.to_string())?,
            None => Conn::plain(s),
        };
        let first = match recv(&mut &conn) {
            Ok(m @ (Message::Hello(_) | Message::Join { .. })) => m,
            Ok(m) => {
                return Err(format!(
                    "it opened with {} instead of Hello or Join",
                    m.name()
                ))
            }
            Err(crate::protocol::ProtocolError::Stalled) => {
                return Err(format!("it sent nothing within {:?}", lim.hello_timeout))
            }
            Err(crate::protocol::ProtocolError::Closed) => {
                return Err("it closed without sending anything".into())
            }
            Err(e @ crate::protocol::ProtocolError::Version { .. }) => {
                // A Ferry of another version: it deserves to know why.
                let _ = crate::protocol::send(&mut &conn, &Message::Abort(e.to_string()));
                return Err(e.to_string());
            }
            Err(e) => return Err(format!("not a migration ({e})")),
        };
        conn.set_io_timeout(lim.io_timeout)
            .map_err(|e| e.to_string())?;
        Ok(Incoming { conn, peer, first })
    })();
    match r {
        Ok(
            i @ Incoming {
                first: Message::Hello(_),
                ..
            },
        ) => inner.hellos.push(i),
        Ok(i) => inner.joins.push(i),
        Err(why) => {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("ignored a connection from {peer}: {why}");
        }
    }
}
