//! The pipe source: what watched processes write to their stdout/stderr pipes, captured in
//! the kernel by the eBPF programs (crate `ebpf/`) and read here from the BPF ring buffer
//! ([`reader`]).
//!
//! Targets are what is watched: a process (and its children), a cgroup, or a container. With
//! container discovery on, the kernel captures every cgroup no target names; the reader finds
//! which container a new cgroup belongs to ([`cgroups`]), makes it a target with the identity
//! discovery gives (holding its records until the runtime has named it), and tells the kernel
//! to leave cgroups that are no container alone.

mod btf;
mod events;
mod probe;
mod reader;
mod tracefs;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use logtap_common::{TargetCounters, CONTAINERS_TARGET, MAX_OUTPUT_PIPES, MAX_TARGETS, PIPE_SHARED, TARGET_EXCLUDED};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::hold::Holding;
use super::volume::Framing;
use crate::api::{Container, ContainersSnapshot, PipesSnapshot, TargetSnapshot, TargetSpec, UnwatchSpec};
use crate::counters::{GroupCounters, StreamCounters};
use crate::discovery::identity::Identity;
use crate::host::cgroups;
use crate::record::Origin;
use crate::ring::Ring;
use crate::state::{TargetImage, TargetNames, WorkerState};
use crate::values::{lock, ByteSize};

pub use probe::{Kept, KEPT_PREFIX};

/// Under a keeper: what it holds of the programs, and the journal the targets are kept in.
pub struct Keeping {
    pub programs: Kept,
    pub state: Arc<WorkerState>,
}

/// The eBPF source: stdout/stderr pipe writes of watched processes.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipesConfig {
    pub enabled: bool,
    /// Bytes copied per write() at most; the rest is counted as truncated.
    pub max_write_capture: ByteSize,
    /// Size of the BPF ring buffer between the kernel and the agent (a power of two).
    pub ring_buffer: ByteSize,
    /// Processes or cgroups watched from the start.
    pub targets: Vec<TargetSpec>,
}

impl Default for PipesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_write_capture: ByteSize(64 << 10),
            ring_buffer: ByteSize(16 << 20),
            targets: Vec::new(),
        }
    }
}

impl PipesConfig {
    pub fn validate(&self) -> Result<(), String> {
        let max_capture = (logtap_common::CHUNK as u64) * u64::from(logtap_common::MAX_CHUNKS);
        if !(1..=max_capture).contains(&self.max_write_capture.0) {
            return Err(format!(
                "pipes.max_write_capture must be between 1B and {} (what the eBPF programs copy per write), not {}",
                ByteSize(max_capture),
                self.max_write_capture
            ));
        }
        if !self.ring_buffer.0.is_power_of_two() || !(64 << 10..=1 << 30).contains(&self.ring_buffer.0) {
            return Err(format!(
                "pipes.ring_buffer must be a power of two between 64KiB and 1GiB, not {}",
                self.ring_buffer
            ));
        }
        for t in &self.targets {
            if t.pid.is_some() == t.cgroup.is_some() {
                return Err("each [[pipes.targets]] names exactly one of pid or cgroup".into());
            }
        }
        Ok(())
    }
}

/// Whose a target's records are; a container target learns it when the runtime names it.
#[derive(Debug, Clone, PartialEq)]
struct Who {
    service: Arc<str>,
    module: Option<Arc<str>>,
    tenant: Arc<str>,
    container: Option<Arc<Container>>,
    /// False while (or because) the runtime has not named the container.
    identified: bool,
}

impl Who {
    fn of(i: &Identity, identified: bool) -> Self {
        Who {
            service: i.service.clone(),
            module: i.module.clone(),
            tenant: i.tenant.clone(),
            container: Some(i.container.clone()),
            identified,
        }
    }

    /// The origin of a stream of this target: `fd_name` is `stdout` or `stderr`.
    fn origin(&self, host: &Arc<str>, pid: u32, fd_name: &str, counters: StreamCounters) -> Arc<Origin> {
        Arc::new(Origin {
            host: host.clone(),
            pid,
            volume: "".into(),
            service: self.service.clone(),
            module: self.module.clone().unwrap_or_else(|| fd_name.into()),
            path: fd_name.into(),
            tenant: self.tenant.clone(),
            container: self.container.clone(),
            counters,
        })
    }
}

