//! The `tcp` workload: smoltcp (no_std, no alloc, polled) over net.rs's virtio-net driver.
//! The guest's customer address comes from its command line (`ip=`, `prefix=`); smoltcp
//! answers ARP and ICMP echo; two TCP services listen, two connections each:
//!   port 7  echo: every byte back as it came;
//!   port 8  request/response: each request line `N` is answered `N R`, where R counts the
//!           guest's replies since boot (all connections), so a client sees a reply lost,
//!           repeated or out of order.
//! Lines: `T<c> up A.B.C.D/P mtu=M`, `T<c> open <port>`, `T<c> closed <port>` (and net.rs's
//! `A<c> <n> ok` when the guest announced itself after a move).
use crate::args::Spec;
use crate::io::{rdtsc, Line};
use crate::net::{self, Nic, BUF, HDR};
use crate::work::Beat;
use core::sync::atomic::{fence, AtomicBool, Ordering};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

const SOCKETS: usize = 4;
const SOCK_BUF: usize = 16 * 1024;
const ECHO_PORT: u16 = 7;
const RR_PORT: u16 = 8;
/// Longest request line kept (a sequence number); longer lines are answered `ERR`.
const LINE_MAX: usize = 24;

static mut RX_BUFS: [[u8; SOCK_BUF]; SOCKETS] = [[0; SOCK_BUF]; SOCKETS];
static mut TX_BUFS: [[u8; SOCK_BUF]; SOCKETS] = [[0; SOCK_BUF]; SOCKETS];
/// The socket buffers are statics: one vCPU at a time may run this workload.
static TAKEN: AtomicBool = AtomicBool::new(false);

struct Phy {
    nic: Nic,
    mtu: usize,
    /// The RX buffer of the frame handed out last; given back at the next receive.
    pending: Option<u16>,
}

struct Rx {
    at: u64,
    len: usize,
}

struct Tx<'a> {
    nic: &'a mut Nic,
}

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        fence(Ordering::SeqCst);
        // SAFETY: the device wrote this frame into the RX buffer and the buffer stays this
        // driver's until it is recycled at the next receive (identity-mapped guest memory).
        f(unsafe { core::slice::from_raw_parts(self.at as *const u8, self.len) })
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min((BUF - HDR) as usize);
        // SAFETY: the transmit buffer holds BUF - HDR bytes after the header and the device
        // is done with it (send waits for the device to use it).
        let buf = unsafe { core::slice::from_raw_parts_mut(self.nic.tx_frame() as *mut u8, len) };
        let r = f(buf);
        fence(Ordering::SeqCst);
        self.nic.send(len as u64);
        r
    }
}

impl Device for Phy {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a>
    where
        Self: 'a;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        if let Some(id) = self.pending.take() {
            self.nic.recycle(id);
        }
        loop {
            let (id, len) = self.nic.next_rx()?;
            if len <= HDR {
                self.nic.recycle(id);
                continue;
            }
            self.pending = Some(id);
            let rx = Rx {
                at: self.nic.rx_frame(id),
                len: (len - HDR) as usize,
            };
            return Some((rx, Tx { nic: &mut self.nic }));
        }
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx { nic: &mut self.nic })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c
    }
}

/// Decimal digits of `v` into `out`; returns how many.
fn decimal(mut v: u64, out: &mut [u8]) -> usize {
    let mut tmp = [0u8; 20];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = tmp[n - 1 - i];
    }
    n
}

/// One connection's request parser (port 8).
#[derive(Clone, Copy)]
struct Request {
    line: [u8; LINE_MAX],
    len: usize,
    too_long: bool,
}

impl Request {
    const EMPTY: Request = Request {
        line: [0; LINE_MAX],
        len: 0,
        too_long: false,
    };

    /// Reads request bytes while a whole reply still fits the send buffer; answers each line.
    fn serve(&mut self, s: &mut tcp::Socket, replies: &mut u64) {
        while s.can_recv() && s.send_capacity() - s.send_queue() >= 2 * LINE_MAX + 4 {
            let mut byte = [0u8; 1];
            if s.recv_slice(&mut byte) != Ok(1) {
                return;
            }
            match byte[0] {
                b'\n' => {
                    let mut out = [0u8; 2 * LINE_MAX + 4];
                    let n = if self.too_long || self.len == 0 {
                        out[..4].copy_from_slice(b"ERR\n");
                        4
                    } else {
                        *replies += 1;
                        out[..self.len].copy_from_slice(&self.line[..self.len]);
                        out[self.len] = b' ';
                        let d = decimal(*replies, &mut out[self.len + 1..]);
                        out[self.len + 1 + d] = b'\n';
                        self.len + 2 + d
                    };
                    let _ = s.send_slice(&out[..n]);
                    *self = Request::EMPTY;
                }
                b'\r' => {}
                c if self.len < LINE_MAX => {
                    self.line[self.len] = c;
                    self.len += 1;
                }
                _ => self.too_long = true,
            }
        }
    }
}

