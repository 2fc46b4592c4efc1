//! What a worker must tell the next one, beyond the volumes' namespace: whose records the ring
//! holds (each stream slot's origin), the volumes defined through the API, the FUSE INIT of
//! the mount, and the pipe source's watch targets (the kernel's maps hold their slots). Kept in a [`Journal`] in memory the keeper holds; rewritten when it grows.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

use logtap_fusefs::Journal;
use serde::{Deserialize, Serialize};

use crate::api::{Container, TargetSpec, VolumeSpec};
use crate::counters::StreamCounters;
use crate::record::Origin;
use crate::values::lock;

/// A journal holding this much beyond its live entries is rewritten.
const REWRITE_AFTER: u64 = 1 << 20;

/// An origin without its counters (those are the worker's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginImage {
    pub host: String,
    pub pid: u32,
    pub volume: String,
    pub service: String,
    pub module: String,
    pub path: String,
    pub tenant: String,
    pub container: Option<Container>,
}

impl OriginImage {
    pub fn of(o: &Origin) -> Self {
        Self {
            host: o.host.to_string(),
            pid: o.pid,
            volume: o.volume.to_string(),
            service: o.service.to_string(),
            module: o.module.to_string(),
            path: o.path.to_string(),
            tenant: o.tenant.to_string(),
            container: o.container.as_deref().cloned(),
        }
    }

    /// For records whose stream's origin was not kept.
    pub fn unknown() -> Self {
        Self {
            host: String::new(),
            pid: 0,
            volume: String::new(),
            service: "unknown".into(),
            module: "unknown".into(),
            path: String::new(),
            tenant: String::new(),
            container: None,
        }
    }

    /// The origin again, counted apart from the new worker's streams.
    pub fn origin(&self) -> Origin {
        Origin {
            host: self.host.as_str().into(),
            pid: self.pid,
            volume: self.volume.as_str().into(),
            service: self.service.as_str().into(),
            module: self.module.as_str().into(),
            path: self.path.as_str().into(),
            tenant: self.tenant.as_str().into(),
            container: self.container.clone().map(Arc::new),
            counters: StreamCounters::detached(),
        }
    }
}

/// A watch target of the pipe source, as the next worker needs it to go on where the kernel's
/// maps (which outlive the worker) still name its slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetImage {
    pub slot: u32,
    /// The id users hold (`logtap run` unwatches by it): it stays valid across restarts.
    pub id: String,
    pub spec: TargetSpec,
    pub service: String,
    pub module: Option<String>,
    pub tenant: String,
    pub container: Option<Container>,
    pub identified: bool,
    pub cgroups: Vec<u64>,
    /// stdout's and stderr's pipe inode, per start.
    pub pipes: Vec<[Option<u64>; 2]>,
}

/// What names the pipe source's targets: ids are `{instance}-{n}`, `n` below `next` given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetNames {
    pub instance: String,
    pub next: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    Init(Vec<u8>),
    /// `ring`: the generation of the ring the slot is of (0: written before generations).
    Stream {
        #[serde(default)]
        ring: u64,
        id: u32,
        origin: OriginImage,
    },
    StreamGone {
        #[serde(default)]
        ring: u64,
        id: u32,
    },
    /// Only this ring's origins are needed from here on: it is the one kept.
    OnlyRing {
        ring: u64,
    },
    Volume(VolumeSpec),
    Names(TargetNames),
    Target(TargetImage),
    TargetGone {
        slot: u32,
    },
}

#[derive(Default)]
struct Live {
    init: Vec<u8>,
    /// Per ring generation and slot.
    streams: HashMap<(u64, u32), OriginImage>,
    volumes: BTreeMap<String, VolumeSpec>,
    names: Option<TargetNames>,
    targets: BTreeMap<u32, TargetImage>,
}

pub struct WorkerState {
    journal: Journal,
    live: Mutex<Live>,
}

