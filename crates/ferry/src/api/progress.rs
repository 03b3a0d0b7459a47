//! The live progress bar of `ferry migrate`: polls `GET /vm/migration` while the migration
//! request runs and shows pass, pages left, rate and ETA (on a terminal; indicatif draws
//! nothing when stderr is not one).
use super::client::call;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Duration;

/// Follows the migration until `run` (the thread waiting for the answer) has finished.
pub fn follow<T>(socket: &Path, run: &std::thread::JoinHandle<T>) {
    follow_with(
        || {
            call(socket, Method::GET, "/vm/migration", None)
                .ok()
                .flatten()
        },
        run,
    )
}

/// As [`follow`], the status (`GET /vm/migration`'s) fetched by `status` (`ferry cluster
/// migrate` asks the source's agent).
pub fn follow_with<T>(
    status: impl Fn() -> Option<serde_json::Value>,
    run: &std::thread::JoinHandle<T>,
) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} pages  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut pass = None;
    while !run.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let Some(s) = status() else {
            continue;
        };
        let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
        if pass != s["pass"].as_u64() {
            // A new pass: start the bar over so the old position never shows against the new
            // length.
            pass = s["pass"].as_u64();
            bar.reset();
            bar.set_prefix(match s["phase"].as_str() {
                Some("post_copy" | "post_copy_paused") => "post-copy".to_string(),
                _ => format!("pass {}", s["pass"]),
            });
        }
        if s["phase"].as_str() == Some("storage") {
            // The disks' bulk copy: how far it is through the disks, in MiB.
            bar.set_prefix("disks");
            bar.set_length(s["disk_bytes"].as_u64().unwrap_or(0) >> 20);
            bar.set_position(s["disk_cursor"].as_u64().unwrap_or(0) >> 20);
            bar.set_message(format!(
                "MiB  {:.0} MiB of data copied",
                f("disk_copied") / 1048576.0
            ));
            continue;
        }
        bar.set_length(s["pass_pages"].as_u64().unwrap_or(0));
        bar.set_position(s["pass_sent"].as_u64().unwrap_or(0));
        let throttle = match s["throttle_percent"].as_u64() {
            Some(t) if t > 0 => format!("  throttle {t} %"),
            _ => String::new(),
        };
        bar.set_message(format!(
            "{:.0} MiB/s  ETA {:.1} s  dirty {} pages  {}{throttle}",
            f("bandwidth_bytes_per_s") / 1048576.0,
            f("eta_ms") / 1e3,
            s["dirty_pages"],
            s["phase"].as_str().unwrap_or(""),
        ));
    }
    bar.finish_and_clear();
}
