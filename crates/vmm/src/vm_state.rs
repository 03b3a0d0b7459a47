//! Saved state of the VM-wide KVM devices (version 1): PIC ×2, IOAPIC, PIT, kvmclock.
use crate::vcpu_state::StateError;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Version of [`KvmVmState`].
pub const KVM_VM_STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub struct KvmVmState {
    pub version: u32,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn kvm<T>(what: &str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Kvm {
        what: what.to_string(),
        source,
    })
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    kvm("get irqchip", vm.get_irqchip(&mut c))?;
    Ok(c)
}

pub fn save(vm: &VmFd) -> Result<KvmVmState, StateError> {
    Ok(KvmVmState {
        version: KVM_VM_STATE_VERSION,
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: kvm("get PIT", vm.get_pit2())?,
        clock: kvm("get clock", vm.get_clock())?,
    })
}

pub fn restore(vm: &VmFd, s: &KvmVmState) -> Result<(), StateError> {
    if s.version != KVM_VM_STATE_VERSION {
        return Err(StateError::Invalid(format!(
            "VM state version {} is not supported",
            s.version
        )));
    }
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        kvm("set irqchip", vm.set_irqchip(c))?;
    }
    kvm("set PIT", vm.set_pit2(&s.pit))?;
    let mut clock = s.clock;
    clock.flags &= !KVM_CLOCK_TSC_STABLE; // KVM_SET_CLOCK rejects flags it sets itself
    kvm("set clock", vm.set_clock(&clock))?;
    Ok(())
}
