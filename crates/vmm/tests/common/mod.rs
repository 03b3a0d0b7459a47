//! Helpers shared by the KVM test binaries.
#![allow(dead_code)]
pub mod disk;
use ferry_guest::console::{LineSink, TimedLine};
use ferry_guest::heartbeat::{parse_line, GuestLine};
use ferry_vmm::{BootSource, Vm, VmConfig};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

/// Safety-net bound for waiting on guest output.
pub const T: Duration = Duration::from_secs(60);

/// Boots the test guest with `args` and starts it; its console arrives on the receiver.
pub fn boot(cpus: u8, memory: u64, args: &str) -> (Vm, Receiver<TimedLine>) {
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus,
        memory,
        boot: BootSource::TestGuest { args: args.into() },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    vm.start().expect("start VM");
    (vm, rx)
}

/// Reads guest memory, for the verifier.
pub fn reader(vm: &Vm) -> impl Fn(u64, &mut [u8]) -> Result<(), String> + '_ {
    |gpa, buf| {
        vm.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }
}

/// Region bases from the guest's `S<c>` lines, in the order they were printed.
pub fn bases(seen: &[TimedLine]) -> Vec<u64> {
    seen.iter()
        .filter_map(|l| match parse_line(&l.1) {
            GuestLine::Start { base: Some(b), .. } => Some(b),
            _ => None,
        })
        .collect()
}

/// Highest heartbeat number vCPU `cpu` printed.
pub fn last_beat(seen: &[TimedLine], cpu: u32) -> u64 {
    seen.iter()
        .filter_map(|l| match parse_line(&l.1) {
            GuestLine::Heartbeat { cpu: c, seq, .. } if c == cpu => Some(seq),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// A scratch directory removed on drop.
pub struct Dir(pub PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch(tag: &str) -> Dir {
    let p = std::env::temp_dir().join(format!("ferry-vmm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("scratch dir");
    Dir(p)
}

/// Starts `vm` (restored from a VM whose vCPU 0 last printed heartbeat `last`), checks the
/// next heartbeat is `last + 1` and that 20 more follow, then stops it.
pub fn assert_heartbeat_continues(vm: &Vm, rx: &Receiver<TimedLine>, last: u64) {
    use ferry_guest::console::wait_for;
    vm.start().expect("start restored VM");
    let mut after = Vec::new();
    let first = wait_for(rx, &mut after, T, |l| l.starts_with("H0 ")).expect("a heartbeat");
    assert!(
        first.1.starts_with(&format!("H0 {} ", last + 1)),
        "{} after {last}",
        first.1
    );
    let want = format!("H0 {} ", last + 20);
    wait_for(rx, &mut after, T, |l| l.starts_with(&want)).expect("heartbeats go on");
    vm.shutdown().expect("shutdown");
    assert_eq!(vm.wait(), ferry_vmm::GuestExit::Stopped);
}
pub mod live;
