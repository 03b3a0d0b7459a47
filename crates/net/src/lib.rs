//! Ferry's networking, without KVM (docs/network.md): [`overlay`], a host's VXLAN forwarding
//! from the CA→PA map, and [`wire`], the delaying wire
//! between two interfaces that gives the test topology's WAN link a round-trip time
//! (`scripts/netlab.sh`; this kernel has no netem).
pub mod overlay;
pub mod wire;
