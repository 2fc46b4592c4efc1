//! The keeper: the small process `logtap daemon` is. It holds what must outlive a worker (the
//! mount's /dev/fuse fd, every volume file's memory, the ring's region, the workers' state
//! journals) and runs the worker, the process that does everything else. When a worker exits
//! for any reason but a stop (a crash, kill -9, OOM, `logtap upgrade`), the keeper starts the
//! next one at once and hands it all; the mount stays mounted, and its requests wait in the
//! kernel meanwhile. SIGTERM/SIGINT go to the worker, which drains and unmounts as it always
//! did; the keeper then exits with its status. If the keeper itself is killed, everything it
//! held goes, the mount too. `logtap upgrade --keeper` has it re-execute itself into a new
//! binary between two workers, passing its fds on through exec.

pub mod client;
pub mod wire;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tracing::{error, info, warn};

use crate::values::lock;
use wire::{Handover, Message};

/// The fd a worker finds its keeper's socket on.
pub const SOCKET_FD: i32 = 3;
pub const SOCKET_ENV: &str = "LOGTAP_KEEPER_FD";
/// A worker that exits before it serves is started again after a growing pause, so that one
/// that cannot start does not spin; one that served is started again at once.
const MAX_PAUSE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Held {
    fds: HashMap<String, OwnedFd>,
    /// `logtap upgrade` asked for this binary as the next worker.
    upgrade: Option<Upgrade>,
}

struct Upgrade {
    binary: PathBuf,
    /// The keeper re-executes itself into it first.
    keeper: bool,
}

/// What a keeper passes on to the binary it re-executes itself into: its fds by name, and the
/// handover for the next worker.
const HELD_ENV: &str = "LOGTAP_KEEPER_HELD";
const HANDOVER_ENV: &str = "LOGTAP_KEEPER_HANDOVER";

