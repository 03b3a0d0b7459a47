//! Ferry's networking, without KVM (docs/network.md). For now: [`wire`], the delaying wire
//! between two interfaces that gives the test topology's WAN link a round-trip time
//! (`scripts/netlab.sh`; this kernel has no netem).
pub mod wire;
