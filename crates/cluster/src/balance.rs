//! The balancing policy (issue #13 item 6), pure: given each host's capacity and load and
//! each VM's load, decide at most one live migration per round, and where a new VM goes.
//!
//! Hysteresis, so nothing ping-pongs:
//! - **Two thresholds** (a dead band): a host is *overloaded* above `high` (CPU use over its
//!   CPU capacity); a move may only land where the target stays at or under `low` after it,
//!   so a target never becomes the next source.
//! - **Sustained**: a host must stay overloaded for `sustain` before anything leaves it; the
//!   clock restarts after each move from it.
//! - **One move per round**, the one that leaves the lowest maximum of source and target
//!   load (and it must lower the source's load below what it was).
//! - **Back-off**: a VM that moved, or failed to move, is left alone for `backoff`.
//!
//! Anchors: DRS's cost-benefit (a move must reduce the imbalance), oVirt's evenly-distributed
//! policy (high/low thresholds, over a duration), the KubeVirt descheduler (one eviction at a
//! time, a back-off).
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Overloaded above this share of the host's CPUs.
    pub high: f64,
    /// A target must stay at or under this share after the move.
    pub low: f64,
    pub sustain: Duration,
    pub backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            high: 0.80,
            low: 0.60,
            sustain: Duration::from_secs(30),
            backoff: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostLoad {
    pub id: String,
    /// CPU capacity, in CPUs.
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Nothing is placed on it (draining, or drained).
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VmLoad {
    pub name: String,
    pub host: String,
    /// CPUs in use (vCPU threads' CPU time over the sample).
    pub cpu: f64,
    pub memory_bytes: u64,
}

/// What a round decided, and why (what `ferry cluster balance --dry-run` prints).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum Decision {
    Move {
        vm: String,
        from: String,
        to: String,
        why: String,
    },
    Stay {
        why: String,
    },
}

struct Use {
    cpu: f64,
    mem: u64,
}

fn usage(hosts: &[HostLoad], vms: &[VmLoad]) -> HashMap<String, Use> {
    let mut u: HashMap<String, Use> = hosts
        .iter()
        .map(|h| (h.id.clone(), Use { cpu: 0.0, mem: 0 }))
        .collect();
    for v in vms {
        if let Some(x) = u.get_mut(&v.host) {
            x.cpu += v.cpu;
            x.mem += v.memory_bytes;
        }
    }
    u
}

fn share(cpu: f64, h: &HostLoad) -> f64 {
    if h.cpus > 0.0 {
        cpu / h.cpus
    } else {
        f64::INFINITY
    }
}

/// Where a new VM of `memory_bytes` goes: the host (not draining) with the lowest CPU share
/// that has the memory (of equal shares, the one with the least memory given out, so idle
/// VMs spread); None when none fits.
pub fn place(hosts: &[HostLoad], vms: &[VmLoad], memory_bytes: u64) -> Option<String> {
    let u = usage(hosts, vms);
    hosts
        .iter()
        .filter(|h| !h.draining)
        .filter(|h| u[&h.id].mem + memory_bytes <= h.memory_bytes)
        .min_by(|a, b| {
            share(u[&a.id].cpu, a)
                .total_cmp(&share(u[&b.id].cpu, b))
                .then(u[&a.id].mem.cmp(&u[&b.id].mem))
                .then(a.id.cmp(&b.id))
        })
        .map(|h| h.id.clone())
}

/// The balancer's memory between rounds: since when each host is overloaded, and the VMs
/// in back-off.
#[derive(Debug, Default)]
pub struct Balancer {
    pub policy: Policy,
    over_since: HashMap<String, Instant>,
    backoff: HashMap<String, Instant>,
}

impl Balancer {
    pub fn new(policy: Policy) -> Balancer {
        Balancer {
            policy,
            ..Default::default()
        }
    }

    /// Records that `vm` moved (or failed to) at `now` from `from`: it is left alone for the
    /// back-off, and `from` must be overloaded for a whole `sustain` again.
    pub fn moved(&mut self, vm: &str, from: &str, now: Instant) {
        self.backoff.insert(vm.into(), now);
        self.over_since.insert(from.into(), now);
    }

