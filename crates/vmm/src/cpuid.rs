//! CPUID for each vCPU: what KVM supports, with the topology fields set per vCPU.
use kvm_bindings::CpuId;

/// Patches KVM's supported CPUID for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((index as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            0xb | 0x1f => e.edx = index as u32,
            _ => {}
        }
    }
    c
}
