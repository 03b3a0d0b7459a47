//! ferry-vmm: a virtual machine on KVM — guest memory, vCPU threads, devices, boot loaders,
//! pause/resume and dirty-page tracking.
pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod disk_move;
mod lazy;
pub mod live;
pub mod live_snapshot;
mod live_storage;
pub mod memory;
pub mod seed;
pub mod snapshot;
pub mod uffd;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;

pub use memory::{parse_size, DirtyBitmap, GuestMem, RamRange};
pub use vcpu::GuestExit;
pub use vm::{BootSource, Incoming, RunState, Vm, VmConfig, VmError, VmInfo, VmState, MAX_CPUS};

/// Ferry's test guest image (multiboot ELF), embedded at build time.
pub const TEST_GUEST_IMAGE: &[u8] = ferry_guest::IMAGE;
