//! Container discovery: follows a container runtime through the Docker Engine API (Docker, or
//! podman's service) and tells the sources whose records are whose.
//!
//! [`runtime`] lists the containers at start, follows their events and inspects them;
//! [`identity`] turns what the runtime says into the identity on every record. This module
//! keeps the registry: the sources ask it who a container is ([`Directory`]) and hear what
//! changes ([`Listener`]: identities, volumes mounted, deaths); the report lists every
//! container. It knows no source.

mod api;
pub mod identity;
mod runtime;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{ContainerInfo, RuntimeStatus, Stdout};
use crate::values::{lock, ByteSize, Dur};
use identity::Identity;

/// Following a container runtime through the Docker Engine API.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    pub enabled: bool,
    /// The runtime's API socket: Docker's, or podman's (`/run/podman/podman.sock`).
    pub docker_socket: PathBuf,
    /// Container labels copied onto every record of the container.
    pub labels: Vec<String>,
    /// How long stdout/stderr records of a container wait for the runtime to name it.
    pub hold_timeout: Dur,
    /// Most bytes of such records held at once; beyond, the oldest go out unnamed.
    pub hold_bytes: ByteSize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            docker_socket: "/var/run/docker.sock".into(),
            labels: Vec::new(),
            hold_timeout: Dur(Duration::from_secs(10)),
            hold_bytes: ByteSize(16 << 20),
        }
    }
}

impl DiscoveryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.docker_socket.is_absolute() {
            return Err(format!("discovery.docker_socket must be an absolute path, not {:?}", self.docker_socket));
        }
        if self.hold_timeout.0 < Duration::from_millis(100) {
            return Err(format!("discovery.hold_timeout must be at least 100ms, not {}", self.hold_timeout));
        }
        Ok(())
    }
}

/// Who containers are: the sources ask when they see a container write before the runtime has
/// said who it is.
pub trait Directory: Send + Sync {
    fn lookup(&self, container_id: &str) -> Lookup;
}

/// What the sources hear from discovery, on its task, with no lock held.
pub trait Listener: Send + Sync {
    /// The runtime described a container: it mounts `volumes`, and no longer `unmounted`.
    fn described(&self, identity: &Arc<Identity>, volumes: &[String], unmounted: &[String]);
    /// The runtime does not know this id (removed before it was asked).
    fn unknown(&self, container_id: &str);
    /// The container's processes are gone.
    fn died(&self, container_id: &str);
    /// The container is gone, with its mounts of `volumes`.
    fn removed(&self, container_id: &str, volumes: &[String]);
}

pub enum Lookup {
    /// The runtime has described it.
    Known(Arc<Identity>),
    /// It is being asked; the answer comes to the [`Listener`].
    Pending,
    /// The runtime does not know it.
    Unknown,
}

/// How records of a container not named yet wait for its identity.
#[derive(Debug, Clone, Copy)]
pub struct Hold {
    pub timeout: Duration,
    pub bytes: usize,
}

struct Entry {
    identity: Arc<Identity>,
    /// As the runtime says: created, running, exited...
    state: String,
    pid: u32,
    stdout: Stdout,
    reason: Option<String>,
    /// logtap volumes among its mounts.
    volumes: Vec<String>,
}

struct Registry {
    status: String,
    reason: Option<String>,
    api_version: Option<String>,
    reconnects: u64,
    events: u64,
    containers: BTreeMap<String, Entry>,
    /// Asked about by the pipe source, not yet described.
    asked: HashSet<String>,
    /// Ids the runtime said it does not know (newest last, bounded).
    gone: VecDeque<String>,
    /// The last containers removed, for their counts.
    removed: VecDeque<Entry>,
}

/// Containers asked about and not answered yet, at most.
const ASKED_AT_ONCE: usize = 1024;
/// How many unknown ids are remembered.
const GONE_KEPT: usize = 1024;
/// How many removed containers stay in the stats.
const REMOVED_KEPT: usize = 64;

pub struct Discovery {
    config: DiscoveryConfig,
    /// The volumes' mount: a container mount under it links the container to a volume.
    mountpoint: PathBuf,
    registry: Mutex<Registry>,
    /// Containers to inspect now (the pipe source saw them write before the runtime's event).
    ask: mpsc::Sender<String>,
}

impl Discovery {
    /// A registry; [`Discovery::follow`] starts following the runtime.
    pub fn new(config: DiscoveryConfig, mountpoint: PathBuf) -> (Arc<Self>, mpsc::Receiver<String>) {
        let (ask, asked) = mpsc::channel(ASKED_AT_ONCE);
        let registry = Registry {
            status: "connecting".into(),
            reason: None,
            api_version: None,
            reconnects: 0,
            events: 0,
            containers: BTreeMap::new(),
            asked: HashSet::new(),
            gone: VecDeque::new(),
            removed: VecDeque::new(),
        };
        let d = Arc::new(Self { config, mountpoint, registry: Mutex::new(registry), ask });
        (d, asked)
    }

