//! Builds the test guest image (crates/guest/image) with the host's rustc and `core`:
//! a static, non-PIE x86-64 ELF linked at 1 MiB by image/link.ld, with a multiboot header.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets this"));
    let image = manifest.join("image");
    for f in [
        "main.rs",
        "args.rs",
        "io.rs",
        "mem.rs",
        "work.rs",
        "rt.rs",
        "disk.rs",
        "virtio.rs",
        "net.rs",
        "boot.s",
        "link.ld",
    ] {
        println!("cargo:rerun-if-changed=image/{f}");
    }
    println!("cargo:rerun-if-changed=src/pattern.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let elf = out.join("ferry-guest.elf");
    let status = Command::new(rustc)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "ferry_guest",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "relocation-model=static", "-C", "target-cpu=x86-64"])
        .args(["-C", "code-model=small", "-C", "force-frame-pointers=no"])
        .args(["-C", "link-arg=-nostdlib", "-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .args([
            "-C",
            "link-arg=-Wl,--build-id=none",
            "-C",
            "link-arg=-Wl,--gc-sections",
        ])
        .args(["-C", "link-arg=-Wl,--strip-debug"])
        .args([
            "-C",
            "link-arg=-Wl,-z,max-page-size=0x1000",
            "-C",
            "link-arg=-Wl,-z,norelro",
        ])
        .arg("-C")
        .arg(format!(
            "link-arg=-Wl,-T,{}",
            image.join("link.ld").display()
        ))
        .arg(image.join("main.rs"))
        .arg("-o")
        .arg(&elf)
        .status()
        .expect("run rustc for the test guest");
    assert!(status.success(), "building the test guest image failed");
    println!("cargo:rustc-env=FERRY_GUEST_ELF={}", elf.display());
}
