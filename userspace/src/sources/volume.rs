//! The volume source: files written into logtap's FUSE volumes become records.
//!
//! The filesystem model (crate `logtap-fusefs`) hands each file's new bytes to a
//! [`FileStream`]; the stream frames them into lines and pushes the records into the ring,
//! right in the FUSE request, so that the `block` policy holds the writer back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use logtap_fusefs::{validate_volume_name, Capture, Stream};

use super::LineStream;
use crate::record::Origin;
use crate::ring::Ring;
use crate::stats::{GroupCounters, VolumeList, VolumeSnapshot};

/// A volume's identity: every record from its files carries it.
#[derive(Debug)]
pub struct Volume {
    pub name: Arc<str>,
    pub service: Arc<str>,
    pub labels: BTreeMap<String, String>,
    counters: Arc<GroupCounters>,
}

/// What `logtap volume create` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct VolumeSpec {
    pub name: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Owner and mode of the volume's directory (e.g. for a container's non-root user);
    /// not part of its identity.
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid volume name {0:?}: {1}")]
    Name(String, String),
    #[error("invalid service name {0:?}: {1}")]
    Service(String, String),
    #[error("invalid label {0:?}: keys are 1 to 128 of ASCII letters, digits, '.', '_', '-' and '/'")]
    Label(String),
    #[error("volume {0:?} exists with another service or labels")]
    Conflict(String),
}

impl VolumeSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_volume_name(&self.name).map_err(|e| SpecError::Name(self.name.clone(), e.to_string()))?;
        if let Some(s) = &self.service {
            validate_volume_name(s).map_err(|e| SpecError::Service(s.clone(), e.to_string()))?;
        }
        for k in self.labels.keys() {
            let ok = !k.is_empty()
                && k.len() <= 128
                && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
            if !ok {
                return Err(SpecError::Label(k.clone()));
            }
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
}

impl VolumeSource {
    pub fn new(framing: Framing, ring: Arc<Ring>) -> Arc<Self> {
        Arc::new(Self { framing, ring, volumes: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Volume>>> {
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a volume's identity ahead of its directory. Asking again for the same identity
    /// is fine; another identity for an existing volume is a conflict.
    pub fn define(&self, spec: &VolumeSpec) -> Result<Arc<Volume>, SpecError> {
        spec.validate()?;
        let service: Arc<str> = spec.service.as_deref().unwrap_or(&spec.name).into();
        let mut volumes = self.lock();
        if let Some(v) = volumes.get(&spec.name) {
            if v.service == service && v.labels == spec.labels {
                return Ok(v.clone());
            }
            return Err(SpecError::Conflict(spec.name.clone()));
        }
        let v = Arc::new(Volume {
            name: spec.name.as_str().into(),
            service,
            labels: spec.labels.clone(),
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
                labels: BTreeMap::new(),
                counters: Arc::default(),
            })
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.lock().get(name).cloned()
    }

    fn origin(&self, volume: &Volume, path: &str, counters: crate::stats::StreamCounters) -> Arc<Origin> {
        let file_name = path.rsplit('/').next().unwrap_or(path);
        Arc::new(Origin {
            host: self.framing.host.clone(),
            pid: 0,
            volume: volume.name.clone(),
            service: volume.service.clone(),
            module: module_of(file_name).into(),
            path: path.into(),
            counters,
        })
    }
}

impl VolumeList for VolumeSource {
    fn volumes(&self) -> Vec<VolumeSnapshot> {
        self.lock()
            .values()
            .map(|v| VolumeSnapshot {
                name: v.name.to_string(),
                service: v.service.to_string(),
                labels: v.labels.clone(),
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

    fn stream(&self, volume: &str, path: &str) -> FileStream {
        let v = self.0.volume(volume);
        let counters = v.counters.stream(path);
        let origin = self.0.origin(&v, path, counters);
        FileStream {
            lines: LineStream::new(origin, self.0.framing.max_record_bytes, self.0.ring.clone()),
            source: self.0.clone(),
            volume: v,
        }
    }
}

/// One file's bytes on their way to the ring.
pub struct FileStream {
    source: Arc<VolumeSource>,
    volume: Arc<Volume>,
    lines: LineStream,
}

impl Stream for FileStream {
    fn append(&mut self, data: &[u8]) {
        self.lines.push(data);
    }

    fn overwritten(&mut self, bytes: u64) {
        self.lines.origin.counters.overwritten(bytes);
    }

    fn refused(&mut self, bytes: u64) {
        self.lines.origin.counters.refused(bytes);
    }

    fn end_record(&mut self) {
        self.lines.end_record();
    }

    fn moved(&mut self, path: &str) {
        let old = &self.lines.origin;
        self.volume.counters.stream_moved(&old.path, path, &old.counters.stream);
        self.lines.origin = self.source.origin(&self.volume, path, old.counters.clone());
    }

    fn idle(&mut self, now: Instant) {
        self.lines.idle(now, self.source.framing.partial_flush);
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        self.lines.end_record();
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
    fn specs_are_validated() {
        let ok = VolumeSpec {
            name: "web".into(),
            service: Some("shop".into()),
            labels: BTreeMap::from([("team".into(), "a".into())]),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = VolumeSpec { name: "../x".into(), ..ok.clone() };
        assert!(matches!(bad.validate(), Err(SpecError::Name(..))));
        let bad = VolumeSpec { service: Some("a/b".into()), ..ok.clone() };
        assert!(matches!(bad.validate(), Err(SpecError::Service(..))));
        let bad = VolumeSpec { labels: BTreeMap::from([("".into(), "x".into())]), ..ok.clone() };
        assert!(matches!(bad.validate(), Err(SpecError::Label(..))));
    }

    #[test]
    fn define_is_idempotent_and_detects_conflicts() {
        let ring = Arc::new(Ring::new(1 << 20, crate::config::Policy::DropOldest, Duration::from_secs(1)));
        let src = VolumeSource::new(
            Framing { host: "h".into(), max_record_bytes: 100, partial_flush: Duration::from_secs(1) },
            ring,
        );
        let spec = VolumeSpec { name: "web".into(), service: Some("shop".into()), ..Default::default() };
        src.define(&spec).unwrap();
        src.define(&spec).unwrap();
        let other = VolumeSpec { service: Some("other".into()), ..spec };
        assert_eq!(src.define(&other).unwrap_err(), SpecError::Conflict("web".into()));
    }
}
