//! virtio-net on real KVM: the test guest's own driver answers ARP and UDP echo on a tap the
//! test creates; its reply counter stays continuous and its disk pattern-exact across live and
//! post-copy migrations (both "hosts" in this process share the tap and the image).
mod common;
use common::live::*;
use common::*;
use ferry_guest::console::{wait_for, LineSink, TimedLine};
use ferry_guest::net::{EchoProbe, HostTap};
use ferry_guest::verify::{disk_position, verify_disk_image};
use ferry_migration::engine::Options;
use ferry_storage::Format;
use ferry_vmm::devices::{DiskConfig, NetConfig};
use ferry_vmm::{BootSource, RunState, Vm, VmConfig};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// A tap with the host's address on it (10.<pid-derived>.0.1), deleted on drop.
fn host_tap(tag: u8) -> HostTap {
    let subnet = (std::process::id() % 200) as u8 + tag;
    HostTap::create(
        &format!("fnt{}x{tag}", std::process::id() % 10000),
        subnet,
        0,
    )
    .expect("a tap (root and iproute2)")
}

fn boot_with(
    work: &str,
    tap: &HostTap,
    disk: Option<&std::path::Path>,
) -> (Vm, Receiver<TimedLine>) {
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: if disk.is_some() { 2 } else { 1 },
        memory: 256 << 20,
        boot: BootSource::TestGuest { args: work.into() },
        disks: disk
            .map(|p| DiskConfig {
                path: p.to_owned(),
                format: Format::Raw,
                readonly: false,
                id: "disk0".into(),
            })
            .into_iter()
            .collect(),
        nets: vec![NetConfig::parse(&format!("tap={}", tap.name), 0).unwrap()],
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    vm.start().expect("start");
    (vm, rx)
}

#[test]
fn the_guest_answers_udp_echo_through_virtio_net_with_a_continuous_counter() {
    let tap = host_tap(1);
    let (vm, rx) = boot_with(&format!("net ip={}", tap.guest()), &tap, None);
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("M0 52:54:00:12:34:56")).unwrap();
    let probe = EchoProbe::start(
        format!("{}:7", tap.guest()).parse().unwrap(),
        Duration::from_millis(1),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let st = probe.stop();
    assert!(
        st.received >= 300 && st.received + 5 >= st.sent,
        "{} of {}",
        st.received,
        st.sent
    );
    st.check_counter_continuous().unwrap();
    assert_eq!(st.counters.first(), Some(&1));
    vm.shutdown().unwrap();
    vm.wait();
}

/// A VM with a busy disk (vCPU 0, with the heartbeat) and an answering NIC (vCPU 1) moves with
/// `opts`: the disk matches the guest's position, the heartbeat is continuous, the guest's
/// reply counter never skipped, and replies came from both sides. Returns the network gap.
fn move_busy(tag: u8, opts: Options) -> Duration {
    let tap = host_tap(tag);
    let d = scratch(&format!("net-move-{tag}"));
    let disk = d.0.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let work = format!("disk span=4M rate=16M hb=2000; net ip={}", tap.guest());
    let (src, rx) = boot_with(&work, &tap, Some(&disk));
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l == "K0 1 ok").unwrap();
    // vCPU 0's region (the vCPUs print their start lines in either order).
    let base = seen
        .iter()
        .find_map(|(_, l)| l.strip_prefix("S0 disk base=0x")?.split(' ').next())
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .expect("S0 line");
    let probe = EchoProbe::start(
        format!("{}:7", tap.guest()).parse().unwrap(),
        Duration::from_millis(1),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let rarps = ferry_guest::net::RarpWatch::start(&tap.name).unwrap();
    let garps = ferry_guest::net::GarpWatch::start(&tap.name).unwrap();
    let (addr, dest) = destination(None);
    send_vm(&src, addr, &opts).expect("migration");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    assert_eq!(vm.state(), RunState::Running);
    let moved = std::time::Instant::now();
    let mut after = Vec::new();
    wait_for(&rx2, &mut after, T, |l| l.starts_with("K0 ")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let st = probe.stop();
    // The destination announced the VM: five RARPs from its NIC's MAC, the first at once,
    // then QEMU's announce-self gaps (50, 150, 250, 350 ms).
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(moved.elapsed()));
    let seen_rarps = rarps.stop();
    let seen_garps = garps.stop();
    let nic = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    // The guest took GUEST_ANNOUNCE: asked at each of those rounds, it sent a gratuitous ARP
    // for its own address from its MAC and acknowledged on the control queue.
    assert!(
        seen.iter()
            .any(|(_, l)| l.starts_with("M1 52:54:00:12:34:56 announce")),
        "the driver negotiated GUEST_ANNOUNCE"
    );
    // One per round, unless the guest had not acknowledged the last request by the next
    // round (then that round asks nothing new, as QEMU's does).
    let ip = tap.guest().parse::<std::net::Ipv4Addr>().unwrap().octets();
    assert!((1..=5).contains(&seen_garps.len()), "{seen_garps:?}");
    assert!(
        seen_garps.iter().all(|(_, m, a)| *m == nic && *a == ip),
        "{seen_garps:?}"
    );
    let last = format!("A1 {} ok", seen_garps.len());
    wait_for(&rx2, &mut after, T, |l| l == last).unwrap();
    assert!(
        !after
            .iter()
            .any(|(_, l)| l.starts_with("A1 ") && !l.ends_with(" ok")),
        "{after:?}"
    );
    assert_eq!(seen_rarps.len(), 5, "{seen_rarps:?}");
    assert!(seen_rarps.iter().all(|(_, m)| *m == nic), "{seen_rarps:?}");
    let gaps: Vec<u128> = seen_rarps
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_millis())
        .collect();
    assert!(
        gaps.iter()
            .zip([50, 150, 250, 350])
            .all(|(g, want)| *g + 10 >= want),
        "gaps {gaps:?} ms"
    );
    vm.pause().unwrap();
    let p = disk_position(&reader(&vm), base).unwrap();
    let f = std::fs::File::open(&disk).unwrap();
    verify_disk_image(
        |off, buf| f.read_exact_at(buf, off).map_err(|e| e.to_string()),
        &p,
    )
    .expect("disk exact");
    vm.shutdown().unwrap();
    vm.wait();
    after.extend(rx2.try_iter());
    assert!(
        !after
            .iter()
            .any(|(_, l)| l.contains("BAD") || l.starts_with('!')),
        "{after:?}"
    );
    st.check_counter_continuous()
        .expect("no reply lost or repeated");
    assert!(st.received > 300, "{} of {}", st.received, st.sent);
    let mut log = ferry_guest::heartbeat::HeartbeatLog::default();
    beats(&mut log, &seen);
    beats(&mut log, &after);
    log.check_continuous().expect("heartbeat continuous");
    assert!(
        st.max_gap < Duration::from_secs(5),
        "network gap {:?}",
        st.max_gap
    );
    st.max_gap
}

