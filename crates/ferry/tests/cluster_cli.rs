//! Clusters of `ferry host` agents on loopback over a throwaway etcd (issue #13), every VM
//! the test guest writing its disk on the shared storage:
//! - `kill -9` of a host (agent and VMMs), default timing: the VM runs on the other host
//!   within 10 s with a
//!   higher epoch, the disk held every pass flushed before the kill, and the failed host,
//!   back, leaves the VM where it is;
//! - `SIGSTOP` of an agent past its TTL: its VMM fences itself (paused, disk unchanged
//!   from then to the takeover), the VM is taken over, and after `SIGCONT` the old agent
//!   kills its copy; a checker sampling both hosts' VMMs never sees two running.
mod cluster_common;
mod common;
use cluster_common::*;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_killed_hosts_vm_runs_elsewhere_within_10s_and_the_host_coming_back_leaves_it() {
    let s = Scratch::new("cluster-kill");
    std::fs::create_dir_all(s.path("storage")).unwrap();
    let _etcd = etcd::Etcd::start(1);
    // `ferry host`'s default timing (TTL 4 s, grace 2 s): the 10 s bound is the defaults'.
    let defaults = ["--ttl", "4", "--grace", "2"];
    let h1 = Agent::start_with(&s, "h1", &etcd_url(&_etcd), &defaults);
    let h2 = Agent::start_with(&s, "h2", &etcd_url(&_etcd), &defaults);
    create_a(&s, &h1);
    let mut hosts = [h1, h2];
    let (first, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&hosts[0].addr, "a")
    });
    let (x, y) = if first == "h1" { (0, 1) } else { (1, 0) };
    wait(
        "two passes on the first host",
        Duration::from_secs(30),
        || (last_pass(&hosts[x].console("a")) >= 2).then_some(()),
    );
    let flushed = last_pass(&hosts[x].console("a"));
    hosts[x].kill_host();
    let t0 = Instant::now();
    check_crashed_disk(&s.path("storage/a.raw"), flushed);
    let survivor = hosts[y].addr.clone();
    let (now, e2) = wait("the takeover", Duration::from_secs(15), || {
        owner(&survivor, "a").filter(|(h, _)| *h == hosts[y].id)
    });
    assert_eq!(now, hosts[y].id);
    assert!(e2 > e1, "epoch {e2} not above {e1}");
    wait(
        "the guest running on the survivor",
        Duration::from_secs(15),
        || hosts[y].console("a").contains("K0 1 ok").then_some(()),
    );
    let took = t0.elapsed();
    eprintln!(
        "failover: the guest wrote and checked a pass on the survivor {took:?} after the kill"
    );
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    assert_eq!(hosts[y].metric("ferry_agent_failovers_total"), Some(1));
    // The failed host comes back: it finds the VM owned elsewhere and does not start it.
    hosts[x].spawn();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(hosts[x].metric("ferry_agent_vm_starts_total"), Some(0));
    assert_eq!(owner(&survivor, "a"), Some((hosts[y].id.clone(), e2)));
}

