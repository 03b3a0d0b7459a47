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
