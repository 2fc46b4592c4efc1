//! The volume source: files written into logtap's FUSE volumes become records.
//!
//! The filesystem (crate `logtap-fusefs`) keeps each file's content in memory and hands its new
//! bytes to a [`FileStream`]; the stream frames them into lines and pushes the records into the
//! ring. When the ring has no room, the stream says it is not ready and the bytes wait in the
//! file (up to the volume's memory budget) rather than make the ring drop anything: writers
//! never wait for the agent.
//!
//! A volume's records carry the identity of the container that mounts it (discovery links
//! them). A file made by a container's process before discovery has linked the volume gets its
//! creator's identity; if the runtime has not named that container yet, the file's records wait
//! for it (up to `discovery.hold_timeout`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use logtap_fusefs::{Capture, Serving, Stream};

use super::hold::{Holding, Wait};
use super::{reorigin_all, LineStream, Stamp};
use crate::api::{Container, ServingSnapshot, SpecError, VolumeSnapshot, VolumeSpec};
use crate::counters::GroupCounters;
use crate::discovery::identity::Identity;
use crate::discovery::Lookup;
use crate::host::cgroups;
use crate::record::{Origin, Record};
use crate::ring::Ring;
use crate::values::{lock, ByteSize, Dur};

/// A volume's identity: every record from its files carries it.
#[derive(Debug)]
pub struct Volume {
    pub name: Arc<str>,
    pub service: Arc<str>,
    /// Given when the volume was made (else the service is the volume name).
    service_explicit: bool,
    pub labels: BTreeMap<String, String>,
    /// Given when the volume was made; empty: the tenant of the container that mounts it.
    pub tenant: Arc<str>,
    counters: Arc<GroupCounters>,
}

/// `[volumes]`: the FUSE mount and how its files are captured.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    pub mount: PathBuf,
    pub allow_other: bool,
    /// FUSE passthrough to the files' memory where the kernel allows it.
    pub passthrough: bool,
    /// Without passthrough: the kernel's writeback cache (fewer, larger requests; lines wait
    /// in the kernel up to `flush_interval`).
    pub writeback_cache: bool,
    pub max_write: ByteSize,
    pub flush_interval: Dur,
    pub partial_flush: Dur,
    pub max_record_bytes: ByteSize,
    /// Captured bytes kept readable at the end of each file.
    pub tail_bytes: ByteSize,
    /// Memory one volume's files may hold: what capture has not read yet plus the kept tails.
    pub volume_memory: ByteSize,
    /// Regular files one volume may hold.
    pub max_files: usize,
    /// Docker volume plugin socket (VolumeDriver protocol); empty: no plugin.
    pub plugin_socket: PathBuf,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        Self {
            mount: "/run/logtap/volumes".into(),
            allow_other: true,
            passthrough: true,
            writeback_cache: false,
            max_write: ByteSize(1 << 20),
            flush_interval: Dur(Duration::from_millis(200)),
            partial_flush: Dur(Duration::from_secs(1)),
            max_record_bytes: ByteSize(256 << 10),
            tail_bytes: ByteSize(64 << 10),
            volume_memory: ByteSize(256 << 20),
            max_files: 1024,
            plugin_socket: "/run/docker/plugins/logtap.sock".into(),
        }
    }
}

impl VolumesConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.mount.is_absolute() {
            return Err(format!("volumes.mount must be an absolute path, not {:?}", self.mount));
        }
        if !(4096..=1 << 20).contains(&self.max_write.0) {
            return Err(format!("volumes.max_write must be between 4KiB and 1MiB, not {}", self.max_write));
        }
        if self.tail_bytes.0 < 4096 {
            return Err(format!("volumes.tail_bytes must be at least 4KiB (one page), not {}", self.tail_bytes));
        }
        if self.volume_memory.0 < 4 * self.tail_bytes.0.max(1 << 20) {
            return Err(format!(
                "volumes.volume_memory must be at least 4 times tail_bytes and at least 4MiB, not {}",
                self.volume_memory
            ));
        }
        if self.max_files == 0 {
            return Err("volumes.max_files must be at least 1".into());
        }
        if self.max_record_bytes.0 == 0 {
            return Err("volumes.max_record_bytes must be at least 1 byte".into());
        }
        if self.flush_interval.0 < Duration::from_millis(10) {
            return Err(format!("volumes.flush_interval must be at least 10ms, not {}", self.flush_interval));
        }
        if !self.plugin_socket.as_os_str().is_empty() && !self.plugin_socket.is_absolute() {
            return Err(format!(
                "volumes.plugin_socket must be an absolute path or empty, not {:?}",
                self.plugin_socket
            ));
        }
        Ok(())
    }
}

