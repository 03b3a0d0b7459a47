//! Ferry's test guest: the image (built from `image/` by build.rs) and host-side helpers that
//! read what it prints and verify its memory. Line format: docs/test-guest.md.
pub mod console;
pub mod heartbeat;
pub mod net;
pub mod pattern;
pub mod tcp;
pub mod tools;
pub mod verify;

/// The test guest ELF image (multiboot header, 32-bit entry), built from source by build.rs.
pub const IMAGE: &[u8] = include_bytes!(env!("FERRY_GUEST_ELF"));

/// Path of the built image on the build machine (for tools such as QEMU that take a file).
pub const IMAGE_PATH: &str = env!("FERRY_GUEST_ELF");