#[test]
fn a_paused_agent_is_fenced_taken_over_and_kills_its_copy_and_two_never_run() {
    let s = Scratch::new("cluster-stop");
    let (_etcd, h1, h2) = cluster(&s);
    let hosts = [h1, h2];
    let (first, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&hosts[0].addr, "a")
    });
    let (x, y) = if first == "h1" { (0, 1) } else { (1, 0) };
    wait("a pass on the first host", Duration::from_secs(30), || {
        (last_pass(&hosts[x].console("a")) >= 1).then_some(())
    });
    let checker = TwoCopies::watch(hosts.iter().map(|h| h.run.join("a.sock")).collect());
    let old_sock = hosts[x].run.join("a.sock");
    hosts[x].signal(libc::SIGSTOP);
    // Its VMM runs on until its deadline (at most a TTL), then fences itself.
    wait("the old VMM fenced", Duration::from_secs(10), || {
        let (_, b) = try_api(&old_sock, "GET", "/vm", "")?;
        b.contains("\"state\":\"paused\"").then_some(())
    });
    let fenced = std::fs::read(s.path("storage/a.raw")).unwrap();
    let survivor = hosts[y].addr.clone();
    // Until the takeover, the disk stays as the fenced VMM left it.
    let mut last = fenced.clone();
    let e2 = wait("the takeover", Duration::from_secs(15), || {
        match owner(&survivor, "a") {
            Some((h, e)) if h == hosts[y].id => Some(e),
            _ => {
                last = std::fs::read(s.path("storage/a.raw")).unwrap();
                None
            }
        }
    });
    assert!(e2 > e1);
    assert!(
        last == fenced,
        "the fenced VMM's disk changed before the takeover"
    );
    let (_, f) = api(&old_sock, "GET", "/vm/fence", "");
    assert!(f.contains("\"expired\":true"), "{f}");
    eprintln!("the fenced VMM: {f}");
    wait("the guest on the survivor", Duration::from_secs(15), || {
        hosts[y].console("a").contains("K0 1 ok").then_some(())
    });
    // The old agent wakes: its membership is gone, it kills its copy and joins again.
    hosts[x].signal(libc::SIGCONT);
    wait("the old copy gone", Duration::from_secs(10), || {
        try_api(&old_sock, "GET", "/vm", "").is_none().then_some(())
    });
    wait("the old agent back", Duration::from_secs(10), || {
        (hosts[x].metric("ferry_agent_rejoins_total")? >= 1).then_some(())
    });
    checker.check();
    assert_eq!(owner(&survivor, "a"), Some((hosts[y].id.clone(), e2)));
}

/// The TLS agent's API answers no one without a certificate of the cluster's CA: not plain
/// HTTP, not `ferry cluster` without credentials, not a certificate of another CA; nothing
/// they ask for happens. An administrator's certificate of the CA works.
fn api_refuses_strangers(s: &Scratch, agent: &Agent) {
    let (code, body) = {
        let c = std::net::TcpStream::connect(&agent.addr).unwrap();
        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
        exchange(c, "GET", "/cluster/vms", "")
    };
    assert_eq!((code, body.as_str()), (0, ""), "plain HTTP answered");
    let create = ["create", "x", "--memory", "64M", "--guest", GUEST];
    let mut plain = vec!["cluster", "--agent", &agent.addr];
    plain.extend_from_slice(&create);
    let out = ferry(&plain);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--tls-cert"), "{err}");
    let other = s.path("other-ca");
    let o = other.to_str().unwrap();
    cli_ok(&["certs", "init", "--dir", o]);
    cli_ok(&["certs", "issue", "admin", "--dir", o]);
    let (oc, ok, oca) = (
        format!("{o}/admin.pem"),
        format!("{o}/admin.key"),
        format!("{o}/ca.pem"),
    );
    let mut foreign = vec!["cluster", "--agent", &agent.addr];
    foreign.extend(["--tls-cert", &oc, "--tls-key", &ok, "--tls-ca", &oca]);
    foreign.extend_from_slice(&create);
    let out = ferry(&foreign);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a certificate of another CA was let in"
    );
    assert!(err.contains("TLS handshake"), "{err}");
    let log = std::fs::read_to_string(agent.run.with_extension("log")).unwrap();
    assert!(log.contains("cluster API: refused"), "{log}");
    // An administrator's certificate from the cluster's CA.
    let certs = s.path("certs");
    let d = certs.to_str().unwrap();
    cli_ok(&["certs", "issue", "admin", "--dir", d]);
    let (ac, ak, aca) = (
        format!("{d}/admin.pem"),
        format!("{d}/admin.key"),
        format!("{d}/ca.pem"),
    );
    let out = ferry(&[
        "cluster",
        "--agent",
        &agent.addr,
        "--tls-cert",
        &ac,
        "--tls-key",
        &ak,
        "--tls-ca",
        &aca,
        "vms",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, vms) = http(&agent.addr, "GET", "/cluster/vms", "");
    assert_eq!(vms, "[]", "a refused client's create happened");
}