/// Framing and identity settings shared by all files.
#[derive(Debug, Clone)]
pub struct Framing {
    pub host: Arc<str>,
    pub max_record_bytes: usize,
    pub partial_flush: Duration,
}

pub struct VolumeSource {
    framing: Framing,
    ring: Arc<Ring>,
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
    /// The container that mounts a volume (by volume name, whether it exists yet or not):
    /// its identity goes on the volume's records.
    links: Mutex<HashMap<String, Arc<Identity>>>,
    /// Bumped at every link change, so that file streams know to take their identity again.
    generation: AtomicU64,
    /// Who containers are, and where their records wait to be named, with discovery on.
    holding: Option<Arc<Holding>>,
    /// How the mount serves files (passthrough or requests, and why).
    serving: Mutex<ServingSnapshot>,
}

impl VolumeSource {
    /// With `holding` (discovery on), files made by containers' processes get their identity.
    pub fn new(framing: Framing, ring: Arc<Ring>, holding: Option<Arc<Holding>>) -> Arc<Self> {
        Arc::new(Self {
            framing,
            ring,
            volumes: Mutex::default(),
            links: Mutex::default(),
            generation: AtomicU64::new(0),
            holding,
            serving: Mutex::new(ServingSnapshot { mode: "unmounted".into(), reason: None }),
        })
    }

