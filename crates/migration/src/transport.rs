//! Migration connections: TCP, optionally under TLS 1.3 (see [`crate::tls`]). A [`Conn`] can be
//! cloned into handles that share the socket (and the TLS session): one thread may read while
//! another writes, and any handle can shut the socket down to wake a thread blocked on it.
use crate::tls::{TlsClient, TlsError, TlsSession};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// See [`Conn::set_io_timeout`] (also for a socket before its TLS handshake).
pub(crate) fn set_io_timeout(s: &TcpStream, t: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

/// What is waiting on a connection, looked at without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// Nothing has arrived.
    Nothing,
    /// The peer closed the connection.
    Closed,
    /// The next byte of the stream (of the plaintext, under TLS).
    Byte(u8),
}

/// One migration connection (plain TCP or TLS).
pub struct Conn {
    sock: TcpStream,
    tls: Option<Arc<TlsSession>>,
}

impl Conn {
    /// A plain TCP connection (`--insecure`).
    pub fn plain(sock: TcpStream) -> Self {
        Conn { sock, tls: None }
    }

    pub(crate) fn with_tls(sock: TcpStream, tls: Arc<TlsSession>) -> Self {
        Conn {
            sock,
            tls: Some(tls),
        }
    }

    /// Connects to `addr` with `io_timeout` on every send and receive; under TLS when `tls`
    /// is given (the handshake, peer check included, is done when this returns).
    pub fn connect(
        addr: &str,
        tls: Option<&TlsClient>,
        io_timeout: Duration,
    ) -> Result<Conn, TlsError> {
        let mut last = None;
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(TlsError::Io)?.collect();
        for a in addrs {
            match TcpStream::connect_timeout(&a, io_timeout) {
                Ok(s) => {
                    set_io_timeout(&s, io_timeout).map_err(TlsError::Io)?;
                    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    return match tls {
                        Some(t) => t.handshake(s, host),
                        None => Ok(Conn::plain(s)),
                    };
                }
                Err(e) => last = Some(e),
            }
        }
        Err(TlsError::Io(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(Conn {
            sock: self.sock.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The peer's certificate name (TLS), for logs.
    pub fn peer_name(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.peer_name().to_string())
    }

    /// Key updates sent on this connection (TLS).
    pub fn key_updates(&self) -> u64 {
        self.tls.as_ref().map(|t| t.key_updates()).unwrap_or(0)
    }

    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    /// No Nagle delay (small frames: acknowledgements, demands), and every send and receive
    /// failing after `t` without progress.
    pub fn set_io_timeout(&self, t: Duration) -> std::io::Result<()> {
        set_io_timeout(&self.sock, t)
    }

    pub fn set_nodelay(&self, on: bool) -> std::io::Result<()> {
        self.sock.set_nodelay(on)
    }

    /// Waits up to `wait` for something to read (or the end); true when there is.
    pub fn readable(&self, wait: Duration) -> std::io::Result<bool> {
        if let Some(t) = &self.tls {
            if t.has_plaintext() {
                return Ok(true);
            }
        }
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.sock),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(r > 0)
    }

    /// What is waiting, without blocking and without consuming it.
    pub fn peek_now(&self) -> std::io::Result<Peek> {
        if let Some(t) = &self.tls {
            return t.peek_now(&self.sock);
        }
        let mut b = [0u8];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.sock);
        // SAFETY: a one-byte buffer; MSG_DONTWAIT makes this call alone non-blocking, so a
        // thread writing through another handle is not affected.
        let n = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Ok(Peek::Closed),
            1 => Ok(Peek::Byte(b[0])),
            _ => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                        Ok(Peek::Nothing)
                    }
                    _ => Err(e),
                }
            }
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &self.tls {
            Some(t) => t.read(&self.sock, buf),
            None => (&self.sock).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.tls {
            Some(t) => t.write(&self.sock, buf),
            None => (&self.sock).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &self.tls {
            Some(t) => t.flush(&self.sock),
            None => Ok(()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&*self).flush()
    }
}
