//! Saved state of one vCPU (version 1), and what this host's KVM can save.
//!
//! Optional pieces (XSAVE, XCRs, debug registers, vCPU events, TSC frequency) are saved when
//! KVM offers them; `Capabilities::lacking` names what it does not. Restoring state that this
//! host cannot load is an error, never a silent skip.
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Version of [`VcpuState`] this code writes and reads.
pub const VCPU_STATE_VERSION: u32 = 1;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub version: u32,
    pub index: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state (KVM_GET_XSAVE).
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: Option<kvm_vcpu_events>,
    /// Every MSR in KVM's save list that this vCPU could read, including IA32_TSC.
    pub msrs: Vec<kvm_msr_entry>,
    /// Guest TSC frequency, so guest time keeps its rate on another host.
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU state version {0} is not supported (this Ferry reads {VCPU_STATE_VERSION})")]
    Version(u32),
    #[error("the saved state has {0}, which this host's KVM cannot load")]
    Unsupported(&'static str),
    #[error("restoring MSR {index:#x} failed")]
    Msr { index: u32 },
    #[error("{0}")]
    Invalid(String),
}

fn kvm<T>(what: &str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Kvm {
        what: what.to_string(),
        source,
    })
}

/// Optional state this host's KVM can get and set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Capabilities {
    pub xsave: bool,
    pub xcrs: bool,
    pub debug_regs: bool,
    pub vcpu_events: bool,
    pub tsc_control: bool,
    pub nested_state: bool,
    /// MSR indices KVM lists as saveable.
    pub msr_list: Vec<u32>,
}

impl Capabilities {
    pub fn probe(k: &Kvm) -> Result<Self, StateError> {
        let msr_list = kvm("get MSR index list", k.get_msr_index_list())?
            .as_slice()
            .to_vec();
        Ok(Capabilities {
            xsave: k.check_extension(Cap::Xsave),
            xcrs: k.check_extension(Cap::Xcrs),
            debug_regs: k.check_extension(Cap::Debugregs),
            vcpu_events: k.check_extension(Cap::VcpuEvents),
            tsc_control: k.check_extension(Cap::TscControl),
            nested_state: k.check_extension(Cap::NestedState),
            msr_list,
        })
    }

    /// Optional state this host cannot save (reported, not hidden).
    pub fn lacking(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (have, what) in [
            (self.xsave, "XSAVE"),
            (self.xcrs, "XCRs"),
            (self.debug_regs, "debug registers"),
            (self.vcpu_events, "vCPU events"),
            (self.tsc_control, "TSC frequency control"),
            (self.nested_state, "nested virtualization state"),
        ] {
            if !have {
                v.push(what);
            }
        }
        v
    }
}

/// Reads every MSR in `list` that KVM lets this vCPU read; an MSR KVM lists but refuses is
/// left out (logged), as the list is a superset for the host CPU.
fn read_msrs(v: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(64)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let n = kvm("get MSRs", v.get_msrs(&mut msrs))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            tracing::debug!(
                "MSR {:#x} listed by KVM but not readable; not saved",
                chunk[n]
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Saves a (paused) vCPU.
pub fn save(v: &VcpuFd, index: u8, caps: &Capabilities) -> Result<VcpuState, StateError> {
    let cpuid = kvm("get CPUID", v.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        version: VCPU_STATE_VERSION,
        index,
        cpuid,
        regs: kvm("get regs", v.get_regs())?,
        sregs: kvm("get sregs", v.get_sregs())?,
        xsave: if caps.xsave {
            Some(kvm("get XSAVE", v.get_xsave())?)
        } else {
            None
        },
        xcrs: if caps.xcrs {
            Some(kvm("get XCRs", v.get_xcrs())?)
        } else {
            None
        },
        debug_regs: if caps.debug_regs {
            Some(kvm("get debug regs", v.get_debug_regs())?)
        } else {
            None
        },
        lapic: kvm("get LAPIC", v.get_lapic())?,
        mp_state: kvm("get MP state", v.get_mp_state())?,
        events: if caps.vcpu_events {
            Some(kvm("get vCPU events", v.get_vcpu_events())?)
        } else {
            None
        },
        msrs: read_msrs(v, &caps.msr_list)?,
        tsc_khz: v.get_tsc_khz().ok(),
    })
}

/// Loads saved state into a freshly created vCPU (order as KVM needs it: CPUID first, MSRs
/// after the LAPIC, events last).
pub fn restore(v: &VcpuFd, s: &VcpuState, caps: &Capabilities) -> Result<(), StateError> {
    if s.version != VCPU_STATE_VERSION {
        return Err(StateError::Version(s.version));
    }
    let need = |have: bool, saved: bool, what| {
        if saved && !have {
            Err(StateError::Unsupported(what))
        } else {
            Ok(())
        }
    };
    need(caps.xsave, s.xsave.is_some(), "XSAVE state")?;
    need(caps.xcrs, s.xcrs.is_some(), "XCRs")?;
    need(caps.debug_regs, s.debug_regs.is_some(), "debug registers")?;
    need(caps.vcpu_events, s.events.is_some(), "vCPU events")?;
    let cpuid =
        CpuId::from_entries(&s.cpuid).map_err(|e| StateError::Invalid(format!("CPUID: {e:?}")))?;
    kvm("set CPUID", v.set_cpuid2(&cpuid))?;
    if let Some(khz) = s.tsc_khz {
        let here = v.get_tsc_khz().ok();
        if here != Some(khz) {
            if !caps.tsc_control {
                return Err(StateError::Invalid(format!(
                    "the guest's TSC runs at {khz} kHz, this host's at {} kHz, and this host's \
                     KVM cannot scale it (no TSC frequency control)",
                    here.map(|k| k.to_string())
                        .unwrap_or_else(|| "unknown".into())
                )));
            }
            kvm("set TSC frequency", v.set_tsc_khz(khz))?;
        }
    }
    kvm("set MP state", v.set_mp_state(s.mp_state))?;
    kvm("set regs", v.set_regs(&s.regs))?;
    kvm("set sregs", v.set_sregs(&s.sregs))?;
    if let Some(x) = &s.xsave {
        // SAFETY: `x` is a complete kvm_xsave as returned by KVM_GET_XSAVE (legacy 4 KiB
        // layout, which KVM_SET_XSAVE reads in full).
        kvm("set XSAVE", unsafe { v.set_xsave(x) })?;
    }
    if let Some(x) = &s.xcrs {
        kvm("set XCRs", v.set_xcrs(x))?;
    }
    if let Some(d) = &s.debug_regs {
        kvm("set debug regs", v.set_debug_regs(d))?;
    }
    kvm("set LAPIC", v.set_lapic(&s.lapic))?;
    let msrs =
        Msrs::from_entries(&s.msrs).map_err(|e| StateError::Invalid(format!("MSRs: {e:?}")))?;
    let n = kvm("set MSRs", v.set_msrs(&msrs))?;
    if n < s.msrs.len() {
        return Err(StateError::Msr {
            index: s.msrs[n].index,
        });
    }
    if let Some(e) = &s.events {
        kvm("set vCPU events", v.set_vcpu_events(e))?;
    }
    Ok(())
}
