//! The event loop: reads the BPF ring buffer, puts the chunks of one write() back together per
//! thread, frames whole writes into lines per (process, fd) with the one framer, and pushes the
//! records into the shared ring. Container records wait here ("held") until the runtime has
//! named their container.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use logtap_common::{EventHeader, CONTAINERS_TARGET, EVENT_DATA, EVENT_EXIT, EVENT_WRITE_END, HEADER_LEN};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::events::Events;
use super::{Command, PipeSource, Target, Who};
use crate::api::TargetSpec;
use crate::counters::{GroupCounters, StreamCounters};
use crate::discovery::identity::Identity;
use crate::discovery::Lookup;
use crate::host::cgroups;
use crate::record::{Origin, Record};
use crate::sources::{reorigin_all, LineStream, Stamp};
use crate::values::lock;

/// Records a drain of the BPF ring buffer gathers before it pushes them.
const PUSH_EVERY: usize = 4096;
/// How long a cgroup found gone is taken as gone without looking again.
const UNRESOLVED_KEPT: Duration = Duration::from_secs(1);
/// How often cgroups the kernel skips are checked for removal (their entries then go).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

struct PipeStream {
    target: u32,
    lines: LineStream,
    /// Where its own counters are listed (`{tgid}/stdout` of its target), while it lives.
    listed: Option<(Arc<GroupCounters>, String)>,
}

impl Drop for PipeStream {
    /// A process's streams end with it: its counts stay in the target's totals, and its entry
    /// goes, so that a target running many short processes keeps a bounded list.
    fn drop(&mut self) {
        if let Some((group, name)) = &self.listed {
            group.stream_gone(name, &self.lines.origin.counters.stream);
        }
    }
}

/// A write whose chunks are still arriving.
struct Partial {
    header: EventHeader,
    data: Vec<u8>,
}

/// Records of a container the runtime has not named yet.
struct Held {
    since: Instant,
    records: Vec<Record>,
    /// The container died meanwhile: its target goes once the records are out.
    died: bool,
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

type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

pub(super) struct Reassembly {
    /// Writes whose chunks are still arriving, per (tid, fd).
    writes: IdMap<(u32, u32), Partial>,
    /// Line streams per (tgid, pipe inode).
    streams: IdMap<(u32, u64), PipeStream>,
    /// Records of this drain, pushed to the ring together.
    batch: Vec<Record>,
    /// When this drain began.
    stamp: Stamp,
    /// What each cgroup seen under `CONTAINERS_TARGET` is: its container's target, or `None`
    /// (not captured).
    cgroups: IdMap<u64, Option<u32>>,
    /// cgroups found gone (no path), and when: the events they queued before going do not
    /// each walk the tree again. Kept briefly, as cgroup ids (inodes) are reused.
    unresolved: IdMap<u64, Instant>,
    /// Paths of cgroups, when every container is captured.
    index: Option<cgroups::Index>,
    held: IdMap<u32, Held>,
    /// The held records and bytes last told to the holding (its gauges are over both sources).
    published: (u64, u64),
    last_prune: Instant,
}

fn held_bytes(h: &Held) -> u64 {
    h.records.iter().map(|r| r.bytes.len() as u64).sum()
}

/// Where a target's records go now: held for their identity, or into this drain's batch.
fn out_for<'a>(held: &'a mut IdMap<u32, Held>, batch: &'a mut Vec<Record>, target: u32) -> &'a mut Vec<Record> {
    match held.get_mut(&target) {
        Some(h) => &mut h.records,
        None => batch,
    }
}

impl Reassembly {
    fn new(index: Option<cgroups::Index>) -> Self {
        Self {
            writes: IdMap::default(),
            streams: IdMap::default(),
            batch: Vec::new(),
            stamp: Stamp::now(),
            cgroups: IdMap::default(),
            unresolved: IdMap::default(),
            index,
            held: IdMap::default(),
            published: (0, 0),
            last_prune: Instant::now(),
        }
    }

    /// A process exited: its partial lines end and its state goes.
    fn end_process(&mut self, tgid: u32) {
        self.end_streams(|k, _| k.0 == tgid);
    }

    fn end_target(&mut self, target: u32) {
        self.end_streams(|_, s| s.target == target);
    }

    fn end_streams(&mut self, which: impl Fn(&(u32, u64), &PipeStream) -> bool) {
        let keys: Vec<(u32, u64)> = self.streams.iter().filter(|(k, s)| which(k, s)).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(mut s) = self.streams.remove(&k) {
                s.lines.end_record(self.stamp, out_for(&mut self.held, &mut self.batch, s.target));
            }
        }
    }

