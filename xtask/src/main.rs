//! `cargo xtask run | test | bench`: everything a fresh machine needs, installed idempotently
//! and said out loud, then the job itself.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

const USAGE: &str = "usage: cargo xtask <command>

  run [-- DAEMON ARGS]   build logtap (release) and run the agent; with no --config it uses
                         /etc/logtap/logtap.toml if present, else the built-in defaults
  test                   set up (and install the Kafka-protocol broker tansu once), then fmt check,
                         clippy, and every test (real FUSE mounts, eBPF, a real broker; as root)
  bench [-- BENCH ARGS]  build release and run the side-by-side benchmarks
  setup                  install what the other commands need, and nothing else";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("setup") => setup(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn say(what: &str) {
    eprintln!("xtask: {what}");
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    say(&format!("running {cmd:?}"));
    let status = cmd.current_dir(root()).status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// cargo, with the eBPF programs required: a build here never silently leaves them out.
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("LOGTAP_EBPF", "require");
    cmd
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Debian packages the tests and the agent use, installed only when missing.
fn apt_install(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().filter(|(_, program)| !have(program)).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing {missing:?} and no apt-get to install them");
    }
    say(&format!("installing {missing:?} with apt-get"));
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A Python package from PyPI the tests use (cryptography: an independent reader of sealed
/// records), installed only when `python3` cannot import it.
fn python_module(module: &str) -> anyhow::Result<()> {
    let import = || Command::new("python3").args(["-c", &format!("import {module}")]).status();
    if import().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    say(&format!("installing the Python package {module} from PyPI"));
    let plain = Command::new("python3").args(["-m", "pip", "install", "-q", module]).status();
    // A distribution's own Python refuses pip (PEP 668) unless told.
    if !plain.is_ok_and(|s| s.success()) {
        sh(Command::new("python3").args(["-m", "pip", "install", "-q", "--break-system-packages", module]))?;
    }
    Ok(())
}

fn rustup_components(components: &[&str]) -> anyhow::Result<()> {
    let installed = Command::new("rustup").args(["component", "list", "--installed"]).output();
    let installed = installed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for c in components {
        if !installed.lines().any(|l| l.starts_with(c)) {
            say(&format!("adding rustup component {c}"));
            sh(Command::new("rustup").args(["component", "add", c]))?;
        }
    }
    Ok(())
}

/// The eBPF build: the nightly toolchain with rust-src (build-std) and bpf-linker.
fn ebpf_toolchain() -> anyhow::Result<()> {
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "--version"]).output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        say("installing the nightly toolchain (the eBPF programs need build-std)");
        sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed =
        Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]).output();
    if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src"))) {
        say("adding rust-src to the nightly toolchain");
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !have("bpf-linker") {
        // 0.9.13 loads the LLVM of the rustc that drives it, so it follows the nightly.
        say("installing bpf-linker (a few minutes, once)");
        sh(cargo().args(["install", "bpf-linker", "--version", "0.9.13", "--locked"]))?;
    }
    Ok(())
}

const TANSU_VERSION: &str = "0.6.0";

fn cargo_bin(program: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(program)
}

/// The Kafka-protocol broker the tests and benchmarks run against: tansu, built from
/// crates.io once (15-30 minutes on two cores) and reused.
fn broker() -> anyhow::Result<()> {
    let tansu = cargo_bin("tansu");
    let version = Command::new(&tansu).arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(TANSU_VERSION)) {
        return Ok(());
    }
    say(&format!("installing the Kafka-protocol broker tansu {TANSU_VERSION} (15-30 minutes, once)"));
    sh(cargo().args(["install", "tansu", "--version", TANSU_VERSION, "--locked", "--features", "dynostore"]))
        .context("the tests need a Kafka-protocol broker and tansu did not install")
}

fn setup() -> anyhow::Result<()> {
    if !is_root() {
        bail!("logtap mounts FUSE filesystems: run as root");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: this machine cannot mount FUSE filesystems");
    }
    // python3: the rotating-logger test; dd, truncate: coreutils; podman (with runc, the
    // runtime that works with this kind of machine's cgroups) and busybox-static: the container
    // tests and benchmarks; nginx and wrk: a real web server logging to /dev/stdout in a
    // container, under load; logrotate: rotations of volume files under a fast writer.
    apt_install(&[
        ("python3", "python3"),
        ("coreutils", "truncate"),
        ("podman", "podman"),
        ("runc", "runc"),
        ("busybox-static", "busybox"),
        ("tar", "tar"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("logrotate", "logrotate"),
    ])?;
    python_module("cryptography")?;
    rustup_components(&["rustfmt", "clippy"])?;
    ebpf_toolchain()?;
    say("setup done");
    Ok(())
}

fn run(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    sh(cargo().args(["build", "--release", "-p", "logtap"]))?;
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let mut cmd = Command::new(root().join("target/release/logtap"));
    cmd.arg("daemon").args(args);
    say("starting the agent (Ctrl-C or SIGTERM drains and stops it)");
    sh(&mut cmd)
}

fn test() -> anyhow::Result<()> {
    setup()?;
    broker()?;
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    sh(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    sh(cargo().args(["build", "-p", "logtap"]))?;
    let bin = root().join("target/debug/logtap");
    // The privileged end-to-end tests are marked ignored so that `cargo test` as any user runs
    // the pure tiers and names what it skipped; here, as root, they run too.
    sh(cargo()
        .args(["test", "--workspace", "--", "--include-ignored"])
        .env("LOGTAP_BIN", bin)
        .env("LOGTAP_TANSU", cargo_bin("tansu")))
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    broker()?;
    sh(cargo().args(["build", "--release", "-p", "logtap", "-p", "logtap-e2e", "--bins"]))?;
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    sh(Command::new(root().join("target/release/logtap-bench"))
        .args(args)
        .env("LOGTAP_BIN", root().join("target/release/logtap"))
        .env("LOGTAP_TANSU", cargo_bin("tansu")))
}
