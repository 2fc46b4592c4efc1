//! The documents the control socket serves and the CLI reads, and the requests it takes: one
//! place for the JSON shapes, shared by the agent and its clients.

use std::collections::BTreeMap;
use std::path::PathBuf;

use logtap_fusefs::{is_name_char, Name};
use serde::{Deserialize, Serialize};

use crate::counters::{CountersSnapshot, SinkSnapshot};

/// The container a record comes from, as discovery found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// The runtime's full id (64 hex digits).
    pub id: String,
    /// Empty until the runtime has named it (see [`Origin::container`]).
    pub name: String,
    pub image: String,
    /// The labels the config lists (`discovery.labels`), when the container has them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// How the volume mount serves files: `passthrough` (apps write the in-memory files directly),
/// `requests` or `writeback` (every write goes through the agent), and why not passthrough.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingSnapshot {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeSnapshot {
    pub name: String,
    pub service: String,
    pub labels: BTreeMap<String, String>,
    /// Whose records its files hold (given at creation); empty: the mounting container's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// The container that mounts it (its identity goes on the volume's records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::api::Container>,
    #[serde(flatten)]
    pub totals: CountersSnapshot,
    pub files: BTreeMap<String, CountersSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub host: String,
    pub version: String,
    pub uptime_seconds: f64,
    pub ring: RingSnapshot,
    /// How the volume mount serves files.
    #[serde(default)]
    pub volume_serving: ServingSnapshot,
    pub volumes: Vec<VolumeSnapshot>,
    pub pipes: PipesSnapshot,
    /// The container runtime followed, and its containers (absent when discovery is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoverySnapshot>,
    pub sinks: Vec<SinkSnapshot>,
    /// The keeper holding the mount and the ring (absent when the worker runs alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper_pid: Option<u32>,
    /// The worker: the process serving everything now.
    #[serde(default)]
    pub worker_pid: u32,
    /// Workers started after the first (crashes, kills, upgrades).
    #[serde(default)]
    pub restarts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<RestartSnapshot>,
    /// The tenant keys (absent when encryption is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSnapshot>,
}

/// The key directory as the agent read it last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EncryptionSnapshot {
    pub keys: String,
    pub tenants: Vec<TenantKeysSnapshot>,
    /// Files that are not usable keys: their tenants are never sent in clear.
    pub refused: Vec<RefusedKeySnapshot>,
    /// Times the directory changed and was read again.
    pub reloads_total: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantKeysSnapshot {
    pub tenant: String,
    /// The key that seals the tenant's records now.
    pub sealing_key: String,
    pub key_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefusedKeySnapshot {
    pub file: String,
    pub reason: String,
}

/// How the worker before this one ended and how this one took over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestartSnapshot {
    /// "killed by signal 9", "exit status 101".
    pub exit: String,
    /// From the old worker's exit to the new one serving the mount again.
    pub gap_ms: f64,
    /// Records the old ring held for the sinks, delivered by this worker.
    pub carried_records: u64,
    /// Of those, records a sink had already been handed (delivered again: at least once).
    pub redelivered_records: u64,
    /// Pipe output the last worker's eBPF programs captured during the gap that was not read:
    /// this worker loaded other programs or settings (an upgrade that changed them).
    #[serde(default)]
    pub unread_pipe_bytes: u64,
}

/// What `logtap upgrade` asks for: the binary the next worker runs, and whether the keeper
/// re-executes itself into it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct UpgradeSpec {
    pub binary: String,
    #[serde(default)]
    pub keeper: bool,
}

/// What `logtap volume create` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct VolumeSpec {
    pub name: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whose records its files hold, whichever container mounts it (its key seals them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
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
    #[error("invalid tenant {0:?}: {1}")]
    Tenant(String, String),
    #[error("invalid label {0:?}: keys are 1 to 128 of ASCII letters, digits, '.', '_', '-' and '/'")]
    Label(String),
    #[error("volume {0:?} exists with another service, tenant or labels")]
    Conflict(String),
}

