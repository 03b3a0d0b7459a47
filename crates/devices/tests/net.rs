//! virtio-net through the virtio-mmio transport on a real tap (root: the test makes one with
//! iproute2, with an address, so the host kernel answers ARP), driven by the test driver over
//! crafted rings: a frame the driver sends reaches the tap and the kernel's answer lands in
//! a receive buffer, dirty-tracked; malformed chains are dropped or reset the device, never
//! crash it.
mod driver;
use driver::*;
use ferry_devices::net::{Net, HDR};
use ferry_devices::tap::Tap;
use std::process::Command;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Queue 1 (transmit) rings; queue 0 (receive) uses the driver's default ones.
const TX_RING: u64 = 0x5000;
const TX_BUF: u64 = 0x20000;
const RX_BUF: u64 = 0x30000;
const NEEDS_RESET: u32 = 64;
/// Queue 2 (control) rings and the command's page (class, command at 0; ack byte at 16).
const CTRL_RING: u64 = 0x8000;
const CMD: u64 = 0x40000;
const GUEST_ANNOUNCE: u64 = 1 << 21;
const CTRL_VQ: u64 = 1 << 17;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A tap with 10.214.N.1/24 on it, up; deleted on drop.
struct HostTap(String, u8);

impl HostTap {
    fn new(tag: u8) -> HostTap {
        let n = (std::process::id() % 200) as u8 + tag;
        let name = format!("fdn{}-{tag}", std::process::id() % 10000);
        let ip = |a: &[&str]| {
            let out = Command::new("ip").args(a).output().expect("iproute2");
            assert!(
                out.status.success(),
                "ip {a:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        ip(&["addr", "add", &format!("10.214.{n}.1/24"), "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        HostTap(name, n)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// An ARP request from the guest (10.214.n.2, MAC) for the host (10.214.n.1), behind the
/// 12-byte virtio-net header.
fn arp_request(n: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend([0xff; 6]);
    f.extend(MAC);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(MAC);
    f.extend([10, 214, n, 2]);
    f.extend([0; 6]);
    f.extend([10, 214, n, 1]);
    f
}

fn nic(tap: &HostTap, mem: &Mem) -> Driver {
    let dev = Net::new(Tap::open(&tap.0).expect("open the tap"), MAC);
    let mut drv = Driver::new(Box::new(dev));
    let f = drv.features();
    assert_eq!(drv.setup_with(f, &[TX_RING], mem) & 0xf, 0xf, "driver OK");
    drv
}

fn send(drv: &mut Driver, mem: &Mem, frame: &[u8]) -> (u32, u32) {
    mem.write_slice(frame, GuestAddress(TX_BUF)).unwrap();
    drv.select(1);
    drv.post(mem, &[(TX_BUF, frame.len() as u32, 0)]);
    drv.notify(mem);
    drv.next_used(mem).expect("the frame is returned")
}

/// Sends an ARP request for the host and serves receive buffers until one holds the reply
/// (the kernel may send other frames first, e.g. IPv6 router solicitations); the request is
/// sent again every 100 ms, as a real ARP client does (a tap that has just come up may drop
/// the first). Returns the reply's used length.
fn arp_round_trip(drv: &mut Driver, mem: &Mem, n: u8) -> u32 {
    let until = Instant::now() + Duration::from_secs(5);
    drv.select(0);
    drv.post(mem, &[(RX_BUF, 2048, F_WRITE)]);
    drv.notify(mem);
    let mut next_send = Instant::now();
    loop {
        assert!(Instant::now() < until, "no ARP reply from the host");
        if Instant::now() >= next_send {
            let (_, len) = send(drv, mem, &arp_request(n));
            assert_eq!(len, 0, "a transmit buffer is returned with nothing written");
            drv.select(0);
            next_send = Instant::now() + Duration::from_millis(100);
        }
        drv.t.notify(0, mem);
        let Some((_, len)) = drv.next_used(mem) else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let mut f = vec![0u8; len as usize];
        mem.read_slice(&mut f, GuestAddress(RX_BUF)).unwrap();
        let is_reply = len as usize >= HDR + 42
            && f[HDR + 12..HDR + 14] == [0x08, 0x06]
            && f[HDR + 20..HDR + 22] == [0, 2]
            && f[HDR + 28..HDR + 32] == [10, 214, n, 1]
            && f[HDR + 32..HDR + 38] == MAC;
        if is_reply {
            assert_eq!(f[10], 1, "num_buffers");
            return len;
        }
        drv.post(mem, &[(RX_BUF, 2048, F_WRITE)]);
    }
}

#[test]
fn a_frame_sent_reaches_the_tap_and_the_answer_lands_in_a_receive_buffer() {
    let tap = HostTap::new(0);
    let mem = memory();
    let mut drv = nic(&tap, &mem);
    let mut cfg = [0u8; 8];
    drv.t.read(0x100, &mut cfg);
    assert_eq!(cfg[..6], MAC, "the MAC in the configuration space");
    assert_eq!(cfg[6] & 1, 1, "link up");
    clear_dirty(&mem);
    let len = arp_round_trip(&mut drv, &mem, tap.1);
    assert!(len as usize >= HDR + 42);
    assert!(dirty(&mem, RX_BUF), "the frame's page is marked dirty");
    assert!(
        dirty(&mem, DESC + 0x2000),
        "the used ring's page is marked dirty"
    );
}

#[test]
fn malformed_chains_are_dropped_or_reset_the_device_and_never_crash_it() {
    let tap = HostTap::new(1);
    let mem = memory();
    let mut drv = nic(&tap, &mem);
    // Transmit: outside memory, device-writable (wrong direction), shorter than the header,
    // longer than any frame: each dropped, returned with nothing written.
    drv.select(1);
    for descs in [
        vec![(0x7000_0000u64, 64u32, 0u16)],
        vec![(TX_BUF, 64, F_WRITE)],
        vec![(TX_BUF, 8, 0)],
        vec![(TX_BUF, 9000, 0)],
    ] {
        let head = drv.post(&mem, &descs);
        drv.notify(&mem);
        assert_eq!(drv.next_used(&mem), Some((head as u32, 0)), "{descs:?}");
    }
    // A descriptor that chains to itself: cut after a queue's worth, returned.
    drv.raw_desc(&mem, 5, TX_BUF, 64, F_NEXT, 5);
    drv.make_available(&mem, 5);
    drv.notify(&mem);
    assert!(drv.next_used(&mem).is_some(), "a looping chain is returned");
    assert_eq!(drv.reg(0x70) & NEEDS_RESET, 0);
    // The device still works: a good frame out, the answer in.
    arp_round_trip(&mut drv, &mem, tap.1);
    // Receive buffers that are device-readable (wrong direction) or too small for a frame get
    // the frame dropped and come back empty.
    for (len, flags) in [(2048u32, 0u16), (HDR as u32 + 4, F_WRITE)] {
        drv.select(0);
        let head = drv.post(&mem, &[(RX_BUF, len, flags)]);
        let until = Instant::now() + Duration::from_secs(5);
        let mut next_send = Instant::now();
        let used = loop {
            if Instant::now() >= next_send {
                send(&mut drv, &mem, &arp_request(tap.1)); // something to receive
                drv.select(0);
                next_send = Instant::now() + Duration::from_millis(100);
            }
            drv.t.notify(0, &mem);
            if let Some(u) = drv.next_used(&mem) {
                break u;
            }
            assert!(Instant::now() < until, "the bad buffer was never returned");
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(
            used,
            (head as u32, 0),
            "receive buffer {len} bytes, flags {flags}"
        );
    }
    // A transmit ring outside guest memory: the device needs a reset and serves nothing.
    drop(drv); // lets go of the tap
    let mut drv = Driver::new(Box::new(Net::new(Tap::open(&tap.0).unwrap(), MAC)));
    let f = drv.features();
    drv.setup_with(f, &[0x7000_0000], &mem);
    drv.select(1);
    drv.notify(&mem);
    assert_ne!(drv.reg(0x70) & NEEDS_RESET, 0, "NEEDS_RESET set");
}

/// Frames that reach the tap while the NIC is paused for a move are not lost: releasing the
/// tap reads them out, the state carries them, and the NIC built from that state hands
/// them to the guest first, before anything new arrives on its tap.
#[test]
fn frames_waiting_at_a_release_travel_in_the_state_to_the_guest() {
    use ferry_devices::VirtioDevice;
    let tap = HostTap::new(2);
    let mut dev = Net::new(Tap::open(&tap.0).unwrap(), MAC);
    // The host kernel asks for 10.214.n.2 by ARP: broadcasts into the tap nobody reads.
    let _ = Command::new("ping")
        .args([
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            &format!("10.214.{}.2", tap.1),
        ])
        .output();
    VirtioDevice::<Mem>::release(&mut dev).unwrap();
    let state = dev.save();
    assert_eq!(state.version, ferry_devices::net::NET_STATE_VERSION);
    let arps = |f: &Vec<u8>| f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[..6] == [0xff; 6];
    assert!(
        state.pending.iter().any(arps),
        "the ARP requests waiting in the tap are in the state: {} frames",
        state.pending.len()
    );
    drop(dev);
    let mem = memory();
    let mut drv = Driver::new(Box::new(Net::from_state(&state).unwrap()));
    let f = drv.features();
    assert_eq!(drv.setup_with(f, &[TX_RING], &mem) & 0xf, 0xf, "driver OK");
    drv.select(0);
    drv.post(&mem, &[(RX_BUF, 2048, F_WRITE)]);
    drv.notify(&mem);
    let (_, len) = drv.next_used(&mem).expect("a carried frame, at once");
    let mut got = vec![0u8; len as usize];
    mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
    assert_eq!(
        got[HDR..].to_vec(),
        state.pending[0],
        "the first carried frame"
    );
    // A state with too many frames is refused, not trusted.
    let mut bad = state.clone();
    bad.pending = vec![vec![0u8; 60]; 10_000];
    assert!(Net::from_state(&bad).is_err());
}

/// The NIC's status (`VIRTIO_NET_S_*`): the u16 at byte 6 of its configuration.
fn net_status(drv: &Driver) -> u32 {
    drv.reg(0x104) >> 16
}

/// Posts the control command `class, command` (ack byte after it, `writable` of them) on
/// queue 2: the used length and the ack byte.
fn control(drv: &mut Driver, mem: &Mem, class: u8, cmd: u8, writable: u32) -> (u32, u8) {
    mem.write_slice(&[class, cmd], GuestAddress(CMD)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(CMD + 16)).unwrap();
    drv.select(2);
    if writable > 0 {
        drv.post(mem, &[(CMD, 2, 0), (CMD + 16, writable, F_WRITE)]);
    } else {
        drv.post(mem, &[(CMD, 2, 0)]);
    }
    drv.notify(mem);
    let (_, len) = drv.next_used(mem).expect("the command is answered");
    (len, mem.read_obj(GuestAddress(CMD + 16)).unwrap())
}

/// `GUEST_ANNOUNCE`: an announcement sends the VMM's RARP and, for a driver that took the
/// feature, sets `VIRTIO_NET_S_ANNOUNCE` with a configuration interrupt (once until the guest
/// answers); the guest's `ANNOUNCE_ACK` on the control queue clears it (ack OK, dirty-tracked);
/// an unknown command gets `VIRTIO_NET_ERR`; a request outstanding at a save survives in the
/// state; a driver without the feature is never asked.
#[test]
fn an_announcement_asks_a_guest_that_took_guest_announce_and_its_ack_clears_it() {
    let tap = HostTap::new(3);
    let mem = memory();
    let mut drv = Driver::new(Box::new(Net::new(Tap::open(&tap.0).unwrap(), MAC)));
    let f = drv.features();
    assert_eq!(
        f & (GUEST_ANNOUNCE | CTRL_VQ),
        GUEST_ANNOUNCE | CTRL_VQ,
        "offered"
    );
    assert_eq!(drv.setup_with(f, &[TX_RING, CTRL_RING], &mem) & 0xf, 0xf);
    assert_eq!(net_status(&drv), 1, "link up, nothing to announce");
    let (irqs, gen) = (drv.irq.0.load(SeqCst), drv.reg(0xfc));
    assert!(drv.t.announce(), "the RARP went out on the tap");
    assert_eq!(net_status(&drv), 1 | 2, "VIRTIO_NET_S_ANNOUNCE");
    assert_eq!(drv.reg(0x60) & 2, 2, "a configuration interrupt");
    assert_eq!(drv.irq.0.load(SeqCst), irqs + 1);
    assert_ne!(drv.reg(0xfc), gen, "a new configuration generation");
    // Asked again before the guest answered: the RARP, no second interrupt.
    assert!(drv.t.announce());
    assert_eq!(drv.irq.0.load(SeqCst), irqs + 1);
    clear_dirty(&mem);
    assert_eq!(control(&mut drv, &mem, 3, 0, 1), (1, 0), "ACK answered OK");
    assert!(dirty(&mem, CMD + 16), "the ack byte is dirty-tracked");
    assert_eq!(net_status(&drv), 1, "the request is cleared");
    // Commands this device does not offer, and one with nowhere to answer.
    assert_eq!(control(&mut drv, &mem, 0, 0, 1), (1, 1), "RX class: ERR");
    assert_eq!(
        control(&mut drv, &mem, 3, 7, 1).1,
        1,
        "unknown ANNOUNCE command: ERR"
    );
    assert_eq!(
        control(&mut drv, &mem, 3, 0, 0).0,
        0,
        "no ack byte: nothing written"
    );
    assert_eq!(drv.reg(0x70) & NEEDS_RESET, 0);
    // A request outstanding at a save is in the state and in the device built from it.
    assert!(drv.t.announce());
    let state = match drv.t.device().save() {
        ferry_devices::DeviceState::Net(n) => n,
        other => panic!("{other:?}"),
    };
    assert!(state.announcing);
    let mmio = drv.t.save();
    let irq = drv.irq.clone();
    let drv = drv.rebuild(|t| {
        drop(t);
        let dev = Net::from_state(&state).unwrap();
        ferry_devices::MmioTransport::from_state(&mmio, Box::new(dev), irq).unwrap()
    });
    assert_eq!(net_status(&drv), 1 | 2, "the restored NIC still asks");
    drop(drv);
    // A driver that did not take GUEST_ANNOUNCE: the RARP only.
    let mut drv = Driver::new(Box::new(Net::new(Tap::open(&tap.0).unwrap(), MAC)));
    let f = drv.features() & !GUEST_ANNOUNCE;
    assert_eq!(drv.setup_with(f, &[TX_RING, CTRL_RING], &mem) & 0xf, 0xf);
    let irqs = drv.irq.0.load(SeqCst);
    assert!(drv.t.announce());
    assert_eq!(net_status(&drv), 1);
    assert_eq!(drv.irq.0.load(SeqCst), irqs);
    assert_eq!(
        control(&mut drv, &mem, 3, 0, 1).1,
        1,
        "ACK without the feature: ERR"
    );
}
