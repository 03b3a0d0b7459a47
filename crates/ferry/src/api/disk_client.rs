//! `ferry disk move|cancel|status`: the client side of `/vm/disk/move`.
use super::client::call;
use crate::cli::{DiskAction, DiskArgs};
use anyhow::{Context, Result};
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Duration;

pub fn main(args: DiskArgs) -> Result<()> {
    match args.action {
        DiskAction::Cancel { api_socket } => {
            call(&api_socket, Method::PUT, "/vm/disk/move/cancel", None)?;
            println!("asked the disk move to cancel; the VM stays on its old file");
        }
        DiskAction::Status { api_socket } => {
            let v =
                call(&api_socket, Method::GET, "/vm/disk/move", None)?.context("empty answer")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        DiskAction::Move(a) => {
            let to = std::path::absolute(&a.to).with_context(|| a.to.display().to_string())?;
            let body = serde_json::json!({ "disk": a.disk, "to": to, "format": a.format });
            let socket = a.api_socket.clone();
            let run = std::thread::spawn(move || {
                call(
                    &socket,
                    Method::PUT,
                    "/vm/disk/move",
                    Some(body.to_string()),
                )
            });
            if !a.quiet {
                follow(&a.api_socket, &run);
            }
            let v = run
                .join()
                .map_err(|_| anyhow::anyhow!("disk move request thread panicked"))??
                .context("empty disk move answer")?;
            print_report(&v);
        }
    }
    Ok(())
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / 1048576.0
}

/// Shows the copy's position on the disk, what it copied and mirrored, until `run` ends.
fn follow<T>(socket: &Path, run: &std::thread::JoinHandle<T>) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {bytes}/{total_bytes}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix("copying");
    while !run.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(Some(s)) = call(socket, Method::GET, "/vm/disk/move", None) else {
            continue;
        };
        bar.set_length(s["size"].as_u64().unwrap_or(0));
        bar.set_position(s["cursor"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{:.1} MiB copied, {:.1} MiB of guest writes mirrored  {}",
            mib(&s["copied"]),
            mib(&s["mirrored"]),
            s["phase"].as_str().unwrap_or("")
        ));
    }
    bar.finish_and_clear();
}

fn print_report(v: &serde_json::Value) {
    println!(
        "moved disk {} from {} to {} ({}) in {:.2} s",
        v["disk"].as_str().unwrap_or("?"),
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["format"].as_str().unwrap_or("?"),
        v["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
    );
    println!(
        "  {:.1} MiB of data copied ({:.1} MiB disk), {:.1} MiB of guest writes mirrored; \
         guest disk requests waited {:.3} ms at the switch (vCPUs never stopped)",
        mib(&v["copied_bytes"]),
        mib(&v["size"]),
        mib(&v["mirrored_bytes"]),
        v["pivot_us"].as_f64().unwrap_or(0.0) / 1e3,
    );
    println!(
        "  the old file is unchanged since the switch and no longer used; delete it when you \
         no longer need it"
    );
}
