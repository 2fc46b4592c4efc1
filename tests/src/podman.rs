//! Real containers for the tests: podman (with runc) and its Docker-compatible API service on a
//! socket of the test's own, running a busybox image made from Debian's busybox-static.
//!
//! `cargo xtask setup` installs podman, runc and busybox-static. A missing one fails the test
//! and says so; it is never skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The image every test container runs: busybox as `/bin/sh` and its applets (the tag changes
/// when the applets do: an image made by an older test stays as it was).
pub const IMAGE: &str = "localhost/logtap-busybox:2";

fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

pub fn require_podman() {
    for p in ["podman", "runc", "busybox"] {
        assert!(have(p), "{p} is missing: `cargo xtask setup` installs podman, runc and busybox-static");
    }
}

pub struct Podman {
    dir: tempfile::TempDir,
    /// The API service's socket (the agent's `discovery.docker_socket`).
    pub socket: PathBuf,
    conf: PathBuf,
    service: Option<Child>,
    /// A label on every container run here, so that they are removed afterwards.
    tag: String,
}

impl Podman {
    /// podman with its API service started; `plugin` is a volume plugin socket podman may use
    /// (as the volume driver `logtap`).
    pub fn start(plugin: Option<&Path>) -> Podman {
        require_podman();
        let dir = tempfile::Builder::new().prefix("logtap-podman-").tempdir().expect("tempdir");
        let conf = dir.path().join("containers.conf");
        // runc: crun fails on this machine's hybrid cgroups. Explicit ulimits: the default
        // asks for more open files than the hard limit here allows.
        let mut text = "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                        [engine]\nruntime = \"runc\"\n"
            .to_string();
        if let Some(p) = plugin {
            text += &format!("[engine.volume_plugins]\nlogtap = \"{}\"\n", p.display());
        }
        std::fs::write(&conf, text).expect("write containers.conf");
        let tag = dir.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut p = Podman { socket: dir.path().join("podman.sock"), dir, conf, service: None, tag };
        p.ensure_image();
        p.start_service();
        p
    }

    /// A podman command with this instance's configuration.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf);
        c
    }

    /// Runs podman with `args` and returns its stdout; fails the test if podman fails.
    pub fn podman(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).stdin(Stdio::null()).output().expect("run podman")
    }

    /// `podman run` with the tag label; `args` are the run options, the image, and the command.
    pub fn run(&self, args: &[&str]) -> String {
        let label = format!("logtap-e2e={}", self.tag);
        let mut all = vec!["run", "--network", "none", "--label", &label];
        all.extend_from_slice(args);
        self.podman(&all)
    }

    /// Waits for a container to exit; returns its exit code.
    pub fn wait(&self, name: &str) -> i32 {
        self.podman(&["wait", name]).parse().unwrap_or(-1)
    }

    fn ensure_image(&self) {
        if self.output(&["image", "exists", IMAGE]).status.success() {
            return;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is installed");
        let root = self.dir.path().join("rootfs");
        for d in ["bin", "tmp", "var/log/app", "proc", "sys", "dev", "etc"] {
            std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
        }
        std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
        let applets = [
            "sh", "echo", "cat", "seq", "sleep", "printf", "yes", "head", "tail", "true", "ls", "env", "date", "wc",
            "rm", "mkdir", "ln", "kill", "wget", "grep",
        ];
        for applet in applets {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet link");
        }
        let tar = self.dir.path().join("rootfs.tar");
        let out = Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".").output().expect("tar");
        assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
        let tar = tar.to_string_lossy().into_owned();
        self.podman(&["import", "--change", "CMD [\"/bin/sh\"]", &tar, IMAGE]);
    }

    /// Starts the API service (`podman system service`) and waits until it answers.
    pub fn start_service(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = self
            .cmd()
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start podman system service");
        self.service = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "podman's API service did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the API service (the runtime's API goes away; containers keep running).
    pub fn stop_service(&mut self) {
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.stop_service();
        let filter = format!("label=logtap-e2e={}", self.tag);
        let ids = self.output(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.output(&["rm", "-f", "-t", "0", id]);
        }
    }
}
