//! `ferry demo`: boots the test guest, shows its heartbeat with host timestamps, pauses it
//! once and shows the pause as the guest sees it (the largest heartbeat gap). The
//! live-migration issue turns this into a migration between two local hosts.
use crate::cli::DemoArgs;
use anyhow::{bail, Context, Result};
use ferry_guest::console::LineSink;
use ferry_guest::heartbeat::{parse_line, GuestLine, HeartbeatLog};
use ferry_vmm::{BootSource, GuestExit, Vm, VmConfig};
use std::time::{Duration, Instant};

pub fn main(args: DemoArgs) -> Result<()> {
    if args.beats < 4 {
        bail!("--beats must be at least 4");
    }
    let workload = format!("heartbeat period={} count={}", args.period_us, args.beats);
    println!("ferry demo: test guest, 1 vCPU, 256 MiB, workload '{workload}'");
    let t0 = Instant::now();
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: 1,
        memory: 256 << 20,
        boot: BootSource::TestGuest { args: workload },
    };
    let vm = Vm::new(cfg, Box::new(sink)).context("creating the demo VM")?;
    vm.start()?;
    let pause_at = u64::from(args.beats / 2);
    let pause_for = Duration::from_millis(100);
    let mut log = HeartbeatLog::default();
    let deadline =
        Duration::from_micros(args.period_us) * (args.beats + 50) + Duration::from_secs(10);
    loop {
        let Ok((at, line)) = rx.recv_timeout(deadline) else {
            bail!("the guest went quiet");
        };
        match parse_line(&line) {
            GuestLine::Heartbeat { cpu: 0, seq, tsc } => {
                let since = log.beats.last().map(|b| at.duration_since(b.at));
                log.push(at, seq, tsc);
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                match since {
                    None => println!(
                        "  heartbeat {seq:>3}   first, {:.1} ms after start",
                        ms(at - t0)
                    ),
                    Some(d) => println!("  heartbeat {seq:>3}   +{:.1} ms", ms(d)),
                }
                if seq == pause_at {
                    let t = Instant::now();
                    vm.pause()?;
                    let took = t.elapsed();
                    println!(
                        "  -- VM paused (all vCPUs stopped in {:.3} ms); resuming in {} ms --",
                        took.as_secs_f64() * 1e3,
                        pause_for.as_millis()
                    );
                    std::thread::sleep(pause_for);
                    vm.resume()?;
                }
            }
            GuestLine::PowerOff { .. } => break,
            GuestLine::Error { message } => bail!("guest error: {message}"),
            _ => {}
        }
    }
    let exit = vm.wait();
    if exit != (GuestExit::PowerOff { code: 0 }) {
        bail!("guest ended badly: {exit:?}");
    }
    log.check_continuous().context("heartbeat sequence")?;
    if let Some((gap, seq)) = log.max_gap() {
        println!(
            "guest-observed pause (largest heartbeat gap, before beat {seq}): {:.1} ms; \
             {} heartbeats, none lost or repeated",
            gap.as_secs_f64() * 1e3,
            log.beats.len()
        );
    }
    Ok(())
}