#[test]
fn a_vm_moves_live_with_its_ownership_and_a_drain_takes_it_back() {
    let s = Scratch::new("cluster-move");
    // Over mutual TLS: one certificate for the hosts' address, from the cluster's CA.
    let certs = s.path("certs");
    let dir = certs.to_str().unwrap();
    cli_ok(&["certs", "init", "--dir", dir]);
    cli_ok(&["certs", "issue", "127.0.0.1", "--dir", dir]);
    let tls = [
        "--tls-cert",
        &format!("{dir}/127.0.0.1.pem"),
        "--tls-key",
        &format!("{dir}/127.0.0.1.key"),
        "--tls-ca",
        &format!("{dir}/ca.pem"),
    ]
    .map(str::to_string);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    http_tls(tls[1], tls[3], tls[5]);
    std::fs::create_dir_all(s.path("storage")).unwrap();
    let _etcd = etcd::Etcd::start(1);
    let h1 = Agent::start_with(&s, "h1", &etcd_url(&_etcd), &tls);
    let h2 = Agent::start_with(&s, "h2", &etcd_url(&_etcd), &tls);
    api_refuses_strangers(&s, &h1);
    create_a(&s, &h1);
    let hosts = [h1, h2];
    let (first, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&hosts[0].addr, "a")
    });
    let (x, y) = if first == "h1" { (0, 1) } else { (1, 0) };
    wait(
        "two passes on the first host",
        Duration::from_secs(30),
        || (last_pass(&hosts[x].console("a")) >= 2).then_some(()),
    );
    let img = s.path("storage/a.raw");
    // Live to the other host: the ownership moves at the switch-over, with a higher epoch
    // the disk has taken; the guest carries on where it was (no restart, no bad pass).
    let out = cli(&hosts[x], &["migrate", "a"]);
    assert!(out.contains("live in"), "{out}");
    assert!(out.contains("downtime"), "no migration report: {out}");
    let log = std::fs::read_to_string(hosts[y].run.join("a.log")).unwrap();
    assert!(log.contains("TLS 1.3"), "not over TLS: {log}");
    assert_eq!(hosts[x].metric("ferry_migrations_total"), Some(1));
    let before = last_pass(&hosts[x].console("a"));
    let (now, e2) = owner(&hosts[y].addr, "a").unwrap();
    assert_eq!(now, hosts[y].id);
    assert!(e2 > e1);
    assert_eq!(ferry_storage::fence::current_epoch(&img).unwrap(), e2);
    wait("passes on the new host", Duration::from_secs(30), || {
        (last_pass(&hosts[y].console("a")) >= before + 2).then_some(())
    });
    let there = hosts[y].console("a");
    assert!(
        first_pass(&there).unwrap() >= before,
        "the guest restarted instead of moving: {there}"
    );
    assert!(!there.contains("BAD"), "{there}");
    // Nothing moves to a draining host; a drain brings the VM back, live.
    let (code, body) = http(
        &hosts[x].addr,
        "POST",
        &format!("/cluster/hosts/{}/drain", hosts[y].id),
        "",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"downtime_ms\""), "{body}");
    let (back, e3) = owner(&hosts[x].addr, "a").unwrap();
    assert_eq!(back, hosts[x].id);
    assert!(e3 > e2);
    let listing = cli(&hosts[x], &["hosts"]);
    assert!(listing.contains("draining"), "{listing}");
    let (code, body) = http(
        &hosts[x].addr,
        "POST",
        "/cluster/vms/a/migrate",
        &format!("{{\"to\":\"{}\"}}", hosts[y].id),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("draining"), "{body}");
    cli(&hosts[x], &["undrain", &hosts[y].id]);
    let mark = last_pass(&hosts[x].console("a"));
    wait("passes after the moves", Duration::from_secs(30), || {
        (last_pass(&hosts[x].console("a")) >= mark + 2).then_some(())
    });
    let home = hosts[x].console("a");
    assert!(!home.contains("BAD"), "{home}");
    // Each host started the VM at most once: the moves were migrations, not restarts.
    let starts: u64 = hosts
        .iter()
        .map(|h| h.metric("ferry_agent_vm_starts_total").unwrap())
        .sum();
    assert_eq!(starts, 1);
}