    fn pending_bytes(&self) -> u64 {
        let writes: usize = self.writes.values().map(|w| w.data.len()).sum();
        let lines: usize = self.streams.values().map(|s| s.lines.pending()).sum();
        (writes + lines) as u64
    }

    fn held_totals(&self) -> (u64, u64) {
        self.held.values().fold((0, 0), |(r, b), h| (r + h.records.len() as u64, b + held_bytes(h)))
    }
}

impl PipeSource {
    pub(super) async fn run(
        self: Arc<Self>,
        events: Events,
        earlier: Option<Events>,
        mut commands: mpsc::Receiver<Command>,
        index: Option<cgroups::Index>,
    ) -> anyhow::Result<()> {
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays
        // open for as long as it is registered.
        let mut events = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the BPF ring buffer")?;
        let mut asm = Reassembly::new(index);
        // What the replaced programs of the last worker captured comes before this worker's.
        if let Some(mut earlier) = earlier {
            self.drain(&mut earlier, &mut asm);
            // What both workers' programs captured is delivered once.
            let copies = earlier.take_copies();
            debug!(both = copies.len(), "the last worker's events are read");
            events.get_mut().add_copies(copies);
        }
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
                            self.forget_target(id, &mut asm);
                            None
                        }
                        Command::Identified(container) => {
                            self.identified_now(&container, &mut asm);
                            None
                        }
                        Command::Died(container) => {
                            self.died_now(&container, &mut asm);
                            None
                        }
                        Command::Close(done) => {
                            let at = asm.stamp;
                            let Reassembly { streams, held, batch, .. } = &mut asm;
                            for s in streams.values_mut() {
                                s.lines.end_record(at, out_for(held, batch, s.target));
                            }
                            let targets: Vec<u32> = asm.held.keys().copied().collect();
                            for t in targets {
                                self.release(t, &mut asm);
                            }
                            Some(done)
                        }
                    };
                    self.push_read(std::mem::take(&mut asm.batch), events.get_mut());
                    self.publish_held(&mut asm);
                    if let Some(done) = close {
                        let _ = done.send(());
                        return Ok(());
                    }
                }
                _ = drain.tick() => self.drain(events.get_mut(), &mut asm),
                _ = tick.tick() => self.tick(&mut asm),
            }
        }
    }

    fn tick(&self, asm: &mut Reassembly) {
        let now = Instant::now();
        let partial_flush = self.framing.partial_flush;
        let Reassembly { streams, held, batch, .. } = &mut *asm;
        for s in streams.values_mut() {
            s.lines.idle(now, partial_flush, out_for(held, batch, s.target));
        }
        // Held too long, or too much held: out with the container's id only, oldest first.
        let mut late = Vec::new();
        if let Some(holding) = &self.holding {
            self.publish_held(asm);
            let mut all: Vec<(Instant, u32)> = asm.held.iter().map(|(t, h)| (h.since, *t)).collect();
            all.sort();
            // Too much held is counted over both sources.
            let mut bytes = asm.published.1;
            let others = holding.counts().1.saturating_sub(bytes);
            for (since, t) in all {
                if holding.due(since) || bytes + others > holding.limit_bytes() {
                    bytes -= asm.held.get(&t).map_or(0, held_bytes);
                    late.push(t);
                }
            }
        }
        for t in late {
            warn!(target = t, "container not named by the runtime in time; its records go out with its id only");
            self.release(t, asm);
        }
        if now.duration_since(asm.last_prune) >= PRUNE_EVERY {
            asm.last_prune = now;
            self.prune_excluded(asm);
        }
        self.ring.push(std::mem::take(&mut asm.batch));
        self.publish_held(asm);
        self.lock().pending_bytes = asm.pending_bytes();
    }

    fn publish_held(&self, asm: &mut Reassembly) {
        let Some(holding) = &self.holding else { return };
        let (records, bytes) = asm.held_totals();
        let (was_records, was_bytes) = asm.published;
        holding.held(records as i64 - was_records as i64, bytes as i64 - was_bytes as i64);
        asm.published = (records, bytes);
    }

    /// Removed cgroups leave the kernel's skip list and the classification cache.
    fn prune_excluded(&self, asm: &mut Reassembly) {
        let Some(index) = asm.index.as_mut() else { return };
        let live = index.live_ids();
        asm.cgroups.retain(|id, _| live.contains(id));
        asm.unresolved.retain(|_, at| at.elapsed() < UNRESOLVED_KEPT);
        let mut st = self.lock();
        let super::State { maps, excluded, .. } = &mut *st;
        let gone: Vec<u64> = excluded.iter().filter(|id| !live.contains(id)).copied().collect();
        for id in gone {
            excluded.remove(&id);
            if let Some(maps) = maps.as_mut() {
                let _ = maps.cgroups.remove(&id);
            }
        }
    }

    /// Reads every waiting event; the records go to the ring in one push, and only then is their
    /// space the kernel's again.
    fn drain(&self, events: &mut Events, asm: &mut Reassembly) {
        self.read_events(events, asm);
        self.push_read(std::mem::take(&mut asm.batch), events);
    }

    /// Records of events read: pushed, with how far they reach, before their space goes back.
    fn push_read(&self, batch: Vec<Record>, events: &mut Events) {
        match events.mark() {
            Some(read) => self.ring.push_events(batch, read),
            None => self.ring.push(batch),
        }
        events.commit();
    }

    fn read_events(&self, events: &mut Events, asm: &mut Reassembly) {
        asm.stamp = Stamp::now();
        loop {
            if asm.batch.len() >= PUSH_EVERY {
                // A long drain goes out in pieces: the sinks start on it while it is read.
                self.push_read(std::mem::take(&mut asm.batch), events);
            }
            let Some(item) = events.next() else { break };
            let Some(header) = item.get(..HEADER_LEN) else { continue };
            // SAFETY: EventHeader is plain old data; read_unaligned copes with any alignment.
            let mut h: EventHeader = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
            if h.target == CONTAINERS_TARGET {
                match self.classify(h.cgroup, asm) {
                    Ok(target) => h.target = target,
                    Err(skipped) => {
                        if h.kind == EVENT_DATA {
                            skipped.fetch_add(u64::from(h.len), Relaxed);
                        }
                        continue;
                    }
                }
            }
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

    /// The target of a cgroup the kernel has no target for: its container's, made on first
    /// sight. Otherwise the counter its bytes are skipped under (no container, or gone).
    fn classify(&self, cgroup: u64, asm: &mut Reassembly) -> Result<u32, &std::sync::atomic::AtomicU64> {
        let known = asm.cgroups.get(&cgroup).copied();
        let target = match known {
            Some(known) => known,
            None => {
                if asm.unresolved.get(&cgroup).is_some_and(|at| at.elapsed() < UNRESOLVED_KEPT) {
                    return Err(&self.counts.unresolved_bytes);
                }
                let path = asm.index.as_mut().and_then(|i| i.path_of(cgroup).map(str::to_string));
                let Some(path) = path else {
                    debug!(cgroup, "a cgroup was removed before it could be told apart");
                    asm.unresolved.insert(cgroup, Instant::now());
                    return Err(&self.counts.unresolved_bytes);
                };
                let target = match cgroups::container_id(&path) {
                    Some(id) => self.container_cgroup(&id, cgroup, &path, asm),
                    None => None,
                };
                asm.cgroups.insert(cgroup, target);
                target
            }
        };
        match target {
            Some(t) => Ok(t),
            None => {
                // Also after an unwatch took the kernel's entry away.
                self.exclude(cgroup);
                Err(&self.counts.ignored_bytes)
            }
        }
    }

    /// A cgroup of container `id`: it joins the container's target (made now if need be), or is
    /// skipped if the container opted out.
    fn container_cgroup(&self, id: &str, cgroup: u64, path: &str, asm: &mut Reassembly) -> Option<u32> {
        let lookup = self.holding.as_ref().map_or(Lookup::Unknown, |h| h.directory().lookup(id));
        if matches!(&lookup, Lookup::Known(i) if !i.stdout) {
            return None;
        }
        // Files read before the source's lock is taken: the control socket waits on it.
        let init_pipes = asm.index.as_ref().and_then(|i| i.init_process(path)).map(crate::host::output_pipes);
        let mut st = self.lock();
        let target = match st.containers.get(id).and_then(|t| st.targets.get(t)).cloned() {
            Some(t) => t,
            None => {
                let who = match &lookup {
                    Lookup::Known(i) => Who::of(i, true),
                    Lookup::Pending | Lookup::Unknown => Who::of(&Identity::unnamed(id), false),
                };
                let spec = TargetSpec { container: Some(id.to_string()), ..Default::default() };
                let t = match self.add_target(&mut st, spec, who) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(container = id, "cannot capture a container: {e:#}");
                        return None;
                    }
                };
                if matches!(lookup, Lookup::Pending) {
                    asm.held.insert(t.slot, Held { since: Instant::now(), records: Vec::new(), died: false });
                }
                t
            }
        };
        lock(&target.cgroups).push(cgroup);
        if let Some((stdout, stderr)) = init_pipes {
            st.add_output(&target, stdout, stderr);
        }
        self.keep(&target);
        if let Some(maps) = st.maps.as_mut() {
            if let Err(e) = maps.cgroups.insert(cgroup, target.slot, 0) {
                warn!(cgroup, "cannot add a container's cgroup to the watch map: {e}");
            }
        }
        debug!(container = id, target = %target.id, cgroup, "container cgroup");
        Some(target.slot)
    }

    fn identified_now(&self, container: &str, asm: &mut Reassembly) {
        let Some(target) = self.lock().containers.get(container).copied() else { return };
        let Some(holding) = &self.holding else { return };
        match holding.directory().lookup(container) {
            Lookup::Pending => {}
            Lookup::Known(i) if !i.stdout => {
                // Opted out: what was held is not wanted.
                if let Some(h) = asm.held.remove(&target) {
                    holding.opted_out(h.records.len() as u64);
                }
                asm.streams.retain(|_, s| s.target != target);
                let cgroups = self.target(target).map(|t| lock(&t.cgroups).clone()).unwrap_or_default();
                self.forget_target(target, asm);
                for cg in cgroups {
                    asm.cgroups.insert(cg, None);
                    self.exclude(cg);
                }
            }
            Lookup::Known(i) => {
                self.rename(target, Who::of(&i, true), asm);
                self.release(target, asm);
            }
            Lookup::Unknown => self.release(target, asm),
        }
    }

    /// A target learns whose it is: its streams' next records carry it.
    fn rename(&self, target: u32, who: Who, asm: &mut Reassembly) {
        let Some(t) = self.target(target) else { return };
        if t.who() == who {
            return;
        }
        *lock(&t.who) = who.clone();
        self.keep(&t);
        for s in asm.streams.values_mut().filter(|s| s.target == target) {
            s.lines.origin = reorigin(&s.lines.origin, &who);
        }
    }

    /// Held records go out with what is known of their target by now.
    fn release(&self, target: u32, asm: &mut Reassembly) {
        let Some(held) = asm.held.remove(&target) else { return };
        let who = self.target(target).map(|t| t.who());
        let mut records = held.records;
        if let Some(holding) = &self.holding {
            holding.released(records.len() as u64, who.as_ref().is_some_and(|w| w.identified));
        }
        if let Some(who) = &who {
            reorigin_all(&mut records, |o| reorigin(o, who));
        }
        asm.batch.extend(records);
        if held.died {
            self.forget_target(target, asm);
        }
    }

    fn died_now(&self, container: &str, asm: &mut Reassembly) {
        let Some(target) = self.lock().containers.get(container).copied() else { return };
        asm.end_target(target);
        match asm.held.get_mut(&target) {
            Some(h) => h.died = true,
            None => self.forget_target(target, asm),
        }
    }

    fn forget_target(&self, target: u32, asm: &mut Reassembly) {
        asm.cgroups.retain(|_, t| *t != Some(target));
        asm.held.remove(&target);
        self.remove_target(target);
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
        let Reassembly { streams, held, batch, stamp, .. } = asm;
        let stream = match streams.entry((h.tgid, h.pipe)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let target = self.target(h.target);
                match self.stream(h, target.as_deref()) {
                    Some(s) => e.insert(s),
                    None => {
                        if let Some(t) = target {
                            t.other_pipe_bytes.fetch_add(bytes.len() as u64, Relaxed);
                        }
                        return;
                    }
                }
            }
        };
        let out = out_for(held, batch, stream.target);
        stream.lines.push(bytes, *stamp, out);
        if cut {
            stream.lines.end_record(*stamp, out);
        }
    }

    /// A new stream of a target; `None` for a pipe that is not the target's stdout or stderr.
    fn stream(&self, h: &EventHeader, target: Option<&Target>) -> Option<PipeStream> {
        let by_fd = if h.fd == 2 { "stderr" } else { "stdout" };
        let (origin, listed) = match target {
            Some(t) => {
                let fd_name = lock(&t.pipes).name(h.pipe, h.fd)?;
                let name = format!("{}/{fd_name}", h.tgid);
                let counters = t.counters.stream(&name);
                (t.who().origin(&self.framing.host, h.tgid, fd_name, counters), Some((t.counters.clone(), name)))
            }
            None => {
                let who = Who {
                    service: "unknown".into(),
                    module: None,
                    tenant: "".into(),
                    container: None,
                    identified: false,
                };
                (who.origin(&self.framing.host, h.tgid, by_fd, StreamCounters::detached()), None)
            }
        };
        Some(PipeStream { target: h.target, lines: LineStream::new(origin, self.framing.max_record_bytes), listed })
    }
}

/// The same stream, now known as `who`'s.
fn reorigin(old: &Origin, who: &Who) -> Arc<Origin> {
    who.origin(&old.host, old.pid, &old.path, old.counters.clone())
}
