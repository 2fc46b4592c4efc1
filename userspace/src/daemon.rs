//! The daemon: wires config, ring, sinks, the sources, discovery and the control sockets, then
//! waits for a signal and shuts down in order (stop taking writes, drain, unmount).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use logtap_fusefs::kept::Keeper;
use logtap_fusefs::{Connection, Journal, Model, MountOptions, Options, Owner, Settings};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::RestartSnapshot;
use crate::config::Config;
use crate::control::plugin;
use crate::control::server::{self, Control};
use crate::discovery::{Discovery, Hold};
use crate::keeper::client::KeeperLink;
use crate::keeper::wire::Handover;
use crate::report::{Life, Report};
use crate::ring::Ring;
use crate::sinks;
use crate::sources::hold::Holding;
use crate::sources::pipes::{self, PipeSource};
use crate::sources::volume::{Framing, VolumeCapture, VolumeSource};
use crate::sources::Sources;
use crate::state::WorkerState;

fn usize_of(n: u64, what: &str) -> anyhow::Result<usize> {
    usize::try_from(n).with_context(|| format!("{what} is too large for this machine"))
}

fn mount<C: logtap_fusefs::Capture>(
    model: Model<C>,
    at: &std::path::Path,
    options: MountOptions,
) -> anyhow::Result<logtap_fusefs::MountedFs<C>> {
    logtap_fusefs::mount(model, at, options)
        .with_context(|| format!("cannot mount the volumes at {} (root and /dev/fuse are needed)", at.display()))
}

