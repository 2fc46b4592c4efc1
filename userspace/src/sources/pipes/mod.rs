//! The pipe source: what watched processes write to their stdout/stderr pipes, captured in
//! the kernel by the eBPF programs (crate `ebpf/`) and read here from the BPF ring buffer.
//!
//! Chunks of one write() are put back together per thread, whole writes are framed into lines
//! per (process, fd) by the one framer, and the records go into the shared ring.

mod btf;
mod probe;
mod tracefs;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use logtap_common::{EventHeader, TargetCounters, EVENT_DATA, EVENT_EXIT, EVENT_WRITE_END, HEADER_LEN, MAX_TARGETS};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::volume::Framing;
use super::{LineStream, Stamp};
use crate::record::Origin;
use crate::ring::Ring;
use crate::stats::{CountersSnapshot, GroupCounters};

/// What to watch, and the identity its records get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// A process (tgid); its children are followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// A cgroup v2 directory; every process in it is watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Module of the records (default: `stdout` or `stderr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// What an unwatch request names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnwatchSpec {
    /// Stop following this process only (its children stay watched).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Remove a target entirely, once what it already wrote is read.
    #[serde(default)]
    pub target: Option<u32>,
}

struct Target {
    id: u32,
    spec: TargetSpec,
    service: Arc<str>,
    counters: Arc<GroupCounters>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetSnapshot {
    pub id: u32,
    #[serde(flatten)]
    pub spec: TargetSpec,
    /// The service its records carry.
    #[serde(rename = "service")]
    pub service_name: String,
    /// Removed (`logtap run` ended, or unwatched); kept among the last ones for their counts.
    pub ended: bool,
    /// Counted in the kernel: calls that wrote to a watched pipe, their bytes, the bytes past
    /// `max_write_capture`, and events (bytes) the BPF ring buffer had no room for.
    pub writes_total: u64,
    pub written_bytes_total: u64,
    pub truncated_bytes_total: u64,
    pub lost_events_total: u64,
    pub lost_bytes_total: u64,
    /// Counted here: records and bytes framed, dropped by the ring, split.
    #[serde(flatten)]
    pub totals: CountersSnapshot,
    pub streams: BTreeMap<String, CountersSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipesSnapshot {
    /// `running`, `disabled` or `unavailable`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes waiting for the rest of their write or line, over all streams.
    pub pending_bytes: u64,
    pub targets: Vec<TargetSnapshot>,
}

struct Maps {
    pids: BpfHashMap<MapData, u32, u32>,
    cgroups: BpfHashMap<MapData, u64, u32>,
    counters: PerCpuArray<MapData, TargetCounters>,
}

struct State {
    maps: Option<Maps>,
    targets: BTreeMap<u32, Arc<Target>>,
    status: String,
    reason: Option<String>,
    pending_bytes: u64,
    /// The last targets removed, with their final counts.
    ended: std::collections::VecDeque<TargetSnapshot>,
}

/// How many removed targets stay visible in the stats.
const ENDED_KEPT: usize = 64;

pub struct PipeSource {
    framing: Framing,
    ring: Arc<Ring>,
    max_capture: u64,
    state: Mutex<State>,
    /// Work for the event loop, which first reads what is already in the ring buffer.
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
}

enum Command {
    /// Forget a target once what it already wrote is read.
    Remove(u32),
    /// Shutdown: read everything, end every partial line.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// The cgroup v2 id of a directory: its inode number.
fn cgroup_id(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).with_context(|| format!("no cgroup at {}", path.display()))?;
    if !m.is_dir() {
        bail!("{} is not a cgroup directory", path.display());
    }
    Ok(m.ino())
}

impl PipeSource {
    /// A source that is not running (disabled, or the kernel refused the programs).
    pub fn new(framing: Framing, ring: Arc<Ring>, max_capture: u64, status: &str, reason: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            framing,
            ring,
            max_capture,
            state: Mutex::new(State {
                maps: None,
                targets: BTreeMap::new(),
                status: status.into(),
                reason,
                pending_bytes: 0,
                ended: std::collections::VecDeque::new(),
            }),
            commands: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads and attaches the programs and starts reading their events on the current tokio
    /// runtime. On failure the source says why in its stats and the agent carries on.
    pub fn start(framing: Framing, ring: Arc<Ring>, max_capture: u64, ring_buffer_bytes: u32) -> Arc<Self> {
        match probe::load(max_capture as u32, ring_buffer_bytes) {
            Ok(loaded) => {
                let source = Self::new(framing, ring, max_capture, "running", None);
                let (tx, rx) = mpsc::unbounded_channel();
                *source.commands.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
                source.lock().maps =
                    Some(Maps { pids: loaded.pids, cgroups: loaded.cgroups, counters: loaded.counters });
                let s = source.clone();
                let ebpf = loaded.ebpf;
                tokio::spawn(async move {
                    // The programs stay attached while `ebpf` lives.
                    let _ebpf = ebpf;
                    if let Err(e) = s.clone().run(loaded.events, rx).await {
                        warn!("the eBPF event reader stopped: {e:#}");
                        let mut st = s.lock();
                        st.status = "unavailable".into();
                        st.reason = Some(format!("{e:#}"));
                    }
                });
                info!("eBPF pipe capture loaded and attached");
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

    /// Starts watching; returns the target's id.
    pub fn watch(&self, spec: &TargetSpec) -> anyhow::Result<u32> {
        if spec.pid.is_some() == spec.cgroup.is_some() {
            bail!("name exactly one of pid or cgroup");
        }
        if let Some(s) = &spec.service {
            logtap_fusefs::validate_volume_name(s).map_err(|e| anyhow::anyhow!("invalid service name {s:?}: {e}"))?;
        }
        if let Some(m) = &spec.module {
            logtap_fusefs::validate_volume_name(m).map_err(|e| anyhow::anyhow!("invalid module name {m:?}: {e}"))?;
        }
        let cgroup = spec.cgroup.as_deref().map(cgroup_id).transpose()?;
        if let Some(pid) = spec.pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("no process {pid}");
            }
        }
        let mut st = self.lock();
        let State { maps, targets, status, reason, .. } = &mut *st;
        let Some(maps) = maps.as_mut() else {
            bail!("eBPF pipe capture is {status}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default());
        };
        // One target per process or cgroup: a second would silently take the first's records.
        if let Some(t) = spec.pid.and_then(|pid| maps.pids.get(&pid, 0).ok()) {
            bail!("process {} is already watched by target {t}", spec.pid.unwrap_or_default());
        }
        if let Some(t) = cgroup.and_then(|cg| maps.cgroups.get(&cg, 0).ok()) {
            bail!(
                "cgroup {} is already watched by target {t}",
                spec.cgroup.as_deref().unwrap_or(std::path::Path::new("")).display()
            );
        }
        let id = (0..MAX_TARGETS).find(|i| !targets.contains_key(i)).context("too many watch targets")?;
        // Fresh counters for a reused slot.
        maps.counters
            .set(
                id,
                aya::maps::PerCpuValues::try_from(vec![
                    TargetCounters::default();
                    aya::util::nr_cpus().map_err(|(_, e)| e)?
                ])?,
                0,
            )
            .context("resetting the target's counters")?;
        if let Some(pid) = spec.pid {
            maps.pids.insert(pid, id, 0).context("adding the process to the watch map")?;
        }
        if let Some(cg) = cgroup {
            maps.cgroups.insert(cg, id, 0).context("adding the cgroup to the watch map")?;
        }
        let service = spec.service.clone().unwrap_or_else(|| match (spec.pid, &spec.cgroup) {
            (Some(pid), _) => format!("pid-{pid}"),
            (_, Some(cg)) => {
                cg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "cgroup".into())
            }
            _ => "unknown".into(),
        });
        targets.insert(
            id,
            Arc::new(Target { id, spec: spec.clone(), service: service.as_str().into(), counters: Arc::default() }),
        );
        info!(target = id, ?spec, "watching");
        Ok(id)
    }

    pub fn unwatch(&self, spec: &UnwatchSpec) -> anyhow::Result<()> {
        let mut st = self.lock();
        let Some(maps) = st.maps.as_mut() else { bail!("eBPF pipe capture is not running") };
        if let Some(pid) = spec.pid {
            maps.pids.remove(&pid).with_context(|| format!("process {pid} is not watched"))?;
        }
        if let Some(cg) = &spec.cgroup {
            maps.cgroups.remove(&cgroup_id(cg)?).with_context(|| format!("cgroup {} is not watched", cg.display()))?;
        }
        if let Some(id) = spec.target {
            if !st.targets.contains_key(&id) {
                bail!("no target {id}");
            }
            if let Some(tx) = &*self.commands.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = tx.send(Command::Remove(id));
            }
        }
        Ok(())
    }

    fn remove_target(&self, id: u32) {
        let mut st = self.lock();
        if let Some(mut last) = self.snapshot_of(&st, id) {
            last.ended = true;
            st.ended.push_back(last);
            if st.ended.len() > ENDED_KEPT {
                st.ended.pop_front();
            }
        }
        let target = st.targets.get(&id).cloned();
        if let (Some(maps), Some(t)) = (st.maps.as_mut(), target) {
            if let Some(pid) = t.spec.pid {
                let _ = maps.pids.remove(&pid);
            }
            if let Some(cg) = t.spec.cgroup.as_deref().and_then(|c| cgroup_id(c).ok()) {
                let _ = maps.cgroups.remove(&cg);
            }
            // Children still in the kernel's map for this target are dropped with their entries.
            let stale: Vec<u32> =
                maps.pids.iter().filter_map(Result::ok).filter(|(_, t)| *t == id).map(|(k, _)| k).collect();
            for pid in stale {
                let _ = maps.pids.remove(&pid);
            }
        }
        st.targets.remove(&id);
        info!(target = id, "target removed");
    }

    fn snapshot_of(&self, st: &State, id: u32) -> Option<TargetSnapshot> {
        let t = st.targets.get(&id)?;
        let k = st
            .maps
            .as_ref()
            .and_then(|m| m.counters.get(&t.id, 0).ok())
            .map(|per_cpu| {
                per_cpu.iter().fold(TargetCounters::default(), |a, c| TargetCounters {
                    writes: a.writes + c.writes,
                    bytes: a.bytes + c.bytes,
                    truncated_bytes: a.truncated_bytes + c.truncated_bytes,
                    lost_events: a.lost_events + c.lost_events,
                    lost_bytes: a.lost_bytes + c.lost_bytes,
                })
            })
            .unwrap_or_default();
        let mut spec = t.spec.clone();
        spec.service = None;
        Some(TargetSnapshot {
            id: t.id,
            spec,
            service_name: t.service.to_string(),
            ended: false,
            writes_total: k.writes,
            written_bytes_total: k.bytes,
            truncated_bytes_total: k.truncated_bytes,
            lost_events_total: k.lost_events,
            lost_bytes_total: k.lost_bytes,
            totals: t.counters.totals.snapshot(),
            streams: t.counters.streams(),
        })
    }

    pub fn snapshot(&self) -> PipesSnapshot {
        let st = self.lock();
        let mut targets: Vec<TargetSnapshot> = st.targets.keys().filter_map(|id| self.snapshot_of(&st, *id)).collect();
        targets.extend(st.ended.iter().cloned());
        PipesSnapshot { status: st.status.clone(), reason: st.reason.clone(), pending_bytes: st.pending_bytes, targets }
    }

    fn target(&self, id: u32) -> Option<Arc<Target>> {
        self.lock().targets.get(&id).cloned()
    }

    /// Shutdown: reads what the kernel has already handed over and ends every partial line.
    pub async fn close(&self) {
        let tx = self.commands.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Command::Close(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }

    async fn run(
        self: Arc<Self>,
        events: RingBuf<MapData>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> anyhow::Result<()> {
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays
        // open for as long as it is registered.
        let mut events = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the BPF ring buffer")?;
        let mut asm = Reassembly::default();
        // The kernel wakes us only when a lot is waiting; this timer collects the rest.
        let mut drain = tokio::time::interval(Duration::from_millis(10));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard.context("waiting on the BPF ring buffer")?;
                    self.drain(guard.get_inner_mut(), &mut asm);
                    guard.clear_ready();
                }
                Some(command) = commands.recv() => {
                    // Read what is already there before acting.
                    self.read_events(events.get_mut(), &mut asm);
                    let close = match command {
                        Command::Remove(id) => {
                            asm.end_target(id);
                            self.remove_target(id);
                            None
                        }
                        Command::Close(done) => {
                            let at = Stamp::now();
                            for s in asm.streams.values_mut() {
                                s.lines.end_record_into(at, &mut asm.batch);
                            }
                            Some(done)
                        }
                    };
                    self.ring.push(std::mem::take(&mut asm.batch));
                    if let Some(done) = close {
                        let _ = done.send(());
                        return Ok(());
                    }
                }
                _ = drain.tick() => self.drain(events.get_mut(), &mut asm),
                _ = tick.tick() => {
                    let now = Instant::now();
                    for s in asm.streams.values_mut() {
                        s.lines.idle(now, self.framing.partial_flush);
                    }
                    let pending = asm.pending_bytes();
                    self.lock().pending_bytes = pending;
                }
            }
        }
    }

    /// Reads every waiting event; the records go to the ring in one push.
    fn drain(&self, events: &mut RingBuf<MapData>, asm: &mut Reassembly) {
        self.read_events(events, asm);
        let batch = std::mem::take(&mut asm.batch);
        self.ring.push(batch);
    }

    fn read_events(&self, events: &mut RingBuf<MapData>, asm: &mut Reassembly) {
        asm.stamp = Stamp::now();
        while let Some(item) = events.next() {
            let Some(header) = item.get(..HEADER_LEN) else { continue };
            // SAFETY: EventHeader is plain old data; read_unaligned copes with any alignment.
            let h: EventHeader = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
            match h.kind {
                EVENT_DATA => {
                    let Some(data) = item.get(HEADER_LEN..HEADER_LEN + h.len as usize) else { continue };
                    self.data(&h, data, asm);
                }
                EVENT_WRITE_END => {
                    if let Some(partial) = asm.writes.remove(&(h.tid, h.fd)) {
                        self.deliver(asm, &partial.header, &partial.data, true);
                    }
                }
                EVENT_EXIT => {
                    // Writes whose chunks were lost still deliver what came.
                    let threads: Vec<(u32, u32)> =
                        asm.writes.iter().filter(|(_, w)| w.header.tgid == h.tgid).map(|(k, _)| *k).collect();
                    for key in threads {
                        if let Some(partial) = asm.writes.remove(&key) {
                            self.deliver(asm, &partial.header, &partial.data, true);
                        }
                    }
                    asm.end_process(h.tgid);
                }
                _ => {}
            }
        }
    }

    fn data(&self, h: &EventHeader, data: &[u8], asm: &mut Reassembly) {
        let want = h.total.min(self.max_capture);
        let end = h.offset + data.len() as u64;
        let key = (h.tid, h.fd);
        if h.offset == 0 {
            // A thread has one write in flight: an unfinished one before this lost chunks in
            // the kernel (counted there); deliver what came of it.
            if let Some(partial) = asm.writes.remove(&key) {
                self.deliver(asm, &partial.header, &partial.data, true);
            }
            if end >= want {
                // The common case: a write in one chunk.
                self.deliver(asm, h, data, h.total > want);
                return;
            }
        }
        let w = asm.writes.entry(key).or_insert_with(|| Partial { header: *h, data: Vec::new() });
        w.data.extend_from_slice(data);
        if end >= want {
            if let Some(done) = asm.writes.remove(&key) {
                self.deliver(asm, h, &done.data, h.total > want);
            }
        }
    }

    /// A whole write (or what came of it) goes to its (process, fd) line stream. `cut` ends
    /// the record after it: the rest of the write, newline included, was not copied.
    fn deliver(&self, asm: &mut Reassembly, h: &EventHeader, bytes: &[u8], cut: bool) {
        let stream = asm.streams.entry((h.tgid, h.fd)).or_insert_with(|| {
            let target = self.target(h.target);
            self.stream(h, target.as_deref())
        });
        stream.lines.push_into(bytes, asm.stamp, &mut asm.batch);
        if cut {
            stream.lines.end_record_into(asm.stamp, &mut asm.batch);
        }
    }

    fn stream(&self, h: &EventHeader, target: Option<&Target>) -> PipeStream {
        let fd_name: &str = if h.fd == 2 { "stderr" } else { "stdout" };
        let (service, module, counters) = match target {
            Some(t) => (
                t.service.clone(),
                t.spec.module.as_deref().unwrap_or(fd_name).into(),
                t.counters.stream(&format!("{}/{fd_name}", h.tgid)),
            ),
            None => ("unknown".into(), fd_name.into(), crate::stats::StreamCounters::detached()),
        };
        let origin = Arc::new(Origin {
            host: self.framing.host.clone(),
            pid: h.tgid,
            volume: "".into(),
            service,
            module,
            path: fd_name.into(),
            counters,
        });
        PipeStream {
            target: h.target,
            lines: LineStream::new(origin, self.framing.max_record_bytes, self.ring.clone()),
        }
    }
}

struct PipeStream {
    target: u32,
    lines: LineStream,
}

/// A write whose chunks are still arriving.
struct Partial {
    header: EventHeader,
    data: Vec<u8>,
}

/// Hashes the small integer keys of the reassembly maps (a multiply and a rotate instead of
/// SipHash, which showed in profiles at a million events a second; the keys are pids and fds
/// from the kernel, not attacker-chosen strings).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type IdMap<V> = HashMap<(u32, u32), V, std::hash::BuildHasherDefault<IdHasher>>;

struct Reassembly {
    /// Writes whose chunks are still arriving, per (tid, fd).
    writes: IdMap<Partial>,
    /// Line streams per (tgid, fd).
    streams: IdMap<PipeStream>,
    /// Records of this drain, pushed to the ring together.
    batch: Vec<crate::record::Record>,
    /// When this drain began.
    stamp: Stamp,
}

impl Default for Reassembly {
    fn default() -> Self {
        Self { writes: IdMap::default(), streams: IdMap::default(), batch: Vec::new(), stamp: Stamp::now() }
    }
}

impl Reassembly {
    /// A process exited: its partial lines end and its state goes.
    fn end_process(&mut self, tgid: u32) {
        for fd in [1, 2] {
            if let Some(mut s) = self.streams.remove(&(tgid, fd)) {
                s.lines.end_record_into(self.stamp, &mut self.batch);
            }
        }
    }

    fn end_target(&mut self, target: u32) {
        let keys: Vec<(u32, u32)> = self.streams.iter().filter(|(_, s)| s.target == target).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(mut s) = self.streams.remove(&k) {
                s.lines.end_record_into(self.stamp, &mut self.batch);
            }
        }
    }

    fn pending_bytes(&self) -> u64 {
        let writes: usize = self.writes.values().map(|w| w.data.len()).sum();
        let lines: usize = self.streams.values().map(|s| s.lines.pending()).sum();
        (writes + lines) as u64
    }
}
