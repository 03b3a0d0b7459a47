//! Guest RAM filled on demand through userfaultfd, on real KVM with the test guest: every page
//! the guest touches for the first time reaches a fault thread, which installs it; the guest
//! runs its workload to the end and its memory checks out. This is what post-copy migration
//! stands on: a vCPU touching a page that has not arrived waits inside KVM_RUN until a
//! thread of the VMM puts it there.
mod common;
use common::*;
use ferry_guest::console::{wait_for, LineSink};
use ferry_guest::verify::verify_dirty_region;
use ferry_vmm::uffd::MissingPages;
use ferry_vmm::{BootSource, GuestExit, Vm, VmConfig};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn every_first_touch_is_served_by_the_fault_thread() {
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: 1,
        memory: 256 << 20,
        boot: BootSource::TestGuest {
            args: "dirty size=8M passes=2 hb=0".into(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    // The loader has written the image and boot structures; everything else is missing now.
    let pages = Arc::new(MissingPages::register(vm.memory()).expect("register RAM"));
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (pages, done) = (pages.clone(), done.clone());
        std::thread::spawn(move || {
            let mut served = HashSet::new();
            let mut marked = 0u64;
            while !done.load(Ordering::SeqCst) {
                let Some(gpa) = pages.next_fault(Duration::from_millis(20)).expect("fault") else {
                    continue;
                };
                // Every fourth page arrives with content (as a page from a source host would),
                // the others as zero pages; the guest overwrites both.
                let installed = if gpa / 4096 % 4 == 0 {
                    marked += 1;
                    pages.install(gpa, &[0xa5u8; 4096]).expect("install")
                } else {
                    pages.install_zero(gpa).expect("install zero")
                };
                assert!(installed || served.contains(&gpa));
                served.insert(gpa);
            }
            (served.len(), marked)
        })
    };
    vm.start().expect("start VM");
    let mut seen = Vec::new();
    wait_for(&rx, &mut seen, T, |l| l == "D0 2").expect("two passes over 8 MiB");
    assert_eq!(vm.wait(), GuestExit::PowerOff { code: 0 });
    done.store(true, Ordering::SeqCst);
    let (served, marked) = server.join().unwrap();
    // 8 MiB of data plus its status page, and whatever stack and tables the guest touched.
    assert!(served >= 2049, "{served} pages served on demand");
    assert!(marked > 0);
    let base = bases(&seen)[0];
    let p = verify_dirty_region(&reader(&vm), base).expect("memory exact");
    assert_eq!(p.pass, 2);
    drop(pages);
}