    pub fn serving(&self) -> ServingSnapshot {
        lock(&self.serving).clone()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Volume>>> {
        lock(&self.volumes)
    }

    /// Records a volume's identity ahead of its directory. Asking again for the same identity
    /// is fine; another identity for an existing volume is a conflict.
    pub fn define(&self, spec: &VolumeSpec) -> Result<Arc<Volume>, SpecError> {
        spec.validate()?;
        let service: Arc<str> = spec.service.as_deref().unwrap_or(&spec.name).into();
        let tenant: Arc<str> = spec.tenant.as_deref().unwrap_or("").into();
        let mut volumes = self.lock();
        if let Some(v) = volumes.get(&spec.name) {
            if v.service == service && v.labels == spec.labels && v.tenant == tenant {
                return Ok(v.clone());
            }
            return Err(SpecError::Conflict(spec.name.clone()));
        }
        let v = Arc::new(Volume {
            name: spec.name.as_str().into(),
            service,
            service_explicit: spec.service.is_some(),
            labels: spec.labels.clone(),
            tenant,
            counters: Arc::default(),
        });
        volumes.insert(spec.name.clone(), v.clone());
        Ok(v)
    }

    /// The volume's identity; a volume made by a plain mkdir is its own service.
    fn volume(&self, name: &str) -> Arc<Volume> {
        let spec = VolumeSpec { name: name.into(), ..Default::default() };
        if let Some(v) = self.lock().get(name) {
            return v.clone();
        }
        // The model validated the name at mkdir; a conflict cannot arise for a missing entry.
        self.define(&spec).unwrap_or_else(|_| {
            Arc::new(Volume {
                name: name.into(),
                service: name.into(),
                service_explicit: false,
                labels: BTreeMap::new(),
                tenant: "".into(),
                counters: Arc::default(),
            })
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.lock().get(name).cloned()
    }

    /// The identity of the container whose process `pid` made a file in an unlinked volume:
    /// known, or (`Err`) the container's id, not named yet.
    fn creator(&self, volume: &str, pid: u32) -> Result<Option<Arc<Identity>>, String> {
        let Some(holding) = &self.holding else { return Ok(None) };
        if pid == 0 || self.link_of(volume).is_some() {
            return Ok(None);
        }
        let Some(id) = cgroups::container_of_process(pid) else { return Ok(None) };
        match holding.directory().lookup(&id) {
            Lookup::Known(i) => Ok(Some(i)),
            Lookup::Pending => Err(id),
            Lookup::Unknown => Ok(None),
        }
    }

    /// A container mounts the volume: its records get the container's identity.
    pub fn link(&self, volume: &str, container: Arc<Identity>) {
        let mut links = lock(&self.links);
        if links.get(volume).is_some_and(|i| *i == container) {
            return;
        }
        tracing::info!(volume, container = %container.container.name, "volume linked to its container");
        links.insert(volume.to_string(), container);
        self.generation.fetch_add(1, Relaxed);
    }

    /// The container is gone (a link by another container since stays).
    pub fn unlink(&self, volume: &str, container_id: &str) {
        let mut links = lock(&self.links);
        if links.get(volume).is_some_and(|i| i.container.id == container_id) {
            links.remove(volume);
            self.generation.fetch_add(1, Relaxed);
        }
    }

    fn link_of(&self, volume: &str) -> Option<Arc<Identity>> {
        lock(&self.links).get(volume).cloned()
    }

    fn origin(
        &self,
        volume: &Volume,
        path: &str,
        counters: crate::counters::StreamCounters,
        creator: Option<&Arc<Identity>>,
    ) -> Arc<Origin> {
        let file_name = path.rsplit('/').next().unwrap_or(path);
        let link = self.link_of(&volume.name).or_else(|| creator.cloned());
        // A service set on the container wins, then one the volume was made with, then the
        // container's name, then the volume's.
        let service = match &link {
            Some(c) if c.service_explicit || !volume.service_explicit => c.service.clone(),
            _ => volume.service.clone(),
        };
        Arc::new(Origin {
            host: self.framing.host.clone(),
            pid: 0,
            volume: volume.name.clone(),
            service,
            module: module_of(file_name).into(),
            path: path.into(),
            // A volume made for a tenant holds that tenant's records, whoever mounts it.
            tenant: match &link {
                Some(c) if volume.tenant.is_empty() => c.tenant.clone(),
                _ => volume.tenant.clone(),
            },
            container: link.map(|c| c.container.clone()),
            counters,
        })
    }
}

impl VolumeSource {
    /// Every volume with its identity and counters.
    pub fn snapshot(&self) -> Vec<VolumeSnapshot> {
        self.lock()
            .values()
            .map(|v| VolumeSnapshot {
                name: v.name.to_string(),
                service: v.service.to_string(),
                labels: v.labels.clone(),
                tenant: v.tenant.to_string(),
                container: self.link_of(&v.name).map(|c| Container::clone(&c.container)),
                totals: v.counters.totals.snapshot(),
                files: v.counters.streams(),
            })
            .collect()
    }
}

/// The module of a file: its name without rotation suffixes, compression and extension.
/// `app.log` -> `app`, `app.log.1` -> `app`, `app.log.2024-01-31.gz` -> `app`,
/// `app-2024-01-31.log` -> `app`, `access` -> `access`.
pub fn module_of(file_name: &str) -> &str {
    fn is_rotation(part: &str) -> bool {
        !part.is_empty() && part.chars().all(|c| c.is_ascii_digit() || c == '-' || c == '_')
    }
    let mut name = file_name;
    // Rotation suffixes and compression, from the end: .1 .2024-01-31 .gz ...
    while let Some((stem, ext)) = name.rsplit_once('.') {
        if stem.is_empty() || !(is_rotation(ext) || matches!(ext, "gz" | "bz2" | "xz" | "zst" | "lz4")) {
            break;
        }
        name = stem;
    }
    // The extension.
    if let Some((stem, _)) = name.rsplit_once('.') {
        if !stem.is_empty() {
            name = stem;
        }
    }
    // A date or counter glued on with '-' or '_' (app-2024-01-31, app_3).
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_');
    if !trimmed.is_empty() && trimmed.len() < name.len() && name[trimmed.len()..].starts_with(['-', '_']) {
        name = trimmed;
    }
    if name.is_empty() {
        file_name
    } else {
        name
    }
}

/// The `Capture` the filesystem model owns: it makes one [`FileStream`] per file.
pub struct VolumeCapture(pub Arc<VolumeSource>);

impl Capture for VolumeCapture {
    type Stream = FileStream;

    fn volume_created(&self, volume: &str) {
        self.0.volume(volume);
        tracing::info!(volume, "volume created");
    }

    fn volume_removed(&self, volume: &str) {
        self.0.lock().remove(volume);
        tracing::info!(volume, "volume removed");
    }

    fn serving(&self, how: &Serving) {
        let reason = Some(how.why()).filter(|w| !w.is_empty()).map(String::from);
        *lock(&self.0.serving) = ServingSnapshot { mode: how.name().into(), reason };
    }

    fn stream(&self, volume: &str, path: &str, creator: u32) -> FileStream {
        let v = self.0.volume(volume);
        let counters = v.counters.stream(path);
        let (creator, waiting) = match self.0.creator(volume, creator) {
            Ok(known) => (known, None),
            Err(container) => (None, Some(Waiting { container, since: Instant::now(), records: Vec::new(), bytes: 0 })),
        };
        let origin = self.0.origin(&v, path, counters, creator.as_ref());
        FileStream {
            lines: LineStream::new(origin, self.0.framing.max_record_bytes),
            generation: self.0.generation.load(Relaxed),
            source: self.0.clone(),
            volume: v,
            creator,
            waiting,
            pending: VecDeque::new(),
            held: 0,
        }
    }
}

/// Records of a file made by a container the runtime has not named yet.
struct Waiting {
    bytes: usize,
    container: String,
    since: Instant,
    records: Vec<Record>,
}

/// One file's bytes on their way to the ring.
pub struct FileStream {
    source: Arc<VolumeSource>,
    volume: Arc<Volume>,
    lines: LineStream,
    /// The source's link generation the origin was made at.
    generation: u64,
    /// The container of the process that made the file (used while the volume is unlinked).
    creator: Option<Arc<Identity>>,
    waiting: Option<Waiting>,
    /// Records framed but not in the ring yet (it had no room): they go first.
    pending: VecDeque<Record>,
    /// Memory the file's content holds, as last told.
    held: u64,
}

/// A file's bytes are read only while the ring has this share of its capacity free, so that
/// what one read frames (64 KiB at most) fits.
const ROOM_SHARE: usize = 8;

impl FileStream {
    /// Takes the volume's identity again if a container was linked or unlinked since.
    fn refresh(&mut self) {
        let now = self.source.generation.load(Relaxed);
        if now != self.generation {
            self.generation = now;
            self.lines.origin = self.reorigin(&self.lines.origin);
        }
    }

    fn reorigin(&self, old: &Origin) -> Arc<Origin> {
        self.source.origin(&self.volume, &old.path, old.counters.clone(), self.creator.as_ref())
    }

    /// Frames into the ring, or into the waiting records while the creator is not named.
    fn emit(&mut self, frame: impl FnOnce(&mut LineStream, &mut Vec<Record>)) {
        self.refresh();
        let mut batch = Vec::new();
        frame(&mut self.lines, &mut batch);
        match (&mut self.waiting, &self.source.holding) {
            (Some(w), Some(holding)) => {
                let bytes: usize = batch.iter().map(|r| r.bytes.len()).sum();
                holding.held(batch.len() as i64, bytes as i64);
                w.bytes += bytes;
                w.records.append(&mut batch);
            }
            _ => {
                self.pending.extend(batch);
                self.source.ring.push_fitting(&mut self.pending);
            }
        }
        self.settle(false);
    }

    /// Waiting records go out once the creator is named, unknown to the runtime, or waited
    /// for long enough (`force`: the file is going).
    fn settle(&mut self, force: bool) {
        let (Some(w), Some(holding)) = (&self.waiting, &self.source.holding) else { return };
        let named = match holding.wait(&w.container, w.since) {
            Wait::Named(i) => {
                self.creator = Some(i);
                true
            }
            Wait::Unknown => false,
            Wait::Pending if !force => return,
            Wait::Pending | Wait::Late => {
                tracing::warn!(container = %w.container, volume = %self.volume.name, "container not named by the runtime in time; its file's records go out without its identity");
                false
            }
        };
        let Some(mut w) = self.waiting.take() else { return };
        holding.held(-(w.records.len() as i64), -(w.bytes as i64));
        holding.released(w.records.len() as u64, named);
        self.lines.origin = self.reorigin(&self.lines.origin);
        reorigin_all(&mut w.records, |o| self.reorigin(o));
        self.source.ring.push(w.records);
    }
}

impl Stream for FileStream {
    fn ready(&mut self) -> bool {
        let ring = &self.source.ring;
        ring.push_fitting(&mut self.pending);
        self.pending.is_empty() && ring.has_room(&self.lines.origin, ring.capacity() / ROOM_SHARE)
    }

    fn append(&mut self, data: &[u8]) {
        self.emit(|lines, out| lines.push(data, Stamp::now(), out));
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.source.ring.push(self.pending.drain(..).collect());
        }
    }

    fn copied(&mut self, bytes: u64) {
        self.lines.origin.counters.copied(bytes);
    }

    fn dropped(&mut self, bytes: u64) {
        self.lines.origin.counters.dropped(0, bytes);
    }

    fn overwritten(&mut self, bytes: u64) {
        self.lines.origin.counters.overwritten(bytes);
    }

    fn held(&mut self, bytes: u64) {
        self.lines.origin.counters.held(self.held, bytes);
        self.held = bytes;
    }

    fn refused(&mut self, bytes: u64) {
        self.lines.origin.counters.refused(bytes);
    }

    fn end_record(&mut self) {
        self.emit(|lines, out| lines.end_record(Stamp::now(), out));
    }

    fn moved(&mut self, path: &str) {
        let old = &self.lines.origin;
        self.volume.counters.stream_moved(&old.path, path, &old.counters.stream);
        self.lines.origin = self.source.origin(&self.volume, path, old.counters.clone(), self.creator.as_ref());
    }

    fn idle(&mut self, now: Instant) {
        let age = self.source.framing.partial_flush;
        self.emit(|lines, out| lines.idle(now, age, out));
    }

    fn unsettled(&self) -> Option<u64> {
        // Records waiting for room or for their container's name are not in the ring yet.
        (self.pending.is_empty() && self.waiting.is_none()).then(|| self.lines.pending() as u64)
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        self.emit(|lines, out| lines.end_record(Stamp::now(), out));
        self.settle(true);
        self.flush();
        self.held(0);
        self.volume.counters.stream_gone(&self.lines.origin.path, &self.lines.origin.counters.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules() {
        for (file, module) in [
            ("app.log", "app"),
            ("app.log.1", "app"),
            ("app.log.12", "app"),
            ("app.log.2024-01-31.gz", "app"),
            ("app-2024-01-31.log", "app"),
            ("worker_3.log", "worker"),
            ("access", "access"),
            (".log", ".log"),
            ("error.txt", "error"),
            ("a.b.log", "a.b"),
            ("2024-01-31.log", "2024-01-31"),
        ] {
            assert_eq!(module_of(file), module, "{file}");
        }
    }

    #[test]
    fn define_is_idempotent_and_detects_conflicts() {
        let ring = Arc::new(
            Ring::new(1 << 20, crate::ring::Policy::DropOldest, Duration::from_secs(1), Default::default()).unwrap(),
        );
        let src = VolumeSource::new(
            Framing { host: "h".into(), max_record_bytes: 100, partial_flush: Duration::from_secs(1) },
            ring,
            None,
        );
        let spec = VolumeSpec { name: "web".into(), service: Some("shop".into()), ..Default::default() };
        src.define(&spec).unwrap();
        src.define(&spec).unwrap();
        let other = VolumeSpec { service: Some("other".into()), ..spec };
        assert_eq!(src.define(&other).unwrap_err(), SpecError::Conflict("web".into()));
    }
}
