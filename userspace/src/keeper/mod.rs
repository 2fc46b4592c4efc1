//! The keeper: the small process `logtap daemon` is. It holds what must outlive a worker (the
//! mount's /dev/fuse fd, every volume file's memory, the ring's region, the workers' state
//! journals) and runs the worker, the process that does everything else. When a worker exits
//! for any reason but a stop (a crash, kill -9, OOM, `logtap upgrade`), the keeper starts the
//! next one at once and hands it all; the mount stays mounted, and its requests wait in the
//! kernel meanwhile. SIGTERM/SIGINT go to the worker, which drains and unmounts as it always
//! did; the keeper then exits with its status. If the keeper itself is killed, everything it
//! held goes, the mount too.

pub mod client;
pub mod wire;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
    upgrade: Option<PathBuf>,
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
            Message::Upgrade { binary } => {
                info!(binary, "upgrade: the next worker runs this binary");
                lock(&held).upgrade = Some(binary.into());
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
    let held = Arc::new(Mutex::new(Held::default()));
    let mut binary = std::env::current_exe().context("the keeper cannot find its own binary")?;
    let mut handover = Handover { keeper_pid: std::process::id(), ..Default::default() };
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
        if let Some(next) = upgrade {
            binary = next;
        } else {
            warn!(%exit, "worker exited; starting the next one");
        }
        if !started {
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        } else {
            pause = Duration::from_millis(100);
        }
        handover.restarts += 1;
        handover.exited_at_ns = now_ns();
        handover.exit = exit;
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
