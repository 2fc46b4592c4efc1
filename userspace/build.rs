//! Builds the eBPF programs (crate `ebpf/`, for bpfel-unknown-none with nightly, build-std and
//! bpf-linker) so that the `logtap` binary embeds them: a release binary needs no toolchain on
//! the host. `cargo xtask setup` installs what this needs.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for watched in ["../ebpf/src", "../ebpf/Cargo.toml", "../ebpf/Cargo.lock", "../common/src", "../common/Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={watched}");
    }
    // One build shared by every profile of the host crates.
    let target_dir = manifest.join("../target/bpf");
    let mut cmd = Command::new("cargo");
    // The outer cargo's settings (target dir, rustc, wrappers, flags) are not for this build.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO") || key.starts_with("RUSTC") || key.starts_with("RUSTUP") || key == "RUSTFLAGS" {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(&ebpf)
        .args(["+nightly", "build", "--locked", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo for the eBPF programs: {e}"));
    if !status.success() {
        panic!(
            "building the eBPF programs failed ({status}); they need the nightly toolchain with rust-src \
             and bpf-linker: `cargo xtask setup` installs them"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/logtap");
    std::fs::copy(&object, out.join("logtap.bpf.o"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", object.display()));
}