struct Target {
    /// The kernel's name for it: the value in the watch maps and the index of its counters.
    /// Slots are reused; ids are not.
    slot: u32,
    /// The name users see: unique to this agent's run, never given twice.
    id: String,
    spec: TargetSpec,
    who: Mutex<Who>,
    counters: Arc<GroupCounters>,
    /// Container targets: the cgroups found to be the container's (one per start).
    cgroups: Mutex<Vec<u64>>,
    /// Its stdout and stderr pipes.
    pipes: Mutex<StdPipes>,
    /// Bytes written to other pipes that the kernel could not tell apart (before the
    /// container was found, or through a pipe several targets share); the kernel counts the
    /// rest.
    other_pipe_bytes: AtomicU64,
}

/// Most stdout/stderr pairs kept per target (each start of a container brings one): every
/// target's fit in the kernel's map of output pipes.
const PAIRS_KEPT: usize = 8;
const _: () = assert!(PAIRS_KEPT * 2 * MAX_TARGETS as usize <= MAX_OUTPUT_PIPES as usize);

/// The inodes of a target's stdout and stderr pipes: a container's from its init process's fds
/// 1 and 2 (one pair per start), a process's from its fds 1 and 2 when it is watched, or as the
/// watch request names them. The kernel takes a write to one of them as the target's output
/// whatever fd number it used, and they name its stream; a write to any other pipe is not the
/// target's output. An fd that was no pipe (a file, a tty) has none: it could not be captured.
/// None known (init gone): the fd number (1 or 2) decides and names.
#[derive(Debug, Default)]
struct StdPipes {
    /// stdout's and stderr's pipe, per start.
    pairs: Vec<[Option<u64>; 2]>,
}

impl StdPipes {
    /// The pipes of a start. Returns the pipes that are no longer the target's, if the oldest
    /// pair had to go.
    fn add(&mut self, stdout: Option<u64>, stderr: Option<u64>) -> Vec<u64> {
        let pair = [stdout, stderr];
        if self.pairs.contains(&pair) {
            return Vec::new();
        }
        self.pairs.push(pair);
        if self.pairs.len() <= PAIRS_KEPT {
            return Vec::new();
        }
        let old = self.pairs.remove(0);
        old.into_iter().flatten().filter(|p| !self.all().any(|q| q == *p)).collect()
    }

    fn all(&self) -> impl Iterator<Item = u64> + '_ {
        self.pairs.iter().flatten().flatten().copied()
    }

    /// `stdout` or `stderr`; `None` for a pipe that is neither.
    fn name(&self, pipe: u64, fd: u32) -> Option<&'static str> {
        let by_fd = if fd == 2 { "stderr" } else { "stdout" };
        let is = |i: usize| self.pairs.iter().any(|p| p[i] == Some(pipe));
        match (is(0), is(1)) {
            (true, false) => Some("stdout"),
            (false, true) => Some("stderr"),
            // One pipe for both: the fd tells them apart.
            (true, true) => Some(by_fd),
            (false, false) if self.pairs.is_empty() => Some(by_fd),
            (false, false) => None,
        }
    }
}

impl Target {
    fn who(&self) -> Who {
        lock(&self.who).clone()
    }
}

struct Maps {
    pids: BpfHashMap<MapData, u32, u32>,
    cgroups: BpfHashMap<MapData, u64, u32>,
    counters: PerCpuArray<MapData, TargetCounters>,
    /// Pipe inode -> the target it is the output of, or `PIPE_SHARED`.
    output_pipes: BpfHashMap<MapData, u64, u32>,
    /// Per target slot: whether `output_pipes` holds its pipes.
    knows_pipes: Array<MapData, u32>,
    /// Whether the kernel looks writers up in `pids` (some target is a process).
    pids_watched: Array<MapData, u32>,
}

struct State {
    maps: Option<Maps>,
    targets: BTreeMap<u32, Arc<Target>>,
    /// Live container targets by container id.
    containers: HashMap<String, u32>,
    status: String,
    reason: Option<String>,
    pending_bytes: u64,
    /// The last targets removed, with their final counts.
    ended: VecDeque<TargetSnapshot>,
    /// cgroups the kernel is told to skip.
    excluded: HashSet<u64>,
    /// Output pipes and the targets they are the output of (mostly one).
    pipe_owners: HashMap<u64, Vec<u32>>,
}

impl State {
    /// A target is watched under its slot (and, for a container, its container's id).
    fn insert(&mut self, target: Arc<Target>) {
        if let Some(c) = &target.spec.container {
            self.containers.insert(c.clone(), target.slot);
        }
        self.targets.insert(target.slot, target);
    }