/// The largest buffers (FUSE requests of 1 MiB, copied once) are mmapped and returned to the
/// system when freed. glibc would otherwise raise its mmap threshold after the first free and
/// serve them from a heap that fragments and does not shrink. Below the threshold, a sink's
/// batches (a few hundred KiB, one after another) reuse the heap: mmapped, each cost page
/// faults and a TLB shootdown on every core.
fn keep_large_buffers_mmapped() {
    // SAFETY: mallopt only tunes the allocator.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

/// Every volume file's memory is a file descriptor: the soft limit goes up to the hard one.
fn raise_open_files_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// What a worker holds of its keeper: the link, what it was handed, and the journals.
struct Keeping {
    link: Arc<KeeperLink>,
    fds: HashMap<String, OwnedFd>,
    handover: Handover,
}

impl Keeping {
    /// Whether the keeper took it.
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> bool {
        let kept = self.link.keep(name, fd);
        if let Err(e) = &kept {
            warn!(name, "the keeper did not take what a restart needs: {e}");
        }
        kept.is_ok()
    }

    /// The journal kept under `name`, or a fresh one the keeper keeps from now on.
    fn journal(&mut self, name: &str) -> anyhow::Result<Journal> {
        if let Some(fd) = self.fds.remove(name) {
            match Journal::open(File::from(fd)) {
                Ok(j) => return Ok(j),
                Err(e) => warn!(name, "the kept journal is unreadable; starting afresh: {e}"),
            }
        }
        let c = std::ffi::CString::new(format!("logtap-{name}")).context("journal name")?;
        let journal = Journal::new(&c).with_context(|| format!("cannot make the {name} journal"))?;
        self.keep(name, journal.as_fd());
        Ok(journal)
    }
}

/// The kept state's names.
const CONTROL: &str = "control";
const FUSE: &str = "fuse";
const RING: &str = "ring";
const STATE: &str = "state";
const VOLUMES: &str = "volumes";

pub fn run(config: Config, link: Option<KeeperLink>) -> anyhow::Result<()> {
    keep_large_buffers_mmapped();
    raise_open_files_limit();
    let host = if config.host.is_empty() { crate::host::hostname() } else { config.host.clone() };
    let v = &config.volumes;
    let mut keeping = match link {
        Some(link) => {
            let taken = link.take_over().context("cannot take over from the keeper")?;
            Some(Keeping { link: Arc::new(link), fds: taken.fds, handover: taken.handover })
        }
        None => None,
    };
    let state = match &mut keeping {
        Some(k) => Some(WorkerState::open(k.journal(STATE)?).context("the kept worker state")?),
        None => None,
    };
    let ring = Arc::new(
        Ring::keeping(
            usize_of(config.ring.capacity.0, "ring.capacity")?,
            config.ring.policy,
            config.ring.block_timeout.0,
            config.ring.rates(),
            state.clone(),
        )
        .with_context(|| format!("cannot make the ring ({} of memory)", config.ring.capacity))?,
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("logtap-control")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The socket first: a second agent must fail before it touches the mount. After a restart,
    // the kept one: what clients sent meanwhile waits in it.
    let listener = {
        let _guard = rt.enter();
        let kept = keeping.as_mut().and_then(|k| k.fds.remove(CONTROL));
        match kept.map(|fd| server::adopt(fd, &config.control.socket)).transpose()?.flatten() {
            Some(listener) => listener,
            None => server::bind(&config.control)?,
        }
    };
    if let Some(k) = &keeping {
        k.keep(CONTROL, listener.as_fd());
    }

    // Every task stops on this one token, at the end of shutdown.
    let stop = CancellationToken::new();
    let encryption = config.encryption.start().context("encryption")?;
    let sinks = sinks::start(&config.sinks, &host, &ring, encryption.clone())?;
    // What the last worker's ring held for the sinks goes first; then this ring is the kept one.
    let mut carried = (0, 0);
    if let (Some(k), Some(state)) = (&mut keeping, &state) {
        if let Some(old) = k.fds.remove(RING) {
            match ring.take_over(old.as_fd(), state) {
                Ok(c) => carried = c,
                Err(e) => error!("cannot read the last worker's ring; what it held is lost: {e}"),
            }
        }
        if k.keep(RING, ring.memfd()) {
            state.only_ring(ring.generation());
        }
    }
    let framing = Framing {
        host: host.as_str().into(),
        max_record_bytes: usize_of(v.max_record_bytes.0, "volumes.max_record_bytes")?,
        partial_flush: v.partial_flush.0,
    };
    // Discovery first: it is the sources' directory; they are its listener once they exist.
    let d = &config.discovery;
    let hold = Hold { timeout: d.hold_timeout.0, bytes: usize_of(d.hold_bytes.0, "discovery.hold_bytes")? };
    let discovery = d.enabled.then(|| Discovery::new(d.clone(), v.mount.clone()));
    let holding = discovery.as_ref().map(|(registry, _)| Holding::new(registry.clone(), hold));
    let source = VolumeSource::new(framing.clone(), ring.clone(), holding.clone());
    // SAFETY: geteuid/getegid cannot fail.
    let me = unsafe { Owner { uid: libc::geteuid(), gid: libc::getegid() } };
    let settings = Settings { tail: v.tail_bytes.0, holes_may_fill: v.writeback_cache };
    if let Some(state) = &state {
        for spec in state.volumes() {
            if let Err(e) = source.define(&spec) {
                warn!(volume = spec.name, "a kept volume definition no longer holds: {e}");
            }
        }
    }
    let model_options = Options { settings, max_files: v.max_files, budget: v.volume_memory.0 };
    let options = MountOptions {
        passthrough: v.passthrough,
        writeback_cache: v.writeback_cache,
        max_write: u32::try_from(v.max_write.0).context("volumes.max_write")?,
        allow_other: v.allow_other,
        flush_interval: v.flush_interval.0,
    };
    let capture = VolumeCapture(source.clone());
    // What the keeper holds of the eBPF programs is the pipe source's, not a volume file's.
    let pipes_keeping = match (&mut keeping, &state) {
        (Some(k), Some(state)) => {
            let names: Vec<String> = k.fds.keys().filter(|n| n.starts_with(pipes::KEPT_PREFIX)).cloned().collect();
            let fds = names.into_iter().filter_map(|n| Some((n.clone(), k.fds.remove(&n)?))).collect();
            let keeper: Arc<dyn Keeper> = k.link.clone();
            Some(pipes::Keeping { programs: pipes::Kept::new(keeper, fds), state: state.clone() })
        }
        _ => None,
    };
    let mut fs = match (&mut keeping, &state) {
        (Some(k), Some(state)) => {
            let volumes = k.journal(VOLUMES)?;
            let kept = logtap_fusefs::kept::Keeping { journal: Arc::new(volumes), keeper: k.link.clone() };
            let init = state.init();
            match k.fds.remove(FUSE) {
                Some(device) if !init.is_empty() && !kept.journal.is_empty() => {
                    let files = std::mem::take(&mut k.fds)
                        .into_iter()
                        .filter_map(|(name, fd)| Some((logtap_fusefs::kept::file_ino(&name)?, File::from(fd))))
                        .collect();
                    let model = Model::restore(capture, model_options, kept, files)
                        .context("cannot restore the volumes from the kept journal")?;
                    let connection = Connection { device, init };
                    logtap_fusefs::resume(model, &v.mount, options, connection)
                        .with_context(|| format!("cannot resume serving the volumes at {}", v.mount.display()))?
                }
                _ => {
                    // Nothing to resume: what a worker that died before it mounted kept is stale.
                    if !kept.journal.is_empty() {
                        kept.journal.rewrite(&[]).context("clearing a stale volumes journal")?;
                    }
                    let model = Model::new(capture, model_options, me, Some(kept))
                        .context("cannot start the volumes (memfd, inotify)")?;
                    let fs = mount(model, &v.mount, options)?;
                    k.keep(FUSE, fs.connection().as_fd());
                    state.set_init(&fs.connection().init);
                    fs
                }
            }
        }
        _ => {
            let model =
                Model::new(capture, model_options, me, None).context("cannot start the volumes (memfd, inotify)")?;
            mount(model, &v.mount, options)?
        }
    };
    // The volumes are served first: after a restart, apps wait for them while the eBPF
    // programs load. The restart's gap ends here.
    let serving_at = std::time::SystemTime::now();
    let p = &config.pipes;
    let pipes = if p.enabled {
        let ring_buffer = u32::try_from(p.ring_buffer.0).context("pipes.ring_buffer")?;
        PipeSource::start(framing, ring.clone(), p.max_write_capture.0, ring_buffer, holding, pipes_keeping)
    } else {
        if let Some(k) = pipes_keeping {
            k.programs.release();
        }
        PipeSource::new(framing, ring.clone(), p.max_write_capture.0, "disabled", None)
    };
    let discovery = discovery.map(|(registry, asked)| {
        let _guard = rt.enter();
        registry.follow(asked, Arc::new(Sources { volumes: source.clone(), pipes: pipes.clone() }), stop.clone());
        registry
    });
    for target in &p.targets {
        if let Err(e) = pipes.watch(target) {
            warn!(?target, "cannot watch a configured target: {e:#}");
        }
    }
    let life = Life {
        keeper_pid: keeping.as_ref().map(|k| k.handover.keeper_pid),
        restarts: keeping.as_ref().map_or(0, |k| k.handover.restarts),
        last_restart: keeping.as_ref().filter(|k| k.handover.restarts > 0).map(|k| {
            let at = serving_at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let gap = at.as_nanos().saturating_sub(u128::from(k.handover.exited_at_ns));
            RestartSnapshot {
                exit: k.handover.exit.clone(),
                gap_ms: gap as f64 / 1e6,
                carried_records: carried.0,
                redelivered_records: carried.1,
                unread_pipe_bytes: pipes.unread_at_start(),
            }
        }),
    };
    if let Some(r) = &life.last_restart {
        info!(
            exit = r.exit,
            gap_ms = r.gap_ms,
            carried = r.carried_records,
            redelivered = r.redelivered_records,
            "took over from the last worker"
        );
    }
    let report = Arc::new(Report::new(
        host.clone(),
        ring.clone(),
        sinks.counters,
        Sources { volumes: source.clone(), pipes: pipes.clone() },
        discovery,
        life,
        encryption.map(|e| e.keys.clone()),
    ));

    let control = Arc::new(Control {
        report: report.clone(),
        volumes: source.clone(),
        pipes: pipes.clone(),
        mountpoint: v.mount.clone(),
        state: state.clone(),
        keeper: keeping.as_ref().map(|k| k.link.clone()),
    });
    let mut plugin_served = false;
    if !v.plugin_socket.as_os_str().is_empty() {
        let _guard = rt.enter();
        match plugin::bind(&v.plugin_socket) {
            Ok(l) => {
                rt.spawn(plugin::serve(l, control.clone(), stop.clone()));
                plugin_served = true;
            }
            // The volumes and every other source keep working without the plugin.
            Err(e) => warn!("the Docker volume plugin is not served: {e:#}"),
        }
    }
    rt.spawn(server::serve(listener, control, stop.clone()));
    info!(
        host = %host,
        mount = %v.mount.display(),
        socket = %config.control.socket.display(),
        ring = %config.ring.capacity,
        policy = %config.ring.policy,
        "logtap is running"
    );
    if let Some(k) = &keeping {
        if let Err(e) = k.link.serving() {
            warn!("cannot tell the keeper this worker serves: {e}");
        }
    }

    let (mut term, mut int) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
        )
    };
    rt.block_on(async {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    });
    // A second signal: leave at once.
    let mountpoint = v.mount.clone();
    rt.spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        error!("second signal: exiting without draining");
        if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        std::process::exit(130);
    });

    // One deadline for all of shutdown: no step may wait past it, whatever the sinks do.
    let deadline = Instant::now() + config.shutdown_timeout.0;
    let left_until = |cap: Duration| deadline.saturating_duration_since(Instant::now()).min(cap);
    ring.stop_waiting_at(deadline);
    // Stop taking writes: every volume file is sealed (later writes fail with EPERM), what was
    // written before is captured, partial lines end.
    fs.close();
    rt.block_on(async {
        if tokio::time::timeout(left_until(Duration::from_secs(2)), pipes.close()).await.is_err() {
            warn!("the eBPF event reader did not finish in time");
        }
    });
    ring.close();
    let left = ring.wait_drained(deadline);
    if left > 0 {
        warn!(records = left, timeout = %config.shutdown_timeout, "records not delivered before shutdown_timeout; they are lost");
    } else {
        info!("ring drained into the sinks");
    }
    let refused: u64 = report.volumes().iter().map(|v| v.totals.refused_bytes_total).sum();
    if refused > 0 {
        warn!(bytes = refused, "writes refused while shutting down");
    }
    // Every task ends here: the control socket answered until now, for stats while draining.
    stop.cancel();
    // The mount goes even past the deadline: lazily, at once, if it is still busy.
    if let Err(e) = fs.unmount(left_until(Duration::from_secs(2))) {
        warn!("unmount: {e}");
    }
    if left == 0 {
        for t in sinks.required {
            let _ = t.join();
        }
    }
    let _ = std::fs::remove_file(&config.control.socket);
    if plugin_served {
        let _ = std::fs::remove_file(&v.plugin_socket);
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    info!("logtap stopped");
    Ok(())
}
