//! QEMU's own tools as the oracle of host-side tests (Debian's qemu-utils; scripts/setup.sh
//! installs it).

/// Runs `qemu-img ARGS`; panics with its stderr unless it succeeded. Returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian qemu-utils; scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates the qcow2 overlay `top` on the qcow2 image `base` (a name relative to `top`'s
/// directory, as qcow2 stores it), with qemu-img.
pub fn qcow2_overlay(base: &str, top: &std::path::Path) {
    let top = top.to_str().expect("a UTF-8 path");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
    ]);
}

/// Data a test's host writes into a disk image at `off` before the guest starts (outside the
/// guest's span), to find it unchanged wherever the disk goes.
pub fn host_fill(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i) / 4096 % 251) as u8 + 1)
        .collect()
}