impl VolumeSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        Name::parse(&self.name).map_err(|e| SpecError::Name(self.name.clone(), e.to_string()))?;
        if let Some(s) = &self.service {
            Name::parse(s).map_err(|e| SpecError::Service(s.clone(), e.to_string()))?;
        }
        if let Some(t) = &self.tenant {
            Name::parse(t).map_err(|e| SpecError::Tenant(t.clone(), e.to_string()))?;
        }
        for k in self.labels.keys() {
            let ok = !k.is_empty() && k.len() <= 128 && k.chars().all(|c| is_name_char(c) || c == '/');
            if !ok {
                return Err(SpecError::Label(k.clone()));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingSnapshot {
    pub capacity_bytes: u64,
    /// Gauge: bytes the records take (headers included).
    pub used_bytes: u64,
    /// Gauge: memory the ring's region holds now (pages touched and not given back).
    #[serde(default)]
    pub memory_bytes: u64,
    pub records: u64,
    pub policy: String,
    pub pushed_records_total: u64,
    pub dropped_records_total: u64,
    pub dropped_bytes_total: u64,
    #[serde(default)]
    pub throttled_records_total: u64,
    #[serde(default)]
    pub throttled_bytes_total: u64,
    pub blocked_pushes_total: u64,
    pub readers: Vec<ReaderSnapshot>,
    /// Every tenant seen (the empty name: records of no tenant).
    #[serde(default)]
    pub tenants: Vec<TenantSnapshot>,
    /// The sources holding records now, most first.
    #[serde(default)]
    pub sources: Vec<SourceSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantSnapshot {
    pub tenant: String,
    /// Gauge: ring bytes its records take.
    pub held_bytes: u64,
    pub dropped_records_total: u64,
    pub dropped_bytes_total: u64,
    pub throttled_records_total: u64,
    pub throttled_bytes_total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceSnapshot {
    /// `container ID`, `volume NAME` or `service NAME`.
    pub source: String,
    pub tenant: String,
    pub held_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReaderSnapshot {
    pub name: String,
    pub optional: bool,
    /// Records pushed but not yet handed to this reader.
    pub lag_records: u64,
    /// Records handed out but not yet acknowledged.
    pub in_flight_records: u64,
    pub dropped_records_total: u64,
    pub dropped_bytes_total: u64,
}

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
    /// A container (its id): made by discovery, never by a watch request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Module of the records (default: `stdout` or `stderr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The inodes of the pipes that are the target's stdout and stderr (`logtap run` makes
    /// them before the command starts). Default: what the process has on fd 1 and 2 when it
    /// is watched. Writes to any other pipe are not the target's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_pipe: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_pipe: Option<u64>,
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
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetSnapshot {
    pub id: String,
    #[serde(flatten)]
    pub spec: TargetSpec,
    /// The service its records carry.
    #[serde(rename = "service")]
    pub service_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_identity: Option<Container>,
    /// A container target whose records went out before the runtime named it.
    #[serde(default)]
    pub identified: bool,
    /// Removed (`logtap run` ended, unwatched, the container died); kept among the last ones
    /// for their counts.
    pub ended: bool,
    /// Counted in the kernel: calls that wrote to a watched pipe, their bytes, the bytes past
    /// `max_write_capture`, and events (bytes) the BPF ring buffer had no room for.
    pub writes_total: u64,
    pub written_bytes_total: u64,
    pub truncated_bytes_total: u64,
    pub lost_events_total: u64,
    pub lost_bytes_total: u64,
    /// Bytes written to pipes other than the target's stdout/stderr (a pipeline inside a
    /// container or a command, `exec` sessions), not captured.
    #[serde(default)]
    pub other_pipe_bytes_total: u64,
    /// Bytes splice(), tee() or sendfile() moved into its stdout/stderr: no user buffer to copy
    /// them from, so they are lost (counted in the kernel).
    #[serde(default)]
    pub spliced_bytes_total: u64,
    /// Counted here: records and bytes framed, dropped by the ring, split.
    #[serde(flatten)]
    pub totals: CountersSnapshot,
    pub streams: BTreeMap<String, CountersSnapshot>,
}

/// Capture of every container's stdout/stderr (with discovery on).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainersSnapshot {
    /// Counted in the kernel: writes from cgroups not yet told apart (container or not).
    pub unclassified_writes_total: u64,
    pub unclassified_written_bytes_total: u64,
    pub lost_events_total: u64,
    pub lost_bytes_total: u64,
    /// Bytes from cgroups that are no container: not captured (the kernel is told to skip them).
    pub ignored_bytes_total: u64,
    /// Bytes from cgroups removed before they could be told apart: lost.
    pub unresolved_bytes_total: u64,
    /// Records waiting for the runtime to name their container.
    pub held_records: u64,
    pub held_bytes: u64,
    /// Records that went out with the container's id only (not named within `hold_timeout`,
    /// or the runtime did not know it).
    pub unidentified_records_total: u64,
    /// Records captured before the runtime said the container opted out
    /// (`logtap.stdout=false`): not delivered.
    pub opted_out_records_total: u64,
    /// cgroups the kernel skips.
    pub excluded_cgroups: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipesSnapshot {
    /// `running`, `disabled` or `unavailable`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes waiting for the rest of their write or line, over all streams.
    pub pending_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<ContainersSnapshot>,
    pub targets: Vec<TargetSnapshot>,
}

/// Whether a container's stdout/stderr can be captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stdout {
    Captured,
    /// `logtap.stdout=false`.
    OptedOut,
    /// A tty, or an fd that is no pipe: the eBPF programs only see pipe writes.
    NotCapturable,
}

/// A container as discovery knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub state: String,
    pub pid: u32,
    pub stdout: Stdout,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub volumes: Vec<String>,
}

/// A container with what was captured of it and what of it was lost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSnapshot {
    #[serde(flatten)]
    pub info: ContainerInfo,
    /// Its stdout/stderr records (over its pipe targets still in the stats), counted here.
    pub pipe: CountersSnapshot,
    /// Counted in the kernel: bytes written to its stdout/stderr pipes.
    pub written_bytes_total: u64,
    /// Every byte of its output that will not be delivered: the sum of the five below.
    pub lost_bytes_total: u64,
    /// stdout/stderr bytes the BPF ring buffer had no room for (counted in the kernel).
    pub kernel_lost_bytes_total: u64,
    /// stdout/stderr bytes of writes past `pipes.max_write_capture`.
    pub truncated_bytes_total: u64,
    /// Bytes of its records (stdout/stderr and its volumes' files) the ring dropped.
    pub dropped_bytes_total: u64,
    /// Bytes of its records beyond its source's or tenant's rate (`ring.source_rate`,
    /// `ring.tenant_rate`).
    #[serde(default)]
    pub throttled_bytes_total: u64,
    /// stdout/stderr bytes moved by splice(), tee() or sendfile(), which carry no user buffer.
    pub spliced_bytes_total: u64,
    /// Bytes its processes wrote to pipes that are not its stdout/stderr (not its output).
    pub other_pipe_bytes_total: u64,
}

/// The container runtime followed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// `connecting`, `connected` or `disconnected` (with the reason).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub reconnects_total: u64,
    pub events_total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscoverySnapshot {
    #[serde(flatten)]
    pub runtime: RuntimeStatus,
    pub containers: Vec<ContainerSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
