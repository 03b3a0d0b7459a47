//! Issue #14's benchmarks (scripts/bench-overlay.sh runs them and prints the tables of
//! docs/benchmarks.md; ignored in CI):
//! - the stall of an open TCP connection (largest reply gap, a request every 5 ms from the
//!   client outside both sites) across a live move within site A, from A to B and back by
//!   post-copy, at 0, 20 and 50 ms RTT on the WAN link, beside the guest-observed downtime
//!   (largest heartbeat gap) and the VMM's downtime of the same move;
//! - a live migration's total time over the WAN link (20 ms RTT) at 1 Gbit/s and 200 Mbit/s,
//!   with and without compression.
mod common;
mod overlay_common;
use common::*;
use ferry_guest::tcp::TcpProbe;
use overlay_common::*;
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:99:00:05";

/// A counter in an agent's `/metrics`.
fn env_list(name: &str, default: &str) -> Vec<u32> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

/// The VMM's downtime in `ferry cluster migrate`'s output ("paused 86.5 ms").
fn paused_ms(out: &str) -> f64 {
    out.split("paused ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
#[ignore = "benchmark: scripts/bench-overlay.sh"]
fn bench_connection_stall_across_moves() {
    let runs = env_list("FERRY_BENCH_RUNS", "3")[0];
    println!(
        "| one-way delay ms | WAN RTT ms | move | stall ms | guest-observed downtime ms | VMM downtime ms | stall - guest downtime ms | frames forwarded |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for delay in env_list("FERRY_BENCH_DELAYS", "0,10,25") {
        let o = Overlay::up_with("ob", delay, None, true);
        let mut host = o.create_vm(&format!("tcp ip={CA} mtu=1450 hb=1000"), MAC, 1);
        if host != "ha" {
            o.cli(&["migrate", "v", "--to", "ha"]);
            host = "ha".into();
        }
        for _ in 0..runs {
            for (to, postcopy, what) in [
                ("hd", false, "within site A (pre-copy)"),
                ("hb", false, "A → B (pre-copy)"),
                ("ha", true, "B → A (post-copy)"),
            ] {
                let beats = Beats::watch(vec![
                    o.scratch.path(&host).join("v.console"),
                    o.scratch.path(to).join("v.console"),
                ]);
                let probe_t0 = Instant::now();
                let probe = TcpProbe::start(
                    format!("{CA}:8").parse().unwrap(),
                    None,
                    Duration::from_millis(5),
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(400));
                let t0 = Instant::now();
                let forwarded =
                    |h: &str| metric_at(o.agent(h), "ferry_frames_forwarded_total").unwrap_or(0);
                let before = forwarded(&host);
                let mut args = vec!["migrate", "v", "--to", to];
                if postcopy {
                    args.push("--postcopy");
                }
                let out = o.cli(&args);
                std::thread::sleep(Duration::from_millis(600));
                let st = probe.stop(Duration::from_secs(3));
                st.check().expect("the connection carried on");
                let (gap, beat_end, whole) = beats.stop_at(t0);
                // Where the two gaps lie (ms from the migrate command), for the record.
                let reply_end = probe_t0 + st.max_gap_at;
                let rel = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
                eprintln!(
                    "gaps: replies {:.1}..{:.1} ms, heartbeats {:.1}..{:.1} ms",
                    rel(reply_end) - st.max_gap.as_secs_f64() * 1e3,
                    rel(reply_end),
                    rel(beat_end) - gap.as_secs_f64() * 1e3,
                    rel(beat_end)
                );
                assert!(whole, "a heartbeat went missing");
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let rtt = if to == "hd" { 0 } else { 2 * delay };
                println!(
                    "| {delay} | {rtt} | {what} | {:.1} | {:.1} | {:.1} | {:+.1} | {} |",
                    ms(st.max_gap),
                    ms(gap),
                    paused_ms(&out),
                    ms(st.max_gap) - ms(gap),
                    forwarded(&host) - before
                );
                host = to.into();
            }
        }
    }
}

#[test]
#[ignore = "benchmark: scripts/bench-overlay.sh"]
fn bench_migration_time_over_the_wan() {
    println!("| WAN link | compression | total ms | VMM downtime ms | MiB sent |");
    println!("|---|---|---|---|---|");
    for rate in ["1gbit", "200mbit"] {
        let o = Overlay::up_with("ow", 10, Some(rate), false);
        // 256 MiB of guest memory, 192 MiB of it written once with the verify pattern.
        let sock = o.scratch.path("src.sock");
        let mut src = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &o.ns("a"),
                FERRY,
                "run",
                "--memory",
                "256M",
            ])
            .args(["--guest", "verify size=192M"])
            .arg("--api-socket")
            .arg(&sock)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait("the source's API", Duration::from_secs(20), || {
            sock.exists().then_some(())
        });
        std::thread::sleep(Duration::from_secs(2)); // filled
        for (i, compress) in ["none", "lz4", "zstd"].into_iter().enumerate() {
            let dsock = o.scratch.path(&format!("dst-{compress}.sock"));
            let listen = format!("{PA_B}:{}", 7300 + i);
            let mut dst = std::process::Command::new("ip")
                .args(["netns", "exec", &o.ns("b"), FERRY, "receive", "--insecure"])
                .args(["--listen", &listen])
                .arg("--api-socket")
                .arg(&dsock)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(500));
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &o.ns("a"), FERRY, "migrate", "--insecure"])
                .args(["--to", &listen, "--compress", compress])
                .arg("--api-socket")
                .arg(&sock)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = text
                .lines()
                .find(|l| l.starts_with("migrated to"))
                .unwrap_or("");
            let num = |key: &str, unit: &str| {
                line.split(key)
                    .nth(1)
                    .and_then(|r| r.trim().split(unit).next())
                    .and_then(|x| x.trim().parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            println!(
                "| {rate}, 20 ms RTT | {compress} | {:.0} | {:.1} | {:.1} |",
                num("total", "ms"),
                num("downtime", "ms"),
                line.split(" MiB sent")
                    .next()
                    .and_then(|r| r.rsplit(' ').next())
                    .and_then(|x| x.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            );
            // Back: the destination migrates to a fresh source-side receiver for the next run.
            let back = format!("{PA_A}:{}", 7400 + i);
            let _ = src.kill();
            let _ = src.wait();
            src = std::process::Command::new("ip")
                .args(["netns", "exec", &o.ns("a"), FERRY, "receive", "--insecure"])
                .args(["--listen", &back])
                .arg("--api-socket")
                .arg(&sock)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(500));
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &o.ns("b"), FERRY, "migrate", "--insecure"])
                .args(["--to", &back])
                .arg("--api-socket")
                .arg(&dsock)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "back: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = dst.wait();
        }
        let _ = src.kill();
        let _ = src.wait();
    }
}
