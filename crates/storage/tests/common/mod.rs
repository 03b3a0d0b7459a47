//! What the storage tests share: running QEMU's own tools (Debian's qemu-utils, installed by
//! scripts/setup.sh) as the oracle.
#![allow(dead_code)] // each test binary uses its own part
use std::path::Path;
use std::process::Command;

/// Runs `cmd` (qemu-img, qemu-io), asserts it succeeded, returns its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (Debian qemu-utils; scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