    /// `stdout` and `stderr` become `target`'s output pipes, here and in the kernel, before
    /// the kernel sees its first write: only then does the kernel go by pipe identity.
    fn add_output(&mut self, target: &Target, stdout: Option<u64>, stderr: Option<u64>) {
        // No pipe: the kernel keeps the fd 1/2 rule (knowing no pipes would make every write
        // another pipe's).
        if stdout.is_none() && stderr.is_none() {
            return;
        }
        let gone = lock(&target.pipes).add(stdout, stderr);
        for pipe in gone {
            self.set_owner(pipe, target.slot, false);
        }
        let owned = [stdout, stderr].into_iter().flatten().all(|pipe| self.set_owner(pipe, target.slot, true));
        if let (true, Some(maps)) = (owned, self.maps.as_mut()) {
            if let Err(e) = maps.knows_pipes.set(target.slot, 1, 0) {
                warn!(target = %target.id, "cannot tell the kernel a target's output pipes: {e}");
            }
        }
    }

    /// Tells the kernel whether any target is a process (before the first one's pid is in
    /// the watch map, after the last one's is gone).
    fn publish_pids_watched(&mut self) {
        let any = self.targets.values().any(|t| t.spec.pid.is_some());
        if let Some(maps) = self.maps.as_mut() {
            if let Err(e) = maps.pids_watched.set(0, u32::from(any), 0) {
                warn!("cannot tell the kernel whether processes are watched: {e}");
            }
        }
    }

    /// Forgets every output pipe of `target` (it goes; its slot's flag is reset when the slot
    /// is given again, as its counters are).
    fn remove_output(&mut self, target: &Target) {
        let pipes: Vec<u64> = lock(&target.pipes).all().collect();
        for pipe in pipes {
            self.set_owner(pipe, target.slot, false);
        }
    }

    /// Adds (`own`) or removes `slot` as an owner of `pipe`, and writes the kernel's entry.
    /// False if the kernel's map refused it.
    fn set_owner(&mut self, pipe: u64, slot: u32, own: bool) -> bool {
        let owners = self.pipe_owners.entry(pipe).or_default();
        owners.retain(|s| *s != slot);
        if own {
            owners.push(slot);
        }
        let value = match owners.as_slice() {
            [] => None,
            [one] => Some(*one),
            _ => Some(PIPE_SHARED),
        };
        if value.is_none() {
            self.pipe_owners.remove(&pipe);
        }
        let Some(maps) = self.maps.as_mut() else { return false };
        let written = match value {
            Some(v) => maps.output_pipes.insert(pipe, v, 0),
            None => maps.output_pipes.remove(&pipe),
        };
        match written {
            Ok(()) => true,
            Err(e) => {
                warn!(pipe, slot, "cannot update the kernel's map of output pipes: {e}");
                false
            }
        }
    }
}

/// Commands waiting for the event loop at most.
const COMMANDS: usize = 4096;
/// How many removed targets stay visible in the stats.
const ENDED_KEPT: usize = 64;

/// Counted by the reader for container capture.
#[derive(Default)]
struct ContainerCounts {
    ignored_bytes: AtomicU64,
    unresolved_bytes: AtomicU64,
}

pub struct PipeSource {
    framing: Framing,
    ring: Arc<Ring>,
    max_capture: u64,
    state: Mutex<State>,
    /// Work for the event loop, which first reads what is already in the ring buffer
    /// (bounded: see [`COMMANDS`]).
    commands: Option<mpsc::Sender<Command>>,
    /// Set when every container is captured: who containers are, and where their records
    /// wait until the runtime names them.
    holding: Option<Arc<Holding>>,
    counts: ContainerCounts,
    /// Target ids are `{instance}-{n}`: `instance` differs at every start of the agent (not at
    /// a worker's restart, which keeps the targets), so a `logtap run` that outlived an agent
    /// cannot unwatch another run's target.
    instance: String,
    next_id: AtomicU64,
    /// Where the targets are kept for the next worker.
    kept: Option<Arc<WorkerState>>,
    /// What the last worker's programs captured and this worker could not read (it loaded other
    /// programs).
    unread_at_start: u64,
}

enum Command {
    /// Forget a target (by slot) once what it already wrote is read.
    Remove(u32),
    /// The runtime has named a container (or said it does not know it).
    Identified(String),
    /// A container died: its lines end, its target goes.
    Died(String),
    /// Shutdown: read everything, end every partial line.
    Close(tokio::sync::oneshot::Sender<()>),
}

impl PipeSource {
    /// A source that is not running (disabled, or the kernel refused the programs).
    pub fn new(framing: Framing, ring: Arc<Ring>, max_capture: u64, status: &str, reason: Option<String>) -> Arc<Self> {
        Self::with(framing, ring, max_capture, (status, reason), None, None, None)
    }

