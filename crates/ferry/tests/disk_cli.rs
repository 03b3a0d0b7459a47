//! `ferry run --disk` as a user runs it: a disk the guest writes and checks, and one clear
//! error line, with nothing started, for each kind of bad disk.
mod common;
use common::*;
use ferry_guest::tools::{host_fill, qemu_img};
use std::process::{Command, Stdio};

fn error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err.lines().next().unwrap_or("").to_string()
}

fn image(s: &Scratch, name: &str, len: u64) -> String {
    let p = s.path(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p.display().to_string()
}

#[test]
fn the_guest_writes_and_reads_back_its_disk_and_qemu_img_agrees_on_the_image() {
    let s = Scratch::new("disk-cli");
    let img = image(&s, "d.raw", 8 << 20);
    let spec = format!("path={img},id=data");
    let out = ferry(&[
        "run",
        "--memory",
        "64M",
        "--guest",
        "disk span=1M passes=2",
        "--disk",
        &spec,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("K0 2 ok"), "{stdout}");
    // The same image, read-only, in a second VM that checks pass 2 everywhere.
    let ro = format!("path={img},readonly=on");
    let out = ferry(&[
        "run",
        "--memory",
        "64M",
        "--guest",
        "disk-verify span=1M pass=2",
        "--disk",
        &ro,
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("K0 2 ok"));
    qemu_img(&["info", "-f", "raw", &img]);
}

#[test]
fn a_guest_writes_a_qcow2_overlay_and_qemu_img_finds_the_pattern_over_the_base() {
    use ferry_guest::verify::{verify_disk_bytes, DiskPosition};
    let s = Scratch::new("disk-qcow2");
    let base = s.path("base.qcow2").display().to_string();
    let top = s.path("top.qcow2").display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "8M"]);
    ferry_guest::tools::qcow2_overlay("base.qcow2", top.as_ref());
    let spec = format!("path={top},format=qcow2");
    let out = ferry(&[
        "run",
        "--memory",
        "64M",
        "--guest",
        "disk span=1M passes=2 bs=64K",
        "--disk",
        &spec,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("K0 2 ok"), "{stdout}");
    qemu_img(&["check", "-q", &top]);
    let flat = s.path("flat.raw");
    qemu_img(&["convert", "-O", "raw", &top, flat.to_str().unwrap()]);
    let bytes = std::fs::read(&flat).unwrap();
    let p = DiskPosition {
        cpu: 0,
        sectors: 2048,
        block: 128,
        pass: 2,
        next: 16,
        completed: 2,
    };
    verify_disk_bytes(&bytes, &p).expect("the pattern, as qemu-img reads the overlay");
    // The base was never written.
    let bflat = s.path("base.raw");
    qemu_img(&["convert", "-O", "raw", &base, bflat.to_str().unwrap()]);
    assert!(std::fs::read(&bflat).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn bad_disks_get_one_clear_error_and_start_nothing() {
    let s = Scratch::new("disk-bad");
    let img = image(&s, "d.raw", 1 << 20);
    let missing = s.path("nope.raw").display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (format!("path={missing}"), "No such file or directory"),
        (
            format!("path={img},format=qcow3"),
            "unknown disk format \"qcow3\"",
        ),
        (format!("file={img}"), "unknown key"),
        (format!("path={img},readonly=maybe"), "expected on or off"),
        ("format=raw".to_string(), "path=FILE is required"),
        (format!("path={}", s.0.display()), "Is a directory"),
        (format!("path={img},id=this-id-is-far-too-long"), "1 to 20"),
        (
            format!("path={img},format=qcow2"),
            "not a usable qcow2 image",
        ),
    ];
    for (spec, expect) in &cases {
        // A VM that starts anyway ends by itself.
        let out = ferry(&[
            "run",
            "--memory",
            "64M",
            "--guest",
            "idle seconds=1",
            "--disk",
            spec,
        ]);
        let line = error_line(&out);
        assert_eq!(out.status.code(), Some(1), "{spec}: {line}");
        assert!(line.contains(expect), "{spec}: {line:?} lacks {expect:?}");
        assert!(out.stdout.is_empty(), "{spec}: the guest started");
    }
    let two = format!("path={img},id=a");
    let out = ferry(&[
        "run",
        "--guest",
        "idle seconds=1",
        "--disk",
        &two,
        "--disk",
        &two,
    ]);
    assert!(error_line(&out).contains("two disks have the id"));
    // An image another VM holds.
    let mut holder = Command::new(FERRY)
        .args([
            "run",
            "--memory",
            "64M",
            "--guest",
            "idle seconds=20",
            "--disk",
        ])
        .arg(format!("path={img}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its guest printing means its disk is open.
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("B ferry-guest"), "{first}");
    let spec = format!("path={img}");
    let out = ferry(&[
        "run",
        "--memory",
        "64M",
        "--guest",
        "idle seconds=1",
        "--disk",
        &spec,
    ]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.status.code(), Some(1), "a second VM got the image");
    let line = error_line(&out);
    assert!(line.contains("in use by another process"), "{line}");
}

#[test]
fn bad_nics_get_one_clear_error_and_start_nothing() {
    for (spec, expect) in [
        ("tap=fnt-no-such-tap", "does not exist (create it first"),
        ("tap=a,mac=52:54:00:12:34", "six hex bytes"),
        ("tap=a,mac=01:00:5e:00:00:01", "multicast"),
        ("mac=52:54:00:12:34:56", "tap=NAME is required"),
        ("tap=this-name-is-too-long-for-linux", "1 to 15 characters"),
    ] {
        let out = ferry(&[
            "run",
            "--memory",
            "64M",
            "--guest",
            "idle seconds=1",
            "--net",
            spec,
        ]);
        let line = error_line(&out);
        assert_eq!(out.status.code(), Some(1), "{spec}: {line}");
        assert!(line.contains(expect), "{spec}: {line:?} lacks {expect:?}");
        assert!(out.stdout.is_empty(), "{spec}: the guest started");
    }
}

/// `ferry disk move` as a user runs it on a VM writing its disk: a bad disk id, an existing
/// file and a missing directory each get one clear error and change nothing; the move to
/// qcow2 completes with a report, `ferry vm info` names the new file, the guest goes on
/// writing and checking its disk there, and the new image passes `qemu-img check`.
#[test]
fn ferry_disk_move_moves_a_disk_the_guest_writes_and_refuses_bad_targets_clearly() {
    let s = Scratch::new("disk-move-cli");
    let img = image(&s, "d.raw", 64 << 20);
    let sock = s.path("api.sock");
    let sock = sock.to_str().unwrap();
    let mut vm = disk_vm(sock, std::path::Path::new(&img));
    let moved = s.path("moved.qcow2").display().to_string();
    let mv = |disk: &str, to: &str| {
        ferry(&[
            "disk",
            "move",
            "--api-socket",
            sock,
            "--disk",
            disk,
            "--to",
            to,
            "--format",
            "qcow2",
            "--quiet",
        ])
    };
    for (disk, to, says) in [
        (
            "nope",
            moved.as_str(),
            "no disk \"nope\" (its disks: disk0)",
        ),
        ("disk0", img.as_str(), "exists; a disk moves to a new file"),
        (
            "disk0",
            "/nonexistent/dir/x.qcow2",
            "/nonexistent/dir is not a directory",
        ),
    ] {
        let out = mv(disk, to);
        assert_eq!(out.status.code(), Some(1), "{disk} {to}");
        let e = error_line(&out);
        assert!(e.contains(says), "{disk} {to}: {e}");
    }
    assert!(!std::path::Path::new(&moved).exists());
    let out = mv("disk0", &moved);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("moved disk disk0 from {img} to {moved} (qcow2)")),
        "{report}"
    );
    let info = String::from_utf8_lossy(&ferry_ok(&["vm", "info", "--api-socket", sock]).stdout)
        .into_owned();
    assert!(info.contains(&moved) && info.contains("qcow2"), "{info}");
    let st = String::from_utf8_lossy(&ferry_ok(&["disk", "status", "--api-socket", sock]).stdout)
        .into_owned();
    assert!(st.contains("\"completed\""), "{st}");
    let out = ferry(&["disk", "cancel", "--api-socket", sock]);
    assert!(error_line(&out).contains("no disk move is running"));
    vm.wait_line(|l| l == "K0 4 ok");
    ferry_ok(&["vm", "shutdown", "--api-socket", sock]);
    let (code, err, _) = vm.finish();
    assert_eq!(code, 0, "{err}");
    qemu_img(&["check", "-q", &moved]);
}

/// `ferry migrate --copy-storage` between two processes that share no disk: a receiver with no
/// `--storage-dir` refuses the disk clearly and the VM stays; then the VM moves with its disk
/// converted to qcow2 (`--disk-map`), the report says what the disks cost, the destination's
/// `ferry vm info` names the new file, the guest goes on writing and checking its disk
/// there, and the image passes `qemu-img check`.
#[test]
fn ferry_migrate_copy_storage_moves_the_vm_and_its_disk_to_a_host_that_shares_nothing() {
    let s = Scratch::new("sn-cli");
    let (src_dir, dst_dir) = (s.path("src"), s.path("dst"));
    std::fs::create_dir(&src_dir).unwrap();
    std::fs::create_dir(&dst_dir).unwrap();
    let img = src_dir.join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let a = s.path("a.sock");
    let a = a.to_str().unwrap();
    let vm = disk_vm(a, &img);

    let (r1, addr1) = receiver(&s.path("b1.sock"));
    let out = ferry(&[
        "migrate",
        "--insecure",
        "--to",
        &addr1,
        "--api-socket",
        a,
        "--copy-storage",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = error_line(&out);
    assert!(
        e.contains("disk disk0 comes with the VM, and this receiver has no --storage-dir")
            && e.contains("the VM keeps running here"),
        "{e}"
    );
    let (code, _, _) = r1.finish();
    assert_eq!(code, 1);
    assert!(std::fs::read_dir(&dst_dir).unwrap().next().is_none());

    let b = s.path("b.sock");
    let (mut dst, addr) = receiver_with(&b, &["--storage-dir", dst_dir.to_str().unwrap()]);
    let out = migrate_ok(
        &addr,
        a,
        &[
            "--copy-storage",
            "--disk-map",
            "disk0=moved.qcow2,format=qcow2",
            "--quiet",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("storage: 1 disk(s)"), "{text}");
    let (code, err, _) = vm.finish();
    assert_eq!(code, 0, "{err}");
    let moved = dst_dir.join("moved.qcow2");
    let info = String::from_utf8_lossy(
        &ferry_ok(&["vm", "info", "--api-socket", b.to_str().unwrap()]).stdout,
    )
    .into_owned();
    assert!(info.contains(moved.to_str().unwrap()), "{info}");
    dst.wait_line(|l| l.starts_with("K0 ") && l.ends_with(" ok"));
    let n: u64 = dst
        .seen
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("K0 ")?.strip_suffix(" ok")?.parse().ok())
        .max()
        .unwrap();
    dst.wait_line(|l| l == format!("K0 {} ok", n + 1));
    ferry_ok(&["vm", "shutdown", "--api-socket", b.to_str().unwrap()]);
    let (code, err, _) = dst.finish();
    assert_eq!(code, 0, "{err}");
    qemu_img(&["check", "-q", moved.to_str().unwrap()]);
}

/// A VM with API socket `sock` writing its disk `img` (4 MiB at 16 MB/s), once its first
/// pass over the disk checked out.
fn disk_vm(sock: &str, img: &std::path::Path) -> Running {
    let disk = format!("path={}", img.display());
    let mut vm = Running::start(&[
        "--memory",
        "64M",
        "--api-socket",
        sock,
        "--guest",
        "disk span=4M rate=16M hb=2000",
        "--disk",
        &disk,
    ]);
    vm.wait_line(|l| l == "K0 1 ok");
    vm
}

/// A real `ferry receive` killed (SIGKILL) while the disk's bulk copy is under way: `ferry
/// migrate` fails saying the VM keeps running, the guest goes on writing its disk on the
/// source, the source's image still holds the host's data; a second migration, to another
/// receiver, then succeeds and brings that data.
#[test]
fn a_receiver_killed_during_the_disk_copy_leaves_the_vm_running_on_its_disk() {
    use std::os::unix::fs::FileExt;
    let s = Scratch::new("sn-kill-cli");
    let (src_dir, dst1, dst2) = (s.path("src"), s.path("dst1"), s.path("dst2"));
    for d in [&src_dir, &dst1, &dst2] {
        std::fs::create_dir(d).unwrap();
    }
    let img = src_dir.join("d.raw");
    let (at, len) = (64u64 << 20, 256usize << 20);
    {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(512 << 20).unwrap();
        for off in (0..len as u64).step_by(4 << 20) {
            f.write_all_at(&host_fill(at + off, 4 << 20), at + off)
                .unwrap();
        }
    }
    let check = |p: &std::path::Path| {
        let f = std::fs::File::open(p).unwrap();
        let mut b = vec![0u8; 4 << 20];
        for off in (0..len as u64).step_by(4 << 20) {
            f.read_exact_at(&mut b, at + off).unwrap();
            assert!(
                b == host_fill(at + off, 4 << 20),
                "{}: host data at {off:#x}",
                p.display()
            );
        }
    };
    let a = s.path("a.sock");
    let a = a.to_str().unwrap();
    let mut vm = disk_vm(a, &img);

    let (mut r1, addr1) = receiver_with(
        &s.path("b1.sock"),
        &["--storage-dir", dst1.to_str().unwrap()],
    );
    let mig = spawn_migrate(&addr1, a, &["--copy-storage", "--quiet"]);
    // Killed once the destination's copy holds 16 MiB of the 256.
    let target = dst1.join("d.raw");
    let t = std::time::Instant::now();
    while std::fs::metadata(&target).map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    }) < 16 << 20
    {
        assert!(t.elapsed().as_secs() < 60, "the copy never started");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    r1.child.kill().unwrap();
    let out = mig.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("keeps running here"), "{err}");
    let _ = r1.finish();
    // The guest goes on, on its own disk.
    let n = vm.seen.len();
    vm.wait_line(|l| l.starts_with("K0 ") && l.ends_with(" ok") && !l.starts_with("K0 1 "));
    assert!(vm.seen.len() > n);
    let info =
        String::from_utf8_lossy(&ferry_ok(&["vm", "info", "--api-socket", a]).stdout).into_owned();
    assert!(
        info.contains("\"running\"") && info.contains(img.to_str().unwrap()),
        "{info}"
    );
    check(&img);

    let b2 = s.path("b2.sock");
    let (mut r2, addr2) = receiver_with(&b2, &["--storage-dir", dst2.to_str().unwrap()]);
    migrate_ok(&addr2, a, &["--copy-storage", "--quiet"]);
    let (code, err, _) = vm.finish();
    assert_eq!(code, 0, "{err}");
    r2.wait_line(|l| l.starts_with("K0 ") && l.ends_with(" ok"));
    ferry_ok(&["vm", "shutdown", "--api-socket", b2.to_str().unwrap()]);
    let (code, err, _) = r2.finish();
    assert_eq!(code, 0, "{err}");
    check(&dst2.join("d.raw"));
    check(&img);
}