impl WorkerState {
    /// Fresh, or what an earlier worker kept in `journal`.
    pub fn open(journal: Journal) -> io::Result<Arc<Self>> {
        let mut live = Live::default();
        for e in journal.entries()? {
            let e: Entry = serde_json::from_slice(&e)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("the kept worker state: {e}")))?;
            live.apply(e);
        }
        Ok(Arc::new(Self { journal, live: Mutex::new(live) }))
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn put(&self, e: Entry) {
        let mut live = lock(&self.live);
        let write = serde_json::to_vec(&e).map_err(io::Error::other).and_then(|b| self.journal.append(&b));
        if let Err(err) = write {
            tracing::warn!("cannot keep the worker's state for a restart: {err}");
        }
        live.apply(e);
        let size = (live.streams.len() + live.volumes.len() + live.targets.len()) as u64 * 512;
        if self.journal.len() > REWRITE_AFTER + 4 * size {
            let image: Vec<Vec<u8>> = live.image().iter().filter_map(|e| serde_json::to_vec(e).ok()).collect();
            if let Err(err) = self.journal.rewrite(&image) {
                tracing::warn!("cannot rewrite the worker's state: {err}");
            }
        }
    }

    pub fn init(&self) -> Vec<u8> {
        lock(&self.live).init.clone()
    }

    pub fn set_init(&self, init: &[u8]) {
        self.put(Entry::Init(init.to_vec()));
    }

    /// Stream slot `id` of ring generation `ring` now holds `origin`'s records.
    pub fn stream(&self, ring: u64, id: u32, origin: &Origin) {
        self.put(Entry::Stream { ring, id, origin: OriginImage::of(origin) });
    }

    pub fn stream_gone(&self, ring: u64, id: u32) {
        self.put(Entry::StreamGone { ring, id });
    }

    /// The origins of ring generation `ring`'s slots. Two rings' are kept while a worker takes
    /// over the last one's: until the keeper holds the new ring, the old one is the kept one.
    pub fn streams(&self, ring: u64) -> HashMap<u32, OriginImage> {
        let live = lock(&self.live);
        live.streams.iter().filter(|((r, _), _)| *r == ring).map(|((_, id), o)| (*id, o.clone())).collect()
    }

    /// The keeper holds ring generation `ring` now: the others' origins go.
    pub fn only_ring(&self, ring: u64) {
        self.put(Entry::OnlyRing { ring });
    }

    pub fn volume(&self, spec: &VolumeSpec) {
        self.put(Entry::Volume(spec.clone()));
    }

    pub fn volumes(&self) -> Vec<VolumeSpec> {
        lock(&self.live).volumes.values().cloned().collect()
    }

    pub fn set_target_names(&self, names: &TargetNames) {
        self.put(Entry::Names(names.clone()));
    }

    pub fn target_names(&self) -> Option<TargetNames> {
        lock(&self.live).names.clone()
    }

    /// A target is watched, or changed (a cgroup, a pair of pipes, its identity).
    pub fn target(&self, image: TargetImage) {
        self.put(Entry::Target(image));
    }

    pub fn target_gone(&self, slot: u32) {
        self.put(Entry::TargetGone { slot });
    }

    pub fn targets(&self) -> Vec<TargetImage> {
        lock(&self.live).targets.values().cloned().collect()
    }
}

impl Live {
    fn apply(&mut self, e: Entry) {
        match e {
            Entry::Init(b) => self.init = b,
            Entry::Stream { ring, id, origin } => {
                self.streams.insert((ring, id), origin);
            }
            Entry::StreamGone { ring, id } => {
                self.streams.remove(&(ring, id));
            }
            Entry::OnlyRing { ring } => self.streams.retain(|(r, _), _| *r == ring),
            Entry::Volume(spec) => {
                self.volumes.insert(spec.name.clone(), spec);
            }
            Entry::Names(n) => self.names = Some(n),
            Entry::Target(t) => {
                self.targets.insert(t.slot, t);
            }
            Entry::TargetGone { slot } => {
                self.targets.remove(&slot);
            }
        }
    }

    fn image(&self) -> Vec<Entry> {
        let mut out = vec![Entry::Init(self.init.clone())];
        out.extend(self.streams.iter().map(|(&(ring, id), origin)| Entry::Stream { ring, id, origin: origin.clone() }));
        out.extend(self.volumes.values().cloned().map(Entry::Volume));
        out.extend(self.names.clone().map(Entry::Names));
        out.extend(self.targets.values().cloned().map(Entry::Target));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, FromRawFd};

    #[test]
    fn streams_volumes_and_init_survive_a_reopen_and_rewrites() {
        let state = WorkerState::open(Journal::new(c"t").unwrap()).unwrap();
        state.set_init(b"init");
        let origin = crate::record::tests::origin("app.log");
        for id in 0..20_000 {
            state.stream(7, id % 50, &origin);
            state.stream_gone(7, id % 50);
        }
        state.stream(7, 3, &origin);
        // A worker taking over: the old ring's origins and the new one's side by side, until the
        // keeper holds the new ring.
        state.stream(8, 3, &crate::record::tests::origin("other.log"));
        state.volume(&VolumeSpec { name: "web".into(), ..Default::default() });
        let target = |slot| TargetImage {
            slot,
            id: format!("abc-{slot}"),
            spec: TargetSpec { pid: Some(7), ..Default::default() },
            service: "api".into(),
            module: None,
            tenant: "".into(),
            container: None,
            identified: true,
            cgroups: vec![],
            pipes: vec![[Some(10), Some(11)]],
        };
        for slot in 0..5_000 {
            state.target(target(slot % 7));
            state.target_gone(slot % 7);
        }
        state.target(target(2));
        state.set_target_names(&TargetNames { instance: "abc".into(), next: 5_001 });
        assert!(state.journal().len() < 4 << 20);
        // SAFETY: dup of an fd we hold.
        let fd = unsafe { libc::dup(state.journal().as_fd().as_raw_fd()) };
        // SAFETY: a fresh fd.
        let again = WorkerState::open(Journal::open(unsafe { std::fs::File::from_raw_fd(fd) }).unwrap()).unwrap();
        assert_eq!(again.init(), b"init");
        assert_eq!(again.streams(7).len(), 1);
        assert_eq!(again.streams(7)[&3], OriginImage::of(&origin));
        assert_eq!(again.streams(8)[&3].path, "other.log");
        again.only_ring(8);
        assert!(again.streams(7).is_empty());
        assert_eq!(again.streams(8).len(), 1);
        assert_eq!(again.volumes()[0].name, "web");
        assert_eq!(again.targets(), vec![target(2)]);
        assert_eq!(again.target_names(), Some(TargetNames { instance: "abc".into(), next: 5_001 }));
    }
}
