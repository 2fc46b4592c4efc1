//! Builds the eBPF programs (crate `ebpf/`, for bpfel-unknown-none with nightly, build-std and
//! bpf-linker) so that the `logtap` binary embeds them: a release binary needs no toolchain on
//! the host. `cargo xtask setup` installs what this needs.
//!
//! `LOGTAP_EBPF` says what to do: `require` (what `cargo xtask` sets) builds them or fails;
//! `skip` embeds none; unset builds them when the toolchain is there and otherwise embeds none
//! with a warning, so that `cargo check`, clippy and the pure tests need no BPF toolchain. A
//! binary without them says so when it starts, and reports the pipe source as unavailable.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("logtap.bpf.o");
    println!("cargo:rerun-if-env-changed=LOGTAP_EBPF");
    for watched in ["../ebpf/src", "../ebpf/Cargo.toml", "../ebpf/Cargo.lock", "../common/src", "../common/Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={watched}");
    }
    let mode = std::env::var("LOGTAP_EBPF").unwrap_or_default();
    let missing = missing_toolchain();
    match (mode.as_str(), missing) {
        ("skip", _) => return embed_none(&out, "LOGTAP_EBPF=skip"),
        ("require", Some(what)) => panic!(
            "the eBPF programs cannot be built: {what}; `cargo xtask setup` installs the nightly toolchain with \
             rust-src and bpf-linker"
        ),
        ("" | "require", None) => {}
        ("", Some(what)) => {
            println!("cargo:warning=eBPF programs not built ({what}): this logtap cannot capture pipes");
            return embed_none(&out, &what);
        }
        (other, _) => panic!("LOGTAP_EBPF={other:?}: use require, skip, or leave it unset"),
    }
    build(&manifest, &out);
}

/// What the eBPF build needs and this machine lacks.
fn missing_toolchain() -> Option<String> {
    let runs = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !runs(Command::new("bpf-linker").arg("--version")) {
        return Some("no bpf-linker".into());
    }
    if !runs(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        return Some("no nightly toolchain".into());
    }
    None
}

/// An empty object: the agent then reports the pipe source as unavailable, with why.
fn embed_none(out: &Path, why: &str) {
    std::fs::write(out, b"").unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    println!("cargo:rustc-env=LOGTAP_EBPF_MISSING={why}");
}

fn build(manifest: &Path, out: &Path) {
    let ebpf = manifest.join("../ebpf");
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
    std::fs::copy(&object, out).unwrap_or_else(|e| panic!("cannot copy {}: {e}", object.display()));
    println!("cargo:rustc-env=LOGTAP_EBPF_MISSING=");
}