#[test]
fn the_balancer_moves_one_vm_off_an_overloaded_host_and_then_stays_still() {
    let s = Scratch::new("cluster-balance");
    std::fs::create_dir_all(s.path("storage")).unwrap();
    let e = etcd::Etcd::start(1);
    let store = etcd_url(&e);
    // Two spinning guests (each a vCPU thread using c of a CPU: ~0.9 alone, less when the
    // machine is busy) on one 2-CPU host: a share of c. With high 0.5 and low 0.49 one moves
    // whenever 0.5 < c < 0.98 (the target then at c / 2); after it, moving the other could
    // not lower the worst share (both hosts at c / 2 against c), so nothing moves again,
    // whatever c is.
    let policy = [
        "--cpus",
        "2",
        "--balance-high",
        "0.5",
        "--balance-low",
        "0.49",
        "--balance-sustain",
        "3",
    ];
    let h1 = Agent::start_with(&s, "h1", &store, &policy);
    for vm in ["b1", "b2"] {
        cli(
            &h1,
            &[
                "create",
                vm,
                "--memory",
                "32M",
                "--guest",
                "heartbeat period=1000",
            ],
        );
    }
    wait("both VMs on h1", Duration::from_secs(20), || {
        let both = ["b1", "b2"]
            .iter()
            .all(|v| owner(&h1.addr, v).is_some_and(|(h, _)| h == "h1"));
        both.then_some(())
    });
    let h2 = Agent::start_with(&s, "h2", &store, &policy);
    let t0 = Instant::now();
    while h1.metric("ferry_agent_balance_moves_total").unwrap_or(0) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "no move: {}",
            cli(&h2, &["balance", "--dry-run"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "balancer moved a VM {:?} after the second host joined",
        t0.elapsed()
    );
    let spread = wait("the move done", Duration::from_secs(20), || {
        let o: Vec<_> = ["b1", "b2"].iter().map(|v| owner(&h1.addr, v)).collect();
        let hosts: Vec<_> = o.iter().flatten().map(|(h, _)| h.clone()).collect();
        (hosts.len() == 2 && hosts[0] != hosts[1]).then_some(o)
    });
    let out = cli(&h2, &["balance", "--dry-run"]);
    eprintln!("{out}");
    assert!(out.contains("leader h1"), "{out}");
    // Then still: no VM moves again.
    std::thread::sleep(Duration::from_secs(8));
    let now: Vec<_> = ["b1", "b2"].iter().map(|v| owner(&h1.addr, v)).collect();
    assert_eq!(now, spread, "a VM moved again");
    assert_eq!(h1.metric("ferry_agent_balance_moves_total"), Some(1));
    let out = cli(&h2, &["balance", "--dry-run"]);
    assert!(out.contains("nothing to move"), "{out}");
    drop(h2);
}

fn cli_ok(args: &[&str]) {
    let out = ferry(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_migration_longer_than_the_ttl_keeps_the_sources_fence_renewed() {
    let s = Scratch::new("cluster-long-move");
    std::fs::create_dir_all(s.path("storage")).unwrap();
    std::fs::File::create(s.path("storage/big.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = etcd::Etcd::start(1);
    let h1 = Agent::start(&s, "h1", &etcd_url(&e));
    cli(
        &h1,
        &[
            "create",
            "big",
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--disk",
            "path=big.raw",
            "--guest",
            "verify size=64M hb=1000; disk span=256K rate=256K",
        ],
    );
    let (_, e1) = wait("an owner", Duration::from_secs(20), || {
        owner(&h1.addr, "big")
    });
    let h2 = Agent::start(&s, "h2", &etcd_url(&e));
    wait(
        "the guest's region filled and checked",
        Duration::from_secs(20),
        || {
            h1.console("big")
                .lines()
                .any(|l| l.starts_with("V0 "))
                .then_some(())
        },
    );
    // 64 MiB and more at 16 MiB/s: several TTLs (2 s) of migration.
    let out = cli(&h1, &["migrate", "big", "--max-bandwidth", "16M"]);
    let (now, e2) = owner(&h1.addr, "big").unwrap();
    assert_eq!(now, "h2", "{out}");
    assert!(e2 > e1);
    let total: f64 = out
        .split("total ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no total in {out}"));
    assert!(
        total > 4000.0,
        "the migration took only {total} ms: not longer than the TTL"
    );
    wait("checks on h2", Duration::from_secs(20), || {
        h2.console("big")
            .lines()
            .any(|l| l.starts_with("V0 "))
            .then_some(())
    });
    wait("disk passes on h2", Duration::from_secs(20), || {
        h2.console("big").contains("K1 ").then_some(())
    });
    assert!(!h2.console("big").contains("BAD"), "{}", h2.console("big"));
}

#[test]
fn a_drain_moves_three_vms_live_and_every_guest_carries_on() {
    let s = Scratch::new("cluster-drain3");
    std::fs::create_dir_all(s.path("storage")).unwrap();
    let e = etcd::Etcd::start(1);
    let slack = ["--ttl", "4", "--grace", "1"]; // three busy guests on two cores
    let h1 = Agent::start_with(&s, "h1", &etcd_url(&e), &slack);
    let vms = ["d1", "d2", "d3"];
    for (i, vm) in vms.iter().enumerate() {
        std::fs::File::create(s.path(&format!("storage/{vm}.raw")))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let disk = format!("path={vm}.raw");
        let prio = i.to_string();
        cli(
            &h1,
            &[
                "create",
                vm,
                "--memory",
                "64M",
                "--disk",
                &disk,
                "--guest",
                GUEST,
                "--priority",
                &prio,
            ],
        );
    }
    let before: Vec<i64> = vms
        .iter()
        .map(|vm| {
            wait("h1 runs it", Duration::from_secs(30), || {
                owner(&h1.addr, vm)
                    .filter(|(h, _)| h == "h1")
                    .map(|(_, e)| e)
            })
        })
        .collect();
    for vm in vms {
        wait("a pass", Duration::from_secs(30), || {
            (last_pass(&h1.console(vm)) >= 1).then_some(())
        });
    }
    let h2 = Agent::start_with(&s, "h2", &etcd_url(&e), &slack);
    let out = cli(&h2, &["drain", "h1"]);
    assert!(out.contains("3 VM(s) moved, 0 not"), "{out}");
    // Highest priority first.
    let order: Vec<usize> = vms
        .iter()
        .map(|vm| out.find(&format!("VM {vm}:")).unwrap())
        .collect();
    assert!(order[2] < order[1] && order[1] < order[0], "{out}");
    for (vm, e1) in vms.iter().zip(before) {
        let (now, e2) = owner(&h2.addr, vm).unwrap();
        assert_eq!(now, "h2");
        assert!(e2 > e1);
        let left = last_pass(&h1.console(vm));
        wait("passes on h2", Duration::from_secs(30), || {
            (last_pass(&h2.console(vm)) > left).then_some(())
        });
        let there = h2.console(vm);
        assert!(
            first_pass(&there).unwrap() >= left,
            "{vm} restarted: {there}"
        );
        assert!(!there.contains("BAD"), "{vm}: {there}");
        assert_eq!(
            ferry_storage::fence::current_epoch(&s.path(&format!("storage/{vm}.raw"))).unwrap(),
            e2
        );
    }
    assert_eq!(h2.metric("ferry_agent_vm_starts_total"), Some(0));
}