fn echo(s: &mut tcp::Socket) {
    let mut tmp = [0u8; 1024];
    while s.can_recv() {
        let room = (s.send_capacity() - s.send_queue()).min(tmp.len());
        if room == 0 {
            return;
        }
        match s.recv_slice(&mut tmp[..room]) {
            Ok(n) if n > 0 => {
                let _ = s.send_slice(&tmp[..n]);
            }
            _ => return,
        }
    }
}

fn event(cpu: u64, what: &str, port: u16) {
    let mut l = Line::new();
    l.s("T").u(cpu).s(" ").s(what).s(" ").u(port as u64);
    l.send();
}

pub fn run(cpu: u64, spec: &Spec, base: u64, khz: u64, beat: &mut Beat) -> u8 {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return net::say(cpu, "tcp runs on one vCPU only");
    }
    let nic = match net::open(cpu, spec.dev, base, khz) {
        Ok(nic) => nic,
        Err(e) => return net::say(cpu, e),
    };
    let mac = nic.mac();
    let mut phy = Phy {
        nic,
        mtu: spec.mtu as usize,
        pending: None,
    };
    let khz128 = khz.max(1) as u128;
    let now = || Instant::from_micros((rdtsc() as u128 * 1000 / khz128) as i64);
    let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    cfg.random_seed = rdtsc();
    let mut iface = Interface::new(cfg, &mut phy, now());
    let ip = spec.ip.to_be_bytes();
    iface.update_ip_addrs(|a| {
        let addr = IpAddress::v4(ip[0], ip[1], ip[2], ip[3]);
        let _ = a.push(IpCidr::new(addr, spec.prefix as u8));
    });
    let mut storage = [SocketStorage::EMPTY; SOCKETS];
    let mut set = SocketSet::new(&mut storage[..]);
    // SAFETY: TAKEN makes this the only user of the buffers, for the rest of the run.
    let (rx, tx) = unsafe { (&mut *(&raw mut RX_BUFS), &mut *(&raw mut TX_BUFS)) };
    let mut socks: [(SocketHandle, u16); SOCKETS] = [(SocketHandle::default(), 0); SOCKETS];
    for (i, (r, t)) in rx.iter_mut().zip(tx.iter_mut()).enumerate() {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut r[..]),
            tcp::SocketBuffer::new(&mut t[..]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        let port = if i < SOCKETS / 2 { ECHO_PORT } else { RR_PORT };
        if s.listen(port).is_err() {
            return net::say(cpu, "tcp: listen failed");
        }
        socks[i] = (set.add(s), port);
    }
    let mut l = Line::new();
    l.s("T").u(cpu).s(" up ");
    for (i, o) in ip.iter().enumerate() {
        if i > 0 {
            l.s(".");
        }
        l.u(*o as u64);
    }
    l.s("/").u(spec.prefix).s(" mtu=").u(spec.mtu);
    l.send();
    let mut open = [false; SOCKETS];
    let mut reqs = [Request::EMPTY; SOCKETS];
    let mut replies = 0u64;
    loop {
        beat.poll();
        phy.nic.announce_if_asked(cpu, spec.ip);
        iface.poll(now(), &mut phy, &mut set);
        for (i, &(h, port)) in socks.iter().enumerate() {
            let s = set.get_mut::<tcp::Socket>(h);
            let established = s.may_send();
            if established != open[i] && (established || !s.is_active()) {
                open[i] = established;
                event(cpu, if established { "open" } else { "closed" }, port);
            }
            match s.state() {
                tcp::State::CloseWait => s.close(),
                tcp::State::Closed => {
                    reqs[i] = Request::EMPTY;
                    let _ = s.listen(port);
                }
                _ => {}
            }
            if port == ECHO_PORT {
                echo(s);
            } else {
                reqs[i].serve(s, &mut replies);
            }
        }
    }
}
