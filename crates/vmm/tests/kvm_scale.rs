//! Pre-copy of a large VM as the guest feels it on the source: a 512 GiB VM with 1 GiB
//! touched carries only what was touched, lands within its downtime limit, and its heartbeat
//! never stalls long while the passes run (KVM's dirty log is re-armed a few pages at a time
//! as they are sent, not all of memory at once); memory page-exact on the destination.
mod common;
use common::live::*;
use ferry_guest::console::TimedLine;
use ferry_guest::heartbeat::{parse_line, GuestLine};
use ferry_migration::engine::Options;
use std::time::{Duration, Instant};

/// Largest gap between consecutive vCPU 0 heartbeats that both arrived in `[from, to]`,
/// by the guest's own clock (its TSC in each line, against the host's clock over the whole
/// window): what the guest lived through, not how late the host read the lines.
fn largest_gap(lines: &[TimedLine], from: Instant, to: Instant) -> Duration {
    let beats: Vec<(Instant, u64)> = lines
        .iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .filter_map(|(at, l)| match parse_line(l) {
            GuestLine::Heartbeat { cpu: 0, tsc, .. } => Some((*at, tsc)),
            _ => None,
        })
        .collect();
    assert!(
        beats.len() > 20,
        "too few heartbeats in the window: {}",
        beats.len()
    );
    let (first, last) = (beats[0], beats[beats.len() - 1]);
    let ns_per_tick =
        last.0.duration_since(first.0).as_nanos() as f64 / (last.1 - first.1).max(1) as f64;
    let mut gaps: Vec<(Duration, Duration)> = beats
        .windows(2)
        .map(|w| {
            let ticks = w[1].1.saturating_sub(w[0].1) as f64;
            (
                Duration::from_nanos((ticks * ns_per_tick) as u64),
                w[0].0.duration_since(from),
            )
        })
        .collect();
    gaps.sort();
    eprintln!(
        "largest gaps (gap, at): {:?}",
        &gaps[gaps.len().saturating_sub(6)..]
    );
    gaps.last().map(|g| g.0).unwrap_or_default()
}

#[test]
fn a_512_gib_vm_with_a_gib_touched_moves_page_exact_within_its_limit() {
    let (src, rx, mut seen, base) = boot_dirtying(1, 512 << 30, "dirty size=1G rate=0 hb=2000");
    let (addr, dest) = destination(None);
    let opts = Options {
        downtime_limit: Duration::from_millis(30),
        ..Options::default()
    };
    let start = Instant::now();
    let report = send_vm(&src, addr, &opts).expect("migration");
    // The pause began `downtime` before the engine returned.
    let paused = Instant::now() - Duration::from_secs_f64(report.downtime_ms / 1e3);
    seen.extend(rx.try_iter());
    let stall = largest_gap(&seen, start, paused);
    eprintln!(
        "512 GiB, 1 GiB touched: {} passes, total {:.0} ms, downtime {:.2} ms (predicted {:.2}), \
         {:.0} MiB sent, largest source stall {stall:?}",
        report.passes.len(),
        report.total_ms,
        report.downtime_ms,
        report.predicted_downtime_ms,
        report.wire_bytes as f64 / 1048576.0
    );
    // Only what the guest touched travels (1 GiB and what it rewrote meanwhile).
    assert!(report.wire_bytes < 3 << 30, "{report:?}");
    // A safety net for the 30 ms limit (11-22 ms measured; two "hosts" share two cores).
    assert!(
        report.downtime_ms <= 60.0,
        "downtime far over the limit: {report:?}"
    );
    // A safety net: re-protecting the whole dirty log at once stalled this guest 235 ms at
    // 512 GiB. Two "hosts" sharing two cores with the vCPU still cost it whole scheduler
    // slices (5-20 ms here, with no dirty logging at all), so the bound is wide.
    assert!(stall <= Duration::from_millis(50), "source stall {stall:?}");
    let (vm, rx2) = hand_over(&src, &rx, &mut seen, dest);
    let mut after = Vec::new();
    ferry_guest::console::wait_for(&rx2, &mut after, common::T, |l| l.starts_with("H0 ")).unwrap();
    stop_exact_and_continuous(vm, &rx2, after, &seen, base);
}