#[test]
fn a_live_migration_keeps_the_disk_exact_and_every_network_reply() {
    let gap = move_busy(2, Options::default());
    eprintln!("network gap across the live migration: {gap:?}");
}

#[test]
fn a_post_copy_migration_keeps_the_disk_exact_and_every_network_reply() {
    let gap = move_busy(
        3,
        Options {
            postcopy_after: Some(1),
            ..Options::default()
        },
    );
    eprintln!("network gap across the post-copy migration: {gap:?}");
}

#[test]
fn a_tap_that_does_not_exist_is_a_clear_error() {
    let cfg = VmConfig {
        cpus: 1,
        memory: 64 << 20,
        boot: BootSource::TestGuest {
            args: "idle".into(),
        },
        disks: Vec::new(),
        nets: vec![NetConfig::parse("tap=fnt-nonexist", 0).unwrap()],
    };
    let e = Vm::new(cfg, Box::new(std::io::sink()))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("tap fnt-nonexist does not exist"), "{e}");
}

/// The guest's smoltcp stack on its tap: echo on port 7 (a 100 KiB stream comes back
/// exact), and a request every millisecond on port 8 answered in order, each with the next
/// value of the guest's reply counter.
#[test]
fn the_guest_speaks_tcp_echo_and_request_response() {
    let tap = host_tap(4);
    let (vm, rx) = boot_with(&format!("tcp ip={} prefix=24", tap.guest()), &tap, None);
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("T0 up ")).unwrap();
    let ip: std::net::IpAddr = tap.guest().parse().unwrap();
    let data: Vec<u8> = (0..100 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let rtt = ferry_guest::tcp::echo_once((ip, 7).into(), None, &data).unwrap();
    eprintln!("100 KiB echoed in {rtt:?}");
    let probe =
        ferry_guest::tcp::TcpProbe::start((ip, 8).into(), None, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let st = probe.stop(Duration::from_secs(2));
    st.check().unwrap();
    assert!(st.received >= 300, "{st:?}");
    assert_eq!(st.first_counter, Some(1), "{st:?}");
    eprintln!("{} replies, largest gap {:?}", st.received, st.max_gap);
    wait_for(&rx, &mut seen, T, |l| l.starts_with("T0 closed 8")).unwrap();
    vm.shutdown().unwrap();
    vm.wait();
}

/// An open TCP connection to the guest's smoltcp stack carries on across a live migration
/// and then a post-copy one (both "hosts" share the tap): no reset, every reply in order,
/// the guest's reply counter continuous, its heartbeat too.
#[test]
fn an_open_tcp_connection_survives_a_live_and_a_post_copy_migration() {
    let tap = host_tap(5);
    let (src, rx) = boot_with(&format!("tcp ip={} hb=2000", tap.guest()), &tap, None);
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("T0 up ")).unwrap();
    let ip: std::net::IpAddr = tap.guest().parse().unwrap();
    let probe =
        ferry_guest::tcp::TcpProbe::start((ip, 8).into(), None, Duration::from_millis(2)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut log = ferry_guest::heartbeat::HeartbeatLog::default();
    let mut vm = src;
    let mut rx = rx;
    for (i, opts) in [
        Options::default(),
        Options {
            postcopy_after: Some(1),
            ..Options::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (addr, dest) = destination(None);
        send_vm(&vm, addr, &opts).expect("migration");
        let (next, rx2) = hand_over(&vm, &rx, &mut seen, dest);
        assert_eq!(next.state(), RunState::Running);
        beats(&mut log, &seen);
        seen.clear();
        std::thread::sleep(Duration::from_millis(400));
        let st = probe.stats();
        assert!(st.error.is_none(), "move {i}: {st:?}");
        (vm, rx) = (next, rx2);
    }
    let st = probe.stop(Duration::from_secs(2));
    st.check().expect("the connection carried on");
    assert!(st.received > 300, "{st:?}");
    seen.extend(rx.try_iter());
    beats(&mut log, &seen);
    log.check_continuous().expect("heartbeat continuous");
    eprintln!(
        "{} replies; largest reply gap {:?}; largest heartbeat gap {:?}",
        st.received,
        st.max_gap,
        log.max_gap()
    );
    vm.shutdown().unwrap();
    vm.wait();
}