    /// `running`: the loaded programs' maps, and where the event reader takes commands.
    fn with(
        framing: Framing,
        ring: Arc<Ring>,
        max_capture: u64,
        (status, reason): (&str, Option<String>),
        holding: Option<Arc<Holding>>,
        running: Option<(Maps, mpsc::Sender<Command>, u64)>,
        kept: Option<Arc<WorkerState>>,
    ) -> Arc<Self> {
        let unread_at_start = running.as_ref().map_or(0, |r| r.2);
        let (maps, commands) = running.map(|(m, c, _)| (m, c)).unzip();
        let names = kept.as_ref().and_then(|k| k.target_names());
        let (instance, next) = names.map_or_else(|| (instance_name(), 1), |n| (n.instance, n.next));
        Arc::new(Self {
            framing,
            ring,
            max_capture,
            state: Mutex::new(State {
                maps,
                targets: BTreeMap::new(),
                containers: HashMap::new(),
                status: status.into(),
                reason,
                pending_bytes: 0,
                ended: VecDeque::new(),
                excluded: HashSet::new(),
                pipe_owners: HashMap::new(),
            }),
            commands,
            holding,
            counts: ContainerCounts::default(),
            instance,
            next_id: AtomicU64::new(next),
            kept,
            unread_at_start,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Loads and attaches the programs (or takes over those the keeper kept attached, with the
    /// last worker's targets) and starts reading their events on a thread of its own. With a
    /// `directory`, every container is captured from its first write. On failure the source
    /// says why in its stats and the agent carries on.
    pub fn start(
        framing: Framing,
        ring: Arc<Ring>,
        max_capture: u64,
        ring_buffer_bytes: u32,
        containers: Option<Arc<Holding>>,
        keeping: Option<Keeping>,
    ) -> Arc<Self> {
        let (programs, state) = keeping.map(|k| (k.programs, k.state)).unzip();
        let loaded =
            probe::load(max_capture as u32, ring_buffer_bytes, containers.is_some(), programs).and_then(|loaded| {
                let root = containers.as_ref().map(|_| cgroups::v2_root()).transpose()?;
                Ok((loaded, root))
            });
        match loaded {
            Ok((loaded, root)) => {
                let (tx, rx) = mpsc::channel(COMMANDS);
                let maps = Maps {
                    pids: loaded.pids,
                    cgroups: loaded.cgroups,
                    counters: loaded.counters,
                    output_pipes: loaded.output_pipes,
                    knows_pipes: loaded.knows_pipes,
                    pids_watched: loaded.pids_watched,
                };
                let source = Self::with(
                    framing,
                    ring,
                    max_capture,
                    ("running", None),
                    containers,
                    Some((maps, tx, loaded.unread_bytes)),
                    state.clone(),
                );
                if let Some(state) = &state {
                    source.restore(state.targets(), loaded.resumed);
                }
                if let Some(root) = &root {
                    source.exclude_host_and_self(root);
                }
                let index = root.map(cgroups::Index::new);
                // What the last worker pushed before it died is in the ring: read on past it.
                let (mut events, mut earlier) = (loaded.events, loaded.earlier);
                match earlier.as_mut() {
                    Some(earlier) => earlier.skip_to(source.ring.events_mark()),
                    None if loaded.kept_events => events.skip_to(source.ring.events_mark()),
                    None => {}
                }
                let s = source.clone();
                let ebpf = loaded.ebpf;
                // Its own thread: reading cgroups and /proc, and pushing into a full ring under
                // `block`, must not hold up the control socket's runtime.
                let reader = std::thread::Builder::new().name("pipe-reader".into()).spawn(move || {
                    // The programs stay attached while `ebpf` lives.
                    let _ebpf = ebpf;
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
                    let read = rt
                        .context("cannot start the event reader's runtime")
                        .and_then(|rt| rt.block_on(s.clone().run(events, earlier, rx, index)));
                    if let Err(e) = read {
                        warn!("the eBPF event reader stopped: {e:#}");
                        let mut st = s.lock();
                        st.status = "unavailable".into();
                        st.reason = Some(format!("{e:#}"));
                    }
                });
                if let Err(e) = reader {
                    let mut st = source.lock();
                    st.status = "unavailable".into();
                    st.reason = Some(format!("cannot start the event reader's thread: {e}"));
                }
                info!(containers = source.holding.is_some(), "eBPF pipe capture loaded and attached");
                source
            }
            Err(e) => {
                // The verifier's log can be megabytes: keep its head and its verdict.
                let full = format!("{e:#}");
                let lines: Vec<&str> = full.lines().collect();
                let reason = if lines.len() > 6 {
                    format!("{} [...] {}", lines[0], lines[lines.len() - 3..].join(" "))
                } else {
                    full.clone()
                };
                tracing::debug!("eBPF load failure in full: {full}");
                warn!("eBPF pipe capture unavailable, volumes keep working: {reason}");
                Self::new(framing, ring, max_capture, "unavailable", Some(reason))
            }
        }
    }

    /// The last worker's targets again, under their slots and ids. `resumed`: the kernel's maps
    /// are the last worker's and name them already (with the children it followed, and the
    /// cgroups it skips); otherwise they are written again.
    fn restore(&self, images: Vec<TargetImage>, resumed: bool) {
        let mut st = self.lock();
        if resumed {
            if let Some(maps) = st.maps.as_ref() {
                let skipped: Vec<u64> = maps
                    .cgroups
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(_, t)| *t == TARGET_EXCLUDED)
                    .map(|(cg, _)| cg)
                    .collect();
                st.excluded.extend(skipped);
            }
        }
        let count = images.len();
        for image in images {
            let who = Who {
                service: image.service.into(),
                module: image.module.map(Into::into),
                tenant: image.tenant.into(),
                container: image.container.map(Arc::new),
                identified: image.identified,
            };
            let target = Arc::new(Target {
                slot: image.slot,
                id: image.id,
                spec: image.spec,
                who: Mutex::new(who),
                counters: Arc::default(),
                cgroups: Mutex::new(image.cgroups),
                pipes: Mutex::new(StdPipes { pairs: image.pipes }),
                other_pipe_bytes: AtomicU64::new(0),
            });
            if !resumed {
                if let Err(e) = self.rewatch(&mut st, &target) {
                    warn!(target = %target.id, "a kept target cannot be watched again: {e:#}");
                    self.forget_kept(target.slot);
                    continue;
                }
            }
            st.insert(target.clone());
            let pairs = lock(&target.pipes).pairs.clone();
            for [stdout, stderr] in pairs {
                st.add_output(&target, stdout, stderr);
            }
        }
        st.publish_pids_watched();
        info!(targets = count, resumed, "the last worker's watch targets are taken over");
    }

    /// Writes a kept target into fresh maps (programs loaded anew).
    fn rewatch(&self, st: &mut State, t: &Target) -> anyhow::Result<()> {
        let Some(maps) = st.maps.as_mut() else { bail!("eBPF pipe capture is not running") };
        if let Some(pid) = t.spec.pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("process {pid} is gone");
            }
            maps.pids.insert(pid, t.slot, 0).context("adding the process to the watch map")?;
        }
        let cgroup = t.spec.cgroup.as_deref().map(cgroups::id_of).transpose()?;
        for cg in cgroup.into_iter().chain(lock(&t.cgroups).iter().copied()) {
            maps.cgroups.insert(cg, t.slot, 0).context("adding the cgroup to the watch map")?;
        }
        Ok(())
    }

    /// The next worker is told of a target as it is now.
    fn keep(&self, t: &Target) {
        let Some(kept) = &self.kept else { return };
        let who = t.who();
        kept.target(TargetImage {
            slot: t.slot,
            id: t.id.clone(),
            spec: t.spec.clone(),
            service: who.service.to_string(),
            module: who.module.as_deref().map(str::to_string),
            tenant: who.tenant.to_string(),
            container: who.container.as_deref().cloned(),
            identified: who.identified,
            cgroups: lock(&t.cgroups).clone(),
            pipes: lock(&t.pipes).pairs.clone(),
        });
    }

    fn forget_kept(&self, slot: u32) {
        if let Some(kept) = &self.kept {
            kept.target_gone(slot);
        }
    }

    /// The host's root cgroup and the agent's own are never containers: skip them from the start
    /// (the agent's stdout sink must not capture itself).
    fn exclude_host_and_self(&self, root: &std::path::Path) {
        match cgroups::id_of(root).and_then(|host| Ok([host, cgroups::own_id(root)?])) {
            Ok(ids) => ids.iter().for_each(|id| self.exclude(*id)),
            Err(e) => warn!("cannot find the agent's own cgroup to skip it: {e:#}"),
        }
    }

    /// The kernel stops capturing a cgroup that is no container (or opted out). Events it
    /// sent before arrive here too: a cgroup already skipped costs no map update.
    fn exclude(&self, cgroup: u64) {
        let mut st = self.lock();
        let State { maps, excluded, .. } = &mut *st;
        let Some(maps) = maps.as_mut() else { return };
        if excluded.contains(&cgroup) {
            return;
        }
        match maps.cgroups.insert(cgroup, TARGET_EXCLUDED, 0) {
            Ok(()) => {
                excluded.insert(cgroup);
            }
            Err(e) => warn!(cgroup, "cannot tell the kernel to skip a cgroup: {e}"),
        }
    }

    /// Starts watching; returns the target's id.
    pub fn watch(&self, spec: &TargetSpec) -> anyhow::Result<String> {
        if spec.container.is_some() {
            bail!("containers are watched by discovery, not by a watch request");
        }
        if spec.pid.is_some() == spec.cgroup.is_some() {
            bail!("name exactly one of pid or cgroup");
        }
        if let Some(s) = &spec.service {
            logtap_fusefs::Name::parse(s).map_err(|e| anyhow::anyhow!("invalid service name {s:?}: {e}"))?;
        }
        if let Some(m) = &spec.module {
            logtap_fusefs::Name::parse(m).map_err(|e| anyhow::anyhow!("invalid module name {m:?}: {e}"))?;
        }
        let cgroup = spec.cgroup.as_deref().map(cgroups::id_of).transpose()?;
        if let Some(pid) = spec.pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("no process {pid}");
            }
        }
        let service = spec.service.clone().unwrap_or_else(|| match (spec.pid, &spec.cgroup) {
            (Some(pid), _) => format!("pid-{pid}"),
            (_, Some(cg)) => {
                cg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "cgroup".into())
            }
            _ => "unknown".into(),
        });
        let (stdout, stderr) = match (spec.stdout_pipe, spec.stderr_pipe, spec.pid) {
            (None, None, Some(pid)) => crate::host::output_pipes(pid),
            (out, err, _) => (out, err),
        };
        let who = Who {
            service: service.into(),
            module: spec.module.as_deref().map(Into::into),
            tenant: "".into(),
            container: None,
            identified: true,
        };
        let mut st = self.lock();
        {
            let State { maps, status, reason, .. } = &mut *st;
            let Some(maps) = maps.as_mut() else {
                bail!(
                    "eBPF pipe capture is {status}{}",
                    reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
                );
            };
            // One target per process or cgroup: a second would silently take the first's records.
            if let Some(t) = spec.pid.and_then(|pid| maps.pids.get(&pid, 0).ok()) {
                bail!("process {} is already watched by target {t}", spec.pid.unwrap_or_default());
            }
            if let Some(t) = cgroup.and_then(|cg| maps.cgroups.get(&cg, 0).ok()).filter(|t| *t != TARGET_EXCLUDED) {
                bail!(
                    "cgroup {} is already watched by target {t}",
                    spec.cgroup.as_deref().unwrap_or(std::path::Path::new("")).display()
                );
            }
        }
        let target = self.add_target(&mut st, spec.clone(), who)?;
        st.add_output(&target, stdout, stderr);
        self.keep(&target);
        st.publish_pids_watched();
        let Some(maps) = st.maps.as_mut() else { bail!("eBPF pipe capture stopped") };
        if let Some(pid) = spec.pid {
            maps.pids.insert(pid, target.slot, 0).context("adding the process to the watch map")?;
        }
        if let Some(cg) = cgroup {
            maps.cgroups.insert(cg, target.slot, 0).context("adding the cgroup to the watch map")?;
            // No longer skipped: after an unwatch, the reader skips it again.
            st.excluded.remove(&cg);
        }
        info!(target = %target.id, ?spec, "watching");
        Ok(target.id.clone())
    }

    /// A new target with fresh kernel counters.
    fn add_target(&self, st: &mut State, spec: TargetSpec, who: Who) -> anyhow::Result<Arc<Target>> {
        let Some(maps) = st.maps.as_mut() else { bail!("eBPF pipe capture is not running") };
        let slot = (0..CONTAINERS_TARGET).find(|i| !st.targets.contains_key(i)).context("too many watch targets")?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        maps.counters
            .set(slot, aya::maps::PerCpuValues::try_from(vec![TargetCounters::default(); cpus])?, 0)
            .context("resetting the target's counters")?;
        maps.knows_pipes.set(slot, 0, 0).context("resetting the target's output pipes")?;
        let n = self.next_id.fetch_add(1, Relaxed);
        if let Some(kept) = &self.kept {
            kept.set_target_names(&TargetNames { instance: self.instance.clone(), next: n + 1 });
        }
        let target = Arc::new(Target {
            slot,
            id: format!("{}-{n}", self.instance),
            spec,
            who: Mutex::new(who),
            counters: Arc::default(),
            cgroups: Mutex::default(),
            pipes: Mutex::default(),
            other_pipe_bytes: AtomicU64::new(0),
        });
        st.insert(target.clone());
        Ok(target)
    }

    pub fn unwatch(&self, spec: &UnwatchSpec) -> anyhow::Result<()> {
        let mut st = self.lock();
        let Some(maps) = st.maps.as_mut() else { bail!("eBPF pipe capture is not running") };
        if let Some(pid) = spec.pid {
            maps.pids.remove(&pid).with_context(|| format!("process {pid} is not watched"))?;
        }
        if let Some(cg) = &spec.cgroup {
            maps.cgroups
                .remove(&cgroups::id_of(cg)?)
                .with_context(|| format!("cgroup {} is not watched", cg.display()))?;
        }
        if let Some(id) = &spec.target {
            let slot = st.targets.values().find(|t| t.id == *id).map(|t| t.slot);
            let Some(slot) = slot else { bail!("no target {id}") };
            self.send(Command::Remove(slot)).context("cannot remove the target now")?;
        }
        Ok(())
    }

    /// Hands the event loop a command. The queue is bounded: full means the loop is stuck, and
    /// the caller hears so (a target not removed, a container's records released only after
    /// `hold_timeout`), rather than the queue growing.
    fn send(&self, command: Command) -> anyhow::Result<()> {
        let Some(tx) = &self.commands else { return Ok(()) };
        match tx.try_send(command) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("the eBPF event reader has {COMMANDS} commands waiting; one more is dropped");
                bail!("the eBPF event reader is {COMMANDS} commands behind")
            }
            // The reader has stopped (shutdown, or an error it reported).
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Discovery has an answer for a container (named, opted out, or unknown to the runtime).
    pub fn identified(&self, container_id: &str) {
        let _ = self.send(Command::Identified(container_id.to_string()));
    }

    /// A container died: what it wrote is read, its partial lines end and its target goes.
    pub fn died(&self, container_id: &str) {
        let _ = self.send(Command::Died(container_id.to_string()));
    }

    fn remove_target(&self, slot: u32) {
        let mut st = self.lock();
        if let Some(mut last) = self.snapshot_of(&st, slot) {
            last.ended = true;
            st.ended.push_back(last);
            if st.ended.len() > ENDED_KEPT {
                st.ended.pop_front();
            }
        }
        let Some(t) = st.targets.remove(&slot) else { return };
        self.forget_kept(slot);
        st.remove_output(&t);
        if let Some(c) = &t.spec.container {
            if st.containers.get(c) == Some(&slot) {
                st.containers.remove(c);
            }
        }
        if let Some(maps) = st.maps.as_mut() {
            if let Some(pid) = t.spec.pid {
                let _ = maps.pids.remove(&pid);
            }
            if let Some(cg) = t.spec.cgroup.as_deref().and_then(|c| cgroups::id_of(c).ok()) {
                let _ = maps.cgroups.remove(&cg);
            }
            for cg in lock(&t.cgroups).iter() {
                let _ = maps.cgroups.remove(cg);
            }
            // Children still in the kernel's map for this target are dropped with their entries.
            let stale: Vec<u32> =
                maps.pids.iter().filter_map(Result::ok).filter(|(_, t)| *t == slot).map(|(k, _)| k).collect();
            for pid in stale {
                let _ = maps.pids.remove(&pid);
            }
        }
        st.publish_pids_watched();
        info!(target = %t.id, "target removed");
    }

    fn kernel_counters(st: &State, id: u32) -> TargetCounters {
        st.maps
            .as_ref()
            .and_then(|m| m.counters.get(&id, 0).ok())
            .map(|per_cpu| {
                per_cpu.iter().fold(TargetCounters::default(), |a, c| TargetCounters {
                    writes: a.writes + c.writes,
                    bytes: a.bytes + c.bytes,
                    truncated_bytes: a.truncated_bytes + c.truncated_bytes,
                    lost_events: a.lost_events + c.lost_events,
                    lost_bytes: a.lost_bytes + c.lost_bytes,
                    other_pipe_bytes: a.other_pipe_bytes + c.other_pipe_bytes,
                    spliced_bytes: a.spliced_bytes + c.spliced_bytes,
                })
            })
            .unwrap_or_default()
    }

    fn snapshot_of(&self, st: &State, slot: u32) -> Option<TargetSnapshot> {
        let t = st.targets.get(&slot)?;
        let k = Self::kernel_counters(st, slot);
        let who = t.who();
        let mut spec = t.spec.clone();
        spec.service = None;
        Some(TargetSnapshot {
            id: t.id.clone(),
            spec,
            service_name: who.service.to_string(),
            tenant: who.tenant.to_string(),
            container_identity: who.container.as_deref().cloned(),
            identified: who.identified,
            ended: false,
            writes_total: k.writes,
            written_bytes_total: k.bytes,
            truncated_bytes_total: k.truncated_bytes,
            lost_events_total: k.lost_events,
            lost_bytes_total: k.lost_bytes,
            other_pipe_bytes_total: k.other_pipe_bytes + t.other_pipe_bytes.load(Relaxed),
            spliced_bytes_total: k.spliced_bytes,
            totals: t.counters.totals.snapshot(),
            streams: t.counters.streams(),
        })
    }

    pub fn snapshot(&self) -> PipesSnapshot {
        let st = self.lock();
        let mut targets: Vec<TargetSnapshot> = st.targets.keys().filter_map(|id| self.snapshot_of(&st, *id)).collect();
        targets.extend(st.ended.iter().cloned());
        let containers = self.holding.as_ref().map(|holding| {
            let k = Self::kernel_counters(&st, CONTAINERS_TARGET);
            let c = &self.counts;
            let (held_records, held_bytes, unidentified, opted_out) = holding.counts();
            ContainersSnapshot {
                unclassified_writes_total: k.writes,
                unclassified_written_bytes_total: k.bytes,
                lost_events_total: k.lost_events,
                lost_bytes_total: k.lost_bytes,
                ignored_bytes_total: c.ignored_bytes.load(Relaxed),
                unresolved_bytes_total: c.unresolved_bytes.load(Relaxed),
                held_records,
                held_bytes,
                unidentified_records_total: unidentified,
                opted_out_records_total: opted_out,
                excluded_cgroups: st.excluded.len() as u64,
            }
        });
        PipesSnapshot {
            status: st.status.clone(),
            reason: st.reason.clone(),
            pending_bytes: st.pending_bytes,
            containers,
            targets,
        }
    }

    /// Bytes the last worker's programs captured that this worker could not read.
    pub fn unread_at_start(&self) -> u64 {
        self.unread_at_start
    }

    /// A target that is still watched, by id.
    pub fn live_target(&self, id: &str) -> Option<TargetSnapshot> {
        let st = self.lock();
        let slot = st.targets.values().find(|t| t.id == id)?.slot;
        self.snapshot_of(&st, slot)
    }

    fn target(&self, slot: u32) -> Option<Arc<Target>> {
        self.lock().targets.get(&slot).cloned()
    }

    /// Shutdown: reads what the kernel has already handed over and ends every partial line.
    pub async fn close(&self) {
        if let Some(tx) = &self.commands {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Command::Close(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// A name for this run of the agent: 48 random bits, so that no two runs share target ids.
fn instance_name() -> String {
    format!("{:012x}", crate::values::random_u64() & ((1 << 48) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_runs_have_their_own_target_ids() {
        let (a, b) = (instance_name(), instance_name());
        assert_eq!(a.len(), 12);
        assert_ne!(a, b);
    }

    #[test]
    fn a_containers_pipes_name_its_streams_whatever_the_fd() {
        let unknown = StdPipes::default();
        assert_eq!((unknown.name(7, 1), unknown.name(7, 2)), (Some("stdout"), Some("stderr")));
        let mut p = StdPipes::default();
        assert!(p.add(Some(10), Some(20)).is_empty());
        // `echo x >&2` in a shell writes the stderr pipe through fd 1.
        assert_eq!(p.name(20, 1), Some("stderr"));
        assert_eq!(p.name(10, 2), Some("stdout"));
        // A pipe of its own (`a | b` inside the container) is not the container's output.
        assert_eq!(p.name(30, 1), None);
        // One pipe for both: the fd tells them apart.
        let both = StdPipes { pairs: vec![[Some(10), Some(10)]] };
        assert_eq!((both.name(10, 1), both.name(10, 2)), (Some("stdout"), Some("stderr")));
        // stderr a file (no pipe): its stdout pipe still counts, through any fd.
        let mut out_only = StdPipes::default();
        out_only.add(Some(10), None);
        assert_eq!((out_only.name(10, 3), out_only.name(30, 1)), (Some("stdout"), None));
    }

    #[test]
    fn a_target_keeps_its_latest_pairs_of_pipes() {
        let mut p = StdPipes::default();
        // A container restarted many times: each start brings a pair; the oldest go.
        for start in 0..PAIRS_KEPT as u64 {
            assert!(p.add(Some(100 + start), Some(200 + start)).is_empty());
        }
        assert!(p.add(Some(100), Some(200)).is_empty(), "a pair it has is not added twice");
        assert_eq!(p.add(Some(900), Some(901)), vec![100, 200]);
        assert_eq!(p.all().count(), 2 * PAIRS_KEPT);
        assert_eq!(p.name(100, 1), None);
        assert_eq!(p.name(900, 1), Some("stdout"));
        // A pipe of the oldest pair that a kept pair still has stays.
        let mut shared = StdPipes::default();
        shared.add(Some(1), Some(2));
        for start in 1..PAIRS_KEPT as u64 {
            shared.add(Some(10 + start), Some(2));
        }
        assert_eq!(shared.add(Some(50), Some(2)), vec![1]);
    }
}
