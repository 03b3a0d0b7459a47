//! The cluster soak (`scripts/cluster-soak.sh MINUTES`; ignored in CI): two agents over
//! etcd and the disk-writing test guest, faults in turn until the time is up — `kill -9` of
//! the owner host, `SIGSTOP` of the owner's agent past its TTL, a live migration, a drain —
//! then a report of the counts. Fails if two copies ever ran at once, if the guest ever read
//! its disk back wrong, or if the VM was not running after a fault.
mod cluster_common;
mod common;
use cluster_common::*;
use common::*;
use std::time::{Duration, Instant};

#[test]
#[ignore = "a soak: scripts/cluster-soak.sh MINUTES"]
fn cluster_soak() {
    let minutes: f64 = std::env::var("FERRY_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(2.0);
    let s = Scratch::new("cluster-soak");
    let (_etcd, h1, h2) = cluster(&s);
    let mut hosts = [h1, h2];
    let checker = TwoCopies::watch(hosts.iter().map(|h| h.run.join("a.sock")).collect());
    let (mut runs, mut failovers, mut migrations, mut drains, mut refused) = (0, 0, 0, 0, 0);
    let mut bad = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    while Instant::now() < end {
        let (now, e) = wait("an owner", Duration::from_secs(30), || {
            owner(&hosts[0].addr, "a").or_else(|| owner(&hosts[1].addr, "a"))
        });
        let x = usize::from(hosts[1].id == now);
        let y = 1 - x;
        wait("the guest writing", Duration::from_secs(30), || {
            (last_pass(&hosts[x].console("a")) >= 1).then_some(())
        });
        for h in &hosts {
            if h.console("a").contains("BAD") {
                bad.push(h.console("a"));
            }
        }
        let fault = runs % 4;
        runs += 1;
        match fault {
            0 => {
                hosts[x].kill_host();
                let _ = std::fs::remove_file(hosts[x].run.join("a.console"));
                wait("the failover", Duration::from_secs(15), || {
                    owner(&hosts[y].addr, "a").filter(|(h, e2)| *h == hosts[y].id && *e2 > e)
                });
                failovers += 1;
                hosts[x].spawn();
            }
            1 => {
                hosts[x].signal(libc::SIGSTOP);
                wait("the takeover", Duration::from_secs(15), || {
                    owner(&hosts[y].addr, "a").filter(|(h, _)| *h == hosts[y].id)
                });
                let (_, f) = api(&hosts[x].run.join("a.sock"), "GET", "/vm/fence", "");
                let v: serde_json::Value = serde_json::from_str(&f).unwrap_or_default();
                refused += v["refused_writes"].as_u64().unwrap_or(0);
                hosts[x].signal(libc::SIGCONT);
                failovers += 1;
                wait("the old agent back", Duration::from_secs(30), || {
                    (hosts[x].metric("ferry_agent_rejoins_total")? >= 1).then_some(())
                });
            }
            2 => {
                cli(&hosts[x], &["migrate", "a"]);
                migrations += 1;
            }
            _ => {
                cli(&hosts[y], &["drain", &hosts[x].id]);
                cli(&hosts[y], &["undrain", &hosts[x].id]);
                drains += 1;
            }
        }
        wait(
            "the VM running after the fault",
            Duration::from_secs(20),
            || {
                let (h, _) = owner(&hosts[0].addr, "a").or_else(|| owner(&hosts[1].addr, "a"))?;
                let at = hosts.iter().find(|a| a.id == h)?;
                let (_, b) = try_api(&at.run.join("a.sock"), "GET", "/vm", "")?;
                b.contains("\"state\":\"running\"").then_some(())
            },
        );
    }
    let (both, samples) = checker.finish();
    println!(
        "cluster soak, {minutes} min: {runs} runs, {failovers} failovers, {migrations} live \
         migrations, {drains} drains, {refused} fenced writes refused, {both} of {samples} \
         samples with two copies running, {} bad disk read-backs",
        bad.len()
    );
    assert_eq!(both, 0, "two copies ran at once");
    assert!(bad.is_empty(), "{}", bad.join("\n---\n"));
}
