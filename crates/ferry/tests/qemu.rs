//! The test guest under QEMU (Debian's qemu-system-x86, KVM) prints what it prints under
//! Ferry: same lines, same sequence numbers, same memory checksums (only TSC values differ).
mod common;
use common::*;
use ferry_guest::heartbeat::{parse_line, GuestLine};
use std::process::{Command, Stdio};

fn normalize(out: &[u8]) -> Vec<GuestLine> {
    String::from_utf8_lossy(out)
        .lines()
        .map(parse_line)
        .filter(|l| !matches!(l, GuestLine::Other(_)))
        .map(|l| match l {
            GuestLine::Heartbeat { cpu, seq, .. } => GuestLine::Heartbeat { cpu, seq, tsc: 0 },
            l => l,
        })
        .collect()
}

fn qemu(image: &str, args: &str) -> Vec<GuestLine> {
    let out = Command::new("qemu-system-x86_64")
        .args([
            "-enable-kvm",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-serial",
            "stdio",
        ])
        .args(["-kernel", image, "-append", args])
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64 must be installed (the README's setup installs it)");
    // isa-debug-exit: status = (code << 1) | 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&out.stdout)
}

fn ferry_lines(args: &str) -> Vec<GuestLine> {
    let out = ferry(&["run", "--memory", "256M", "--guest", args]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&out.stdout)
}

#[test]
fn test_guest_prints_the_same_under_qemu_and_ferry() {
    let s = Scratch::new("qemu");
    let image = s.path("ferry-guest.elf");
    let out = ferry(&["guest-image", "--output", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    for args in [
        "heartbeat period=1000 count=20",
        "dirty size=8M passes=3",
        "verify size=8M count=2",
        "idle seconds=1",
    ] {
        let q = qemu(image.to_str().unwrap(), args);
        let f = ferry_lines(args);
        assert!(q.len() >= 4, "{args}: QEMU printed too little: {q:?}");
        assert_eq!(q, f, "{args}: QEMU and Ferry differ");
    }
}

#[test]
fn the_disk_workload_writes_the_same_image_under_qemu_microvm_and_ferry() {
    // QEMU's microvm with a modern virtio-mmio disk (its slots from 0xfeb00000, the first
    // device in the top one), Ferry with its own windows: the guest's driver finds either.
    let s = Scratch::new("qemu-disk");
    let image = s.path("ferry-guest.elf");
    let out = ferry(&["guest-image", "--output", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let (qd, fd) = (s.path("qemu.raw"), s.path("ferry.raw"));
    for p in [&qd, &fd] {
        std::fs::File::create(p).unwrap().set_len(8 << 20).unwrap();
    }
    let args = "disk span=2M passes=2 bs=16K";
    let drive = format!("file={},if=none,id=d0,format=raw", qd.display());
    let out = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-enable-kvm", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-drive", &drive, "-device", "virtio-blk-device,drive=d0"])
        .args(["-kernel", image.to_str().unwrap(), "-append", args])
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64");
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = normalize(&out.stdout);
    let qtext = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(qtext.contains("K0 1 ok\nK0 2 ok"), "{qtext}");
    let spec = format!("path={}", fd.display());
    let out = ferry(&["run", "--memory", "256M", "--guest", args, "--disk", &spec]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = normalize(&out.stdout);
    assert!(q == f, "QEMU {q:?} vs Ferry {f:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("K0 1 ok\nK0 2 ok"), "{text}");
    assert_eq!(
        std::fs::read(&qd).unwrap(),
        std::fs::read(&fd).unwrap(),
        "images differ"
    );
}

#[test]
fn the_net_workload_answers_the_same_under_qemu_microvm_and_ferry() {
    use ferry_guest::net::{EchoProbe, HostTap};
    use std::time::Duration;
    let s = Scratch::new("qemu-net");
    let image = s.path("ferry-guest.elf");
    let out = ferry(&["guest-image", "--output", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let host = HostTap::create(
        &format!("fqt{}", std::process::id() % 10000),
        (100 + std::process::id() % 100) as u8,
        1,
    )
    .expect("a tap (root and iproute2)");
    let tap = host.name.clone();
    let work = format!("net ip={}", host.guest());
    let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no");
    let qemu_cmd = [
        "-M",
        "microvm",
        "-enable-kvm",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-device,netdev=n0",
        "-kernel",
        image.to_str().unwrap(),
        "-append",
        &work,
    ];
    let net = format!("tap={tap}");
    let ferry_cmd = ["run", "--memory", "256M", "--guest", &work, "--net", &net];
    let mut results = Vec::new();
    for (name, mut cmd) in [
        ("QEMU", {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(qemu_cmd);
            c
        }),
        ("Ferry", {
            let mut c = Command::new(FERRY);
            c.args(ferry_cmd);
            c
        }),
    ] {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("M0 ") {
            line.clear();
            if std::io::BufRead::read_line(&mut r, &mut line).unwrap() == 0 {
                panic!("{name}: the guest's NIC never came up");
            }
        }
        let target = format!("{}:7", host.guest()).parse().unwrap();
        let probe = EchoProbe::start(target, Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let st = probe.stop();
        let _ = child.kill();
        let _ = child.wait();
        st.check_counter_continuous()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(st.received >= 200, "{name}: {} of {}", st.received, st.sent);
        results.push((name, line.trim().to_string(), st.counters.first().copied()));
    }
    // The same MAC (QEMU's default and Ferry's) and the same numbering from 1.
    assert_eq!(results[0].1, results[1].1, "{results:?}");
    assert_eq!(results[0].2, Some(1));
    assert_eq!(results[1].2, Some(1));
}
