//! A VMM fenced for a cluster agent (`ferry run --fence-epoch --fence-deadline-ns`, issue
//! #13): past its deadline it stops its vCPUs and its disk stops changing; renewals are
//! refused once it has passed; a lower epoch cannot take a disk a higher one holds.
mod common;
use common::*;
use std::time::{Duration, Instant};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn now_ns() -> u64 {
    ferry_storage::fence::monotonic_ns()
}

#[test]
fn past_its_deadline_a_fenced_vmm_stops_and_its_disk_no_longer_changes() {
    let s = Scratch::new("fence-cli");
    let img = s.path("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = s.path("api.sock");
    let spec = format!("path={}", img.display());
    let deadline = (now_ns() + 3_000_000_000).to_string();
    let mut vm = Running::start(&[
        "--memory",
        "64M",
        "--guest",
        "disk span=1M passes=0 hb=1000",
        "--disk",
        &spec,
        "--api-socket",
        sock.to_str().unwrap(),
        "--fence-epoch",
        "7",
        "--fence-deadline-ns",
        &deadline,
    ]);
    vm.wait_line(|l| l.starts_with("K0 1 ok"));
    assert_eq!(
        ferry_storage::fence::current_epoch(&img).unwrap(),
        7,
        "the VMM took the disk with its epoch"
    );
    let (code, body) = api(&sock, "GET", "/vm/fence", "");
    assert_eq!(code, 200, "{body}");
    let f = json(&body);
    assert_eq!(f["epoch"], 7);
    assert_eq!(f["expired"], false);
    // The fenced VMM shares the disk only with other fenced VMMs (the next owner): a VMM
    // that is not fenced cannot open it for writing.
    let out = ferry(&[
        "run",
        "--memory",
        "16M",
        "--guest",
        "heartbeat count=1",
        "--disk",
        &spec,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use"), "{err}");
    // A renewal moves the deadline on (2 s more).
    let later = now_ns() + 2_000_000_000;
    let (code, body) = api(
        &sock,
        "PUT",
        "/vm/fence",
        &format!("{{\"deadline_ns\":{later}}}"),
    );
    assert_eq!(code, 204, "{body}");
    assert!(now_ns() < later);
    // Then no renewal: past the deadline the vCPUs stop and the disk stops changing.
    let t0 = Instant::now();
    loop {
        let info = json(&api(&sock, "GET", "/vm", "").1);
        if info["state"] == "paused" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never fenced: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(now_ns() >= later, "paused before its deadline");
    let f = json(&api(&sock, "GET", "/vm/fence", "").1);
    assert_eq!(f["expired"], true, "{f}");
    eprintln!("writes refused at the deadline: {}", f["refused_writes"]);
    let before = std::fs::read(&img).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a fenced VMM's disk changed"
    );
    // A resume does not bring it back (the watchdog stops it again), a renewal is refused.
    let _ = api(&sock, "PUT", "/vm/resume", "");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(json(&api(&sock, "GET", "/vm", "").1)["state"], "paused");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a fenced VMM's disk changed"
    );
    let (code, body) = api(
        &sock,
        "PUT",
        "/vm/fence",
        &format!("{{\"deadline_ns\":{}}}", now_ns() + 60_000_000_000),
    );
    assert_eq!(code, 409, "{body}");
    assert_eq!(api(&sock, "PUT", "/vm/shutdown", "").0, 204);
    let (code, err, lines) = vm.finish();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fenced"), "{err}");
    // The write the fence refused was held, as QEMU's werror=stop holds it: the guest never
    // saw an I/O error.
    assert!(
        !lines.iter().any(|l| l.1.contains("failed")),
        "the guest saw a failed write: {:?}",
        lines.iter().map(|l| &l.1).collect::<Vec<_>>()
    );

    // A newer owner took the disk (epoch 9): the old epoch is refused with a clear error,
    // the newer one runs.
    ferry_storage::fence::accept_epoch(&img, 9).unwrap();
    let out = ferry(&[
        "run",
        "--memory",
        "64M",
        "--guest",
        "disk span=64K passes=1",
        "--disk",
        &spec,
        "--fence-epoch",
        "7",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("epoch 9") && err.contains("epoch 7"), "{err}");
    let out = ferry(&[
        "run",
        "--memory",
        "64M",
        "--guest",
        "disk span=64K passes=1",
        "--disk",
        &spec,
        "--fence-epoch",
        "10",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ferry_storage::fence::current_epoch(&img).unwrap(), 10);
}
