//! `ferry-wire --a IF --b IF --delay-ms D`: carries every frame between two interfaces,
//! delayed (ferry_net::wire). The test topology's WAN link (`scripts/netlab.sh`) runs it in
//! its middle namespace. Runs until killed.
use clap::Parser;
use ferry_net::wire::{Config, Wire};
use std::time::Duration;

#[derive(Parser)]
#[command(
    about = "Carry frames between two interfaces with a delay each way (a WAN link for tests)"
)]
struct Args {
    /// One interface (offloads off: `ethtool -K IF gro off gso off tso off`).
    #[arg(long)]
    a: String,
    /// The other.
    #[arg(long)]
    b: String,
    /// Delay added to every frame, each way, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Frames held per direction at most; more are dropped.
    #[arg(long, default_value_t = 10_000)]
    queue: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if !(a.delay_ms.is_finite() && (0.0..=10_000.0).contains(&a.delay_ms)) {
        anyhow::bail!("--delay-ms {}: expected 0 to 10000", a.delay_ms);
    }
    if a.queue == 0 {
        anyhow::bail!("--queue must be at least 1");
    }
    let cfg = Config {
        delay: Duration::from_secs_f64(a.delay_ms / 1e3),
        queue: a.queue,
    };
    let w = Wire::start(&a.a, &a.b, cfg)?;
    eprintln!(
        "ferry-wire: {} <-> {}, {} ms each way, {} frames queued at most",
        a.a, a.b, a.delay_ms, a.queue
    );
    w.wait();
    anyhow::bail!("a leg failed")
}