    /// One round at `now`.
    pub fn round(&mut self, now: Instant, hosts: &[HostLoad], vms: &[VmLoad]) -> Decision {
        let p = self.policy;
        let u = usage(hosts, vms);
        self.backoff
            .retain(|_, t| now.duration_since(*t) < p.backoff);
        let mut over: Vec<(&HostLoad, f64)> = Vec::new();
        for h in hosts {
            let s = share(u[&h.id].cpu, h);
            if s > p.high {
                let since = *self.over_since.entry(h.id.clone()).or_insert(now);
                if now.duration_since(since) >= p.sustain {
                    over.push((h, s));
                }
            } else {
                self.over_since.remove(&h.id);
            }
        }
        self.over_since
            .retain(|id, _| hosts.iter().any(|h| &h.id == id));
        if over.is_empty() {
            let pending = self.over_since.len();
            return Decision::Stay {
                why: if pending > 0 {
                    format!(
                        "{pending} host(s) over {:.0} % but not yet for {:?}",
                        p.high * 100.0,
                        p.sustain
                    )
                } else {
                    format!("no host over {:.0} % of its CPUs", p.high * 100.0)
                },
            };
        }
        over.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.id.cmp(&b.0.id)));
        let mut best: Option<(f64, Decision)> = None;
        for (src, before) in &over {
            for v in vms.iter().filter(|v| v.host == src.id) {
                if self.backoff.contains_key(&v.name) {
                    continue;
                }
                let src_after = share(u[&src.id].cpu - v.cpu, src);
                for t in hosts.iter().filter(|t| t.id != src.id && !t.draining) {
                    let tu = &u[&t.id];
                    if tu.mem + v.memory_bytes > t.memory_bytes {
                        continue;
                    }
                    let t_after = share(tu.cpu + v.cpu, t);
                    if t_after > p.low {
                        continue;
                    }
                    let worst = src_after.max(t_after);
                    if worst >= *before {
                        continue; // no benefit
                    }
                    if best.as_ref().is_none_or(|(w, _)| worst < *w) {
                        best = Some((
                            worst,
                            Decision::Move {
                                vm: v.name.clone(),
                                from: src.id.clone(),
                                to: t.id.clone(),
                                why: format!(
                                    "{} at {:.0} % of its CPUs (over {:.0} % for {:?}); {} uses \
                                     {:.2} CPUs; {} goes to {:.0} %, {} to {:.0} %",
                                    src.id,
                                    before * 100.0,
                                    p.high * 100.0,
                                    p.sustain,
                                    v.name,
                                    v.cpu,
                                    src.id,
                                    src_after * 100.0,
                                    t.id,
                                    t_after * 100.0
                                ),
                            },
                        ));
                    }
                }
            }
        }
        match best {
            Some((_, d)) => d,
            None => Decision::Stay {
                why: format!(
                    "{} overloaded, but no VM fits elsewhere under {:.0} % (or all are in \
                     back-off)",
                    over[0].0.id,
                    p.low * 100.0
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn host(id: &str, cpus: f64) -> HostLoad {
        HostLoad {
            id: id.into(),
            cpus,
            memory_bytes: 16 * G,
            draining: false,
        }
    }

    fn vm(name: &str, host: &str, cpu: f64) -> VmLoad {
        VmLoad {
            name: name.into(),
            host: host.into(),
            cpu,
            memory_bytes: G,
        }
    }

    fn policy() -> Policy {
        Policy {
            high: 0.8,
            low: 0.6,
            sustain: Duration::from_secs(10),
            backoff: Duration::from_secs(60),
        }
    }

    fn apply(vms: &mut [VmLoad], d: &Decision) {
        if let Decision::Move { vm, to, .. } = d {
            vms.iter_mut().find(|v| &v.name == vm).unwrap().host = to.clone();
        }
    }

    #[test]
    fn a_sustained_overload_moves_one_vm_and_then_everything_stays_still() {
        let hosts = [host("a", 2.0), host("b", 2.0), host("c", 2.0)];
        let mut vms = vec![vm("v1", "a", 1.0), vm("v2", "a", 0.9), vm("v3", "b", 0.2)];
        let mut b = Balancer::new(policy());
        let t0 = Instant::now();
        // Overloaded (95 %) but not yet for 10 s.
        assert!(matches!(b.round(t0, &hosts, &vms), Decision::Stay { .. }));
        let d = b.round(t0 + Duration::from_secs(5), &hosts, &vms);
        assert!(
            matches!(d, Decision::Stay { ref why } if why.contains("not yet")),
            "{d:?}"
        );
        let d = b.round(t0 + Duration::from_secs(11), &hosts, &vms);
        match &d {
            Decision::Move { from, to, .. } => assert_eq!((from.as_str(), to.as_str()), ("a", "c")),
            _ => panic!("{d:?}"),
        }
        apply(&mut vms, &d);
        if let Decision::Move { vm, from, .. } = &d {
            b.moved(vm, from, t0 + Duration::from_secs(11));
        }
        // a at 45 %, b at 10 %, c at 50 %: in the dead band; stays still round after round.
        for s in 12..200 {
            let d = b.round(t0 + Duration::from_secs(s), &hosts, &vms);
            assert!(matches!(d, Decision::Stay { .. }), "round {s}: {d:?}");
        }
    }

    #[test]
    fn a_short_spike_moves_nothing() {
        let hosts = [host("a", 2.0), host("b", 2.0)];
        let busy = [vm("v1", "a", 1.9)];
        let idle = [vm("v1", "a", 0.5)];
        let mut b = Balancer::new(policy());
        let t0 = Instant::now();
        for s in 0..100u64 {
            // Busy 9 s, idle 1 s: never 10 s over the threshold in a row.
            let vms = if s % 10 == 9 { &idle } else { &busy };
            let d = b.round(t0 + Duration::from_secs(s), &hosts, vms);
            assert!(matches!(d, Decision::Stay { .. }), "second {s}: {d:?}");
        }
    }

    #[test]
    fn no_target_is_pushed_past_the_low_threshold_and_no_move_without_benefit() {
        // One VM using nearly the whole host: wherever it goes, that host is overloaded.
        let hosts = [host("a", 2.0), host("b", 2.0)];
        let vms = [vm("big", "a", 1.9)];
        let mut b = Balancer::new(policy());
        let t0 = Instant::now();
        b.round(t0, &hosts, &vms);
        let d = b.round(t0 + Duration::from_secs(20), &hosts, &vms);
        assert!(
            matches!(d, Decision::Stay { ref why } if why.contains("no VM fits")),
            "{d:?}"
        );
    }

    #[test]
    fn draining_hosts_full_memory_and_backed_off_vms_are_not_used() {
        let mut hosts = vec![host("a", 2.0), host("b", 2.0), host("c", 2.0)];
        hosts[1].draining = true;
        hosts[2].memory_bytes = G / 2; // nothing fits
        let vms = [vm("v1", "a", 1.0), vm("v2", "a", 0.8)];
        let mut b = Balancer::new(policy());
        let t0 = Instant::now();
        b.round(t0, &hosts, &vms);
        let d = b.round(t0 + Duration::from_secs(20), &hosts, &vms);
        assert!(matches!(d, Decision::Stay { .. }), "{d:?}");
        // With room on c, the move happens; the moved VM then backs off.
        hosts[2].memory_bytes = 16 * G;
        let d = b.round(t0 + Duration::from_secs(21), &hosts, &vms);
        let Decision::Move { vm: moved, .. } = &d else {
            panic!("{d:?}")
        };
        b.moved(moved, "a", t0 + Duration::from_secs(21));
        // Suppose it failed (still on a): neither it nor a are touched during the back-off
        // of the one and the sustain of the other.
        let d = b.round(t0 + Duration::from_secs(25), &hosts, &vms);
        assert!(matches!(d, Decision::Stay { .. }), "{d:?}");
        let d = b.round(t0 + Duration::from_secs(32), &hosts, &vms);
        match &d {
            Decision::Move { vm, .. } => assert_ne!(vm, moved, "a VM in back-off moved"),
            _ => panic!("the other VM may move: {d:?}"),
        }
    }

    #[test]
    fn placement_takes_the_least_loaded_host_that_has_the_memory() {
        let mut hosts = vec![host("a", 2.0), host("b", 4.0), host("c", 2.0)];
        let vms = [vm("v1", "a", 1.0), vm("v2", "b", 1.0), vm("v3", "c", 0.1)];
        assert_eq!(place(&hosts, &vms, G).as_deref(), Some("c"));
        hosts[2].draining = true;
        assert_eq!(place(&hosts, &vms, G).as_deref(), Some("b"));
        assert_eq!(place(&hosts, &vms, 64 * G), None);
    }
}
