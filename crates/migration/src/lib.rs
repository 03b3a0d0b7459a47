//! ferry-migration: the live-migration wire protocol and the pre-copy engine. It knows nothing
//! of KVM: it drives a VM through the [`engine::SourceVm`] and [`engine::DestinationVm`]
//! traits, so its logic is tested against an in-memory fake VM (tests/fake_vm.rs) and, through
//! ferry-vmm, end to end on real KVM.
pub mod certs;
pub mod disk_wire;
pub mod engine;
#[doc(hidden)]
pub mod fuzz;
pub mod pages;
pub mod protocol;
pub mod seed;
pub mod tls;
pub mod transport;