    /// Follows the runtime on the current tokio runtime, reconnecting for ever, and tells
    /// `listener` what changes. The sources are made after the registry (it is their
    /// directory), so they are given here rather than to [`Discovery::new`].
    pub fn follow(
        self: &Arc<Self>,
        asked: mpsc::Receiver<String>,
        listener: Arc<dyn Listener>,
        stop: CancellationToken,
    ) {
        let follow = runtime::follow(self.clone(), asked, listener);
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = follow => {}
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    fn set_status(&self, status: &str, reason: Option<String>) {
        let mut r = self.lock();
        if status == "disconnected" && r.status != "disconnected" {
            r.reconnects += 1;
        }
        r.status = status.into();
        r.reason = reason;
    }

    /// What the runtime said of a container: its identity, and what it mounts.
    fn described(&self, entry: Entry, listener: &dyn Listener) {
        let id = entry.identity.container.id.clone();
        let identity = entry.identity.clone();
        let linked = entry.volumes.clone();
        let previous = {
            let mut r = self.lock();
            r.asked.remove(&id);
            r.containers.insert(id.clone(), entry)
        };
        let unmounted: Vec<String> =
            previous.map(|p| p.volumes.into_iter().filter(|v| !linked.contains(v)).collect()).unwrap_or_default();
        listener.described(&identity, &linked, &unmounted);
    }

    /// The runtime does not know this id (removed before it was asked).
    fn unknown(&self, id: &str, listener: &dyn Listener) {
        {
            let mut r = self.lock();
            r.asked.remove(id);
            if !r.gone.iter().any(|g| g == id) {
                r.gone.push_back(id.to_string());
                if r.gone.len() > GONE_KEPT {
                    r.gone.pop_front();
                }
            }
        }
        listener.unknown(id);
    }

    fn died(&self, id: &str, listener: &dyn Listener) {
        if let Some(e) = self.lock().containers.get_mut(id) {
            e.state = "exited".into();
        }
        listener.died(id);
    }

    fn removed(&self, id: &str, listener: &dyn Listener) {
        let entry = self.lock().containers.remove(id);
        let volumes = entry.as_ref().map(|e| e.volumes.clone()).unwrap_or_default();
        if let Some(mut e) = entry {
            e.state = "removed".into();
            let mut r = self.lock();
            r.removed.push_back(e);
            if r.removed.len() > REMOVED_KEPT {
                r.removed.pop_front();
            }
        }
        listener.removed(id, &volumes);
    }

    /// Ids asked about and not described yet: asked again after a reconnect.
    fn still_asked(&self) -> Vec<String> {
        self.lock().asked.iter().cloned().collect()
    }

    /// The volumes a container mount names: a directory of our mount (a bind mount, or the
    /// path the volume plugin gave).
    fn volume_of(&self, source: &str) -> Option<String> {
        let rel = std::path::Path::new(source).strip_prefix(&self.mountpoint).ok()?;
        let first = rel.components().next()?;
        Some(first.as_os_str().to_string_lossy().into_owned())
    }

    /// The runtime followed, and every container known (also the last ones removed).
    pub fn snapshot(&self) -> (RuntimeStatus, Vec<ContainerInfo>) {
        let r = self.lock();
        let containers = r
            .containers
            .values()
            .chain(r.removed.iter())
            .map(|e| {
                let i = &e.identity;
                ContainerInfo {
                    id: i.container.id.clone(),
                    name: i.container.name.clone(),
                    image: i.container.image.clone(),
                    service: i.service.to_string(),
                    module: i.module.as_deref().map(str::to_string),
                    tenant: i.tenant.to_string(),
                    labels: i.container.labels.clone(),
                    state: e.state.clone(),
                    pid: e.pid,
                    stdout: e.stdout.clone(),
                    reason: e.reason.clone(),
                    volumes: e.volumes.clone(),
                }
            })
            .collect();
        let status = RuntimeStatus {
            status: r.status.clone(),
            reason: r.reason.clone(),
            socket: self.config.docker_socket.clone(),
            api_version: r.api_version.clone(),
            reconnects_total: r.reconnects,
            events_total: r.events,
        };
        (status, containers)
    }
}

impl Directory for Discovery {
    fn lookup(&self, container_id: &str) -> Lookup {
        let mut r = self.lock();
        if let Some(e) = r.containers.get(container_id) {
            return Lookup::Known(e.identity.clone());
        }
        // Removed since it was described: records that waited for it (a file's last pages, a
        // container that wrote and went at once) still get its identity.
        if let Some(e) = r.removed.iter().rev().find(|e| e.identity.container.id == container_id) {
            return Lookup::Known(e.identity.clone());
        }
        if r.gone.iter().any(|g| g == container_id) {
            return Lookup::Unknown;
        }
        // One question per container at a time; with the queue full, it is asked at the
        // next lookup instead.
        if r.asked.len() < ASKED_AT_ONCE
            && r.asked.insert(container_id.to_string())
            && self.ask.try_send(container_id.to_string()).is_err()
        {
            r.asked.remove(container_id);
        }
        Lookup::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;

    impl Listener for Quiet {
        fn described(&self, _: &Arc<Identity>, _: &[String], _: &[String]) {}
        fn unknown(&self, _: &str) {}
        fn died(&self, _: &str) {}
        fn removed(&self, _: &str, _: &[String]) {}
    }

    fn entry(identity: &Arc<Identity>) -> Entry {
        Entry {
            identity: identity.clone(),
            state: "running".into(),
            pid: 1,
            stdout: Stdout::Captured,
            reason: None,
            volumes: Vec::new(),
        }
    }

    /// Records that waited for a container which wrote and went at once (a file's last pages
    /// came after its `remove`) still get its identity; an id never described is asked about.
    #[test]
    fn a_removed_container_keeps_its_identity_for_late_records() {
        let (d, _asked) = Discovery::new(DiscoveryConfig::default(), PathBuf::from("/nowhere"));
        let shop = Arc::new(Identity { service: "shop".into(), ..Identity::unnamed("c1") });
        d.described(entry(&shop), &Quiet);
        d.died("c1", &Quiet);
        d.removed("c1", &Quiet);
        assert!(matches!(d.lookup("c1"), Lookup::Known(i) if i.service.as_ref() == "shop"));
        assert!(matches!(d.lookup("c2"), Lookup::Pending));
        d.unknown("c2", &Quiet);
        assert!(matches!(d.lookup("c2"), Lookup::Unknown));
    }
}
