//! Saving and restoring a whole VM in-process on real KVM: the guest continues exactly where
//! it was (heartbeat numbering, dirty pattern), including with several vCPUs.
mod common;
use common::*;
use ferry_guest::console::{wait_all, wait_for, LineSink, TimedLine};
use ferry_guest::heartbeat::{parse_line, GuestLine};
use ferry_guest::verify::verify_dirty_region;
use ferry_vmm::{Vm, VmError};
use std::sync::mpsc::Receiver;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Clones a paused VM into a new one through its state and a copy of its RAM.
fn clone_vm(vm: &Vm) -> (Vm, Receiver<TimedLine>) {
    let state = vm.save_state().expect("save state");
    let (sink, rx) = LineSink::new();
    let copy = Vm::restore(&state, Box::new(sink), |mem| {
        for (src, dst) in vm.memory().iter().zip(mem.iter()) {
            let mut buf = vec![0u8; 1 << 20];
            let len = src.len();
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                let at = GuestAddress(src.start_addr().0 + off);
                vm.memory().read_slice(&mut buf[..n], at).unwrap();
                if buf[..n].iter().any(|&b| b != 0) {
                    mem.write_slice(&buf[..n], GuestAddress(dst.start_addr().0 + off))
                        .unwrap();
                }
                off += n as u64;
            }
        }
        Ok::<(), VmError>(())
    })
    .expect("restore");
    (copy, rx)
}

#[test]
fn restored_vm_continues_the_heartbeat_with_the_next_number() {
    let (vm, rx) = boot(1, 128 << 20, "heartbeat period=1000");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l.starts_with("H0 30 ")).unwrap();
    vm.pause().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    seen.extend(rx.try_iter());
    let last = last_beat(&seen, 0);
    let (copy, rx2) = clone_vm(&vm);
    vm.shutdown().unwrap();
    vm.wait();
    assert_heartbeat_continues(&copy, &rx2, last);
}

#[test]
fn restored_four_vcpu_vm_keeps_every_dirty_region_exact() {
    let (vm, rx) = boot(4, 512 << 20, "dirty size=8M hb=2000");
    let mut seen = Vec::new();
    let want: Vec<String> = (0..4).map(|c| format!("D{c} 1")).collect();
    wait_all(&rx, &mut seen, T, &want).unwrap();
    vm.pause().unwrap();
    let bases: Vec<u64> = seen
        .iter()
        .filter_map(|l| match parse_line(&l.1) {
            GuestLine::Start { base: Some(b), .. } => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(bases.len(), 4);
    let (copy, rx2) = clone_vm(&vm);
    vm.shutdown().unwrap();
    vm.wait();
    let read = |gpa: u64, buf: &mut [u8]| {
        copy.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    };
    let before: Vec<_> = bases
        .iter()
        .map(|&b| verify_dirty_region(&read, b).unwrap())
        .collect();
    copy.start().unwrap();
    let mut after = Vec::new();
    let want: Vec<String> = before
        .iter()
        .map(|p0| format!("D{} {}", p0.cpu, p0.completed + 2))
        .collect();
    wait_all(&rx2, &mut after, T, &want).unwrap();
    copy.pause().unwrap();
    for (b, p0) in bases.iter().zip(&before) {
        let p = verify_dirty_region(&read, *b).unwrap();
        assert!(p.completed >= p0.completed + 2);
    }
    copy.shutdown().unwrap();
    copy.wait();
}

#[test]
fn state_can_only_be_saved_while_stopped() {
    let (vm, _rx) = boot(1, 64 << 20, "idle");
    assert!(vm.save_state().is_err());
    vm.pause().unwrap();
    let s = vm.save_state().unwrap();
    assert_eq!(s.vcpus.len(), 1);
    assert!(!s.vcpus[0].msrs.is_empty());
    assert!(
        s.vcpus[0].msrs.iter().any(|m| m.index == 0x10),
        "IA32_TSC saved"
    );
    vm.shutdown().unwrap();
    vm.wait();
}
