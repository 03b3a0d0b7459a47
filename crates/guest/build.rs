//! Builds the test guest image (crates/guest/image, its own cargo package and workspace) with
//! a nested `cargo build`: a static, non-PIE x86-64 ELF linked at 1 MiB by image/link.ld,
//! with a multiboot header. It is `no_std` and uses `core` plus smoltcp (the TCP workload).
use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets this"));
    let image = manifest.join("image");
    for f in std::fs::read_dir(&image)
        .expect("read crates/guest/image")
        .flatten()
    {
        println!("cargo:rerun-if-changed={}", f.path().display());
    }
    println!("cargo:rerun-if-changed=src/pattern.rs");
    let link = image.join("link.ld");
    let flags = [
        "-C relocation-model=static",
        "-C target-cpu=x86-64",
        "-C code-model=small",
        "-C force-frame-pointers=no",
        "-C link-arg=-nostdlib",
        "-C link-arg=-nostartfiles",
        "-C link-arg=-static",
        "-C link-arg=-no-pie",
        "-C link-arg=-Wl,--build-id=none",
        "-C link-arg=-Wl,--gc-sections",
        "-C link-arg=-Wl,--strip-debug",
        "-C link-arg=-Wl,-z,max-page-size=0x1000",
        "-C link-arg=-Wl,-z,norelro",
    ];
    let mut rustflags: Vec<String> = flags
        .iter()
        .flat_map(|f| f.split(' '))
        .map(String::from)
        .collect();
    rustflags.push("-C".into());
    rustflags.push(format!("link-arg=-Wl,-T,{}", link.display()));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("image-target");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--manifest-path")
        .arg(image.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    // What the outer build set for itself must not leak into the image's build (clippy's
    // driver and its -D warnings, a target dir, a build target, coverage or sanitizer flags).
    for v in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(v);
    }
    let status = cmd.status().expect("run cargo for the test guest");
    assert!(status.success(), "building the test guest image failed");
    let elf = target_dir.join(TARGET).join("release").join("ferry-guest");
    println!("cargo:rustc-env=FERRY_GUEST_ELF={}", elf.display());
}