/// Replaces this process with `binary` as the keeper (same pid, so the workers' parent and
/// systemd's main pid stay), passing on what it holds. Returns only if exec failed.
fn reexec(binary: &Path, held: &Mutex<Held>, handover: &Handover) -> anyhow::Error {
    let h = lock(held);
    let mut fds = HashMap::new();
    for (name, fd) in &h.fds {
        // SAFETY: clearing close-on-exec of an fd we hold.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
        fds.insert(name.clone(), fd.as_raw_fd());
    }
    let (held_json, handover_json) = match (serde_json::to_string(&fds), serde_json::to_string(handover)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return anyhow::anyhow!("cannot describe what the keeper holds"),
    };
    let e = Command::new(binary)
        .args(std::env::args_os().skip(1))
        .env(HELD_ENV, held_json)
        .env(HANDOVER_ENV, handover_json)
        .exec();
    for fd in h.fds.values() {
        // SAFETY: setting close-on-exec again on an fd we hold.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    anyhow::Error::new(e).context(format!("cannot re-execute the keeper as {}", binary.display()))
}

/// What the keeper this process was before it re-executed passed on, if it was one.
fn inherited() -> anyhow::Result<Option<(HashMap<String, OwnedFd>, Handover)>> {
    let (Some(held), Some(handover)) = (std::env::var_os(HELD_ENV), std::env::var_os(HANDOVER_ENV)) else {
        return Ok(None);
    };
    // Not for the workers.
    std::env::remove_var(HELD_ENV);
    std::env::remove_var(HANDOVER_ENV);
    let held: HashMap<String, i32> =
        serde_json::from_str(&held.to_string_lossy()).context("what the last keeper passed on")?;
    let handover: Handover =
        serde_json::from_str(&handover.to_string_lossy()).context("what the last keeper passed on")?;
    let mut fds = HashMap::new();
    for (name, fd) in held {
        // SAFETY: fcntl on a number: fails on anything that is not an open fd.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            anyhow::bail!("the last keeper passed on {name} as fd {fd}, which is not open");
        }
        // SAFETY: an open fd the last keeper passed on to us alone.
        fds.insert(name, unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(Some((fds, handover)))
}

fn signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Serves one worker's socket until the worker is gone; whether it said it was serving.
fn serve(socket: OwnedFd, held: Arc<Mutex<Held>>, handover: Handover, pid: u32) -> std::io::Result<bool> {
    let mut started = false;
    while let Some((message, fd)) = wire::recv(socket.as_fd())? {
        match message {
            Message::Hello => {
                let h = lock(&held);
                for (name, fd) in &h.fds {
                    wire::send(socket.as_fd(), &Message::Kept { name: name.clone() }, Some(fd.as_fd()))?;
                }
                wire::send(socket.as_fd(), &Message::Ready(handover.clone()), None)?;
            }
            Message::Serving => started = true,
            Message::Keep { name } => match fd {
                Some(fd) => {
                    lock(&held).fds.insert(name, fd);
                }
                None => warn!(name, "a worker asked to keep no fd"),
            },
            Message::Release { name } => {
                lock(&held).fds.remove(&name);
            }
            Message::Upgrade { binary, keeper } => {
                info!(binary, keeper, "upgrade: the next worker runs this binary");
                lock(&held).upgrade = Some(Upgrade { binary: binary.into(), keeper });
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            Message::Kept { .. } | Message::Ready(_) => warn!("a worker sent a keeper's message"),
        }
    }
    Ok(started)
}

fn spawn(binary: &Path, args: &[String], theirs: &OwnedFd) -> std::io::Result<Child> {
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.arg("worker").args(args).env(SOCKET_ENV, SOCKET_FD.to_string());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == SOCKET_FD {
                libc::fcntl(fd, libc::F_SETFD, 0);
            } else if libc::dup2(fd, SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let set = signals();
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            // A worker does not outlive its keeper: without it nothing holds the mount.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

struct Worker {
    child: Child,
    binary: PathBuf,
    server: JoinHandle<std::io::Result<bool>>,
}

/// Runs workers until a stop; returns the exit code for the keeper. `args` go to every
/// worker (the config path); `mount` is detached if a worker dies while stopping.
pub fn run(args: Vec<String>, mount: PathBuf) -> anyhow::Result<i32> {
    let set = signals();
    // SAFETY: blocking signals for this thread (and those it starts); they are taken below.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let (fds, mut handover) = inherited()?.unwrap_or_default();
    if !fds.is_empty() {
        info!(kept = fds.len(), restarts = handover.restarts, "the keeper re-executed itself; it holds what it did");
    }
    handover.keeper_pid = std::process::id();
    let held = Arc::new(Mutex::new(Held { fds, upgrade: None }));
    let mut binary = std::env::current_exe().context("the keeper cannot find its own binary")?;
    let mut pause = Duration::from_millis(100);
    let mut stopping = false;
    let mut last_good = binary.clone();
    loop {
        let (ours, theirs) = wire::socketpair().context("the keeper's socket")?;
        let child = spawn(&binary, &args, &theirs).with_context(|| format!("cannot start {}", binary.display()))?;
        drop(theirs);
        let pid = child.id();
        let (h, ho) = (held.clone(), handover.clone());
        let server = std::thread::Builder::new()
            .name("keeper".into())
            .spawn(move || serve(ours, h, ho, pid))
            .context("the keeper's thread")?;
        let mut worker = Worker { child, binary: binary.clone(), server };
        info!(pid, binary = %binary.display(), restarts = handover.restarts, "worker started");
        let status = wait(&mut worker, &set, &mut stopping)?;
        let started =
            worker.server.join().map_err(|_| anyhow::anyhow!("the keeper's thread panicked"))?.unwrap_or(false);
        let exit = describe(status);
        if stopping {
            if !status.success() {
                // A worker that died while stopping left the mount to us.
                if let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) {
                    // SAFETY: a valid C string.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
            info!(%exit, "worker stopped; the keeper stops");
            return Ok(status.code().unwrap_or(1));
        }
        if !started && handover.restarts == 0 {
            // The first worker never started (a bad config, no /dev/fuse): nothing to keep.
            return Ok(status.code().unwrap_or(1));
        }
        let upgrade = lock(&held).upgrade.take();
        if started {
            last_good = worker.binary.clone();
        } else if upgrade.is_none() && worker.binary != last_good {
            error!(binary = %worker.binary.display(), "the upgraded worker did not start; going back to the previous binary");
            binary = last_good.clone();
        }
        if !started {
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        } else {
            pause = Duration::from_millis(100);
        }
        handover.restarts += 1;
        handover.exited_at_ns = now_ns();
        handover.exit = exit.clone();
        match upgrade {
            Some(Upgrade { binary: next, keeper: true }) => {
                info!(binary = %next.display(), "the keeper re-executes itself");
                error!("{:#}; the next worker runs it, this keeper stays", reexec(&next, &held, &handover));
                binary = next;
            }
            Some(Upgrade { binary: next, keeper: false }) => binary = next,
            None => warn!(%exit, "worker exited; starting the next one"),
        }
    }
}

/// Waits for the worker to exit, passing stop signals on; SIGHUP restarts it on the binary
/// now at its path (an upgrade in place).
fn wait(worker: &mut Worker, set: &libc::sigset_t, stopping: &mut bool) -> anyhow::Result<ExitStatus> {
    let pid = worker.child.id() as i32;
    loop {
        if let Some(status) = worker.child.try_wait().context("waiting for the worker")? {
            return Ok(status);
        }
        let timeout = libc::timespec { tv_sec: 0, tv_nsec: 200_000_000 };
        // SAFETY: set and timeout are valid for the call.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
        match sig {
            libc::SIGTERM | libc::SIGINT => {
                *stopping = true;
                // SAFETY: signalling our child. A second signal passes on too: it leaves at once.
                unsafe { libc::kill(pid, sig) };
            }
            libc::SIGHUP if !*stopping => {
                info!("SIGHUP: restarting the worker on its binary as it is now");
                // SAFETY: signalling our child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            _ => {}
        }
    }
}
