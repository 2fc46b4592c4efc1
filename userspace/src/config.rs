//! The agent's configuration: a TOML file whose every key has a default.
//!
//! `config/logtap.toml` is the documented default file (printed by `logtap config default`); a
//! test keeps it equal to [`Config::default`]. Unknown keys and bad values are rejected with the
//! file, line and reason, and the agent does not start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::record::Template;
use crate::ring::RingConfig;
use crate::values::{ByteSize, Dur, Mode, Timezone};

/// The documented default configuration.
pub const DEFAULT_TOML: &str = include_str!("../config/logtap.toml");
/// Where the daemon looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/logtap/logtap.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Host name put on every record; empty means the machine's host name.
    pub host: String,
    /// How long SIGTERM may spend draining the ring into the sinks.
    pub shutdown_timeout: Dur,
    pub volumes: VolumesConfig,
    pub ring: RingConfig,
    pub control: ControlConfig,
    pub pipes: PipesConfig,
    pub discovery: DiscoveryConfig,
    /// Named sinks; all of them receive every record.
    pub sinks: BTreeMap<String, SinkConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    pub mount: PathBuf,
    pub allow_other: bool,
    pub writeback_cache: bool,
    pub max_write: ByteSize,
    pub flush_interval: Dur,
    pub partial_flush: Dur,
    pub max_record_bytes: ByteSize,
    pub tail_bytes: ByteSize,
    /// Docker volume plugin socket (VolumeDriver protocol); empty: no plugin.
    pub plugin_socket: PathBuf,
}

/// The eBPF source: stdout/stderr pipe writes of watched processes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipesConfig {
    pub enabled: bool,
    /// Bytes copied per write() at most; the rest is counted as truncated.
    pub max_write_capture: ByteSize,
    /// Size of the BPF ring buffer between the kernel and the agent (a power of two).
    pub ring_buffer: ByteSize,
    /// Processes or cgroups watched from the start.
    pub targets: Vec<crate::api::TargetSpec>,
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

/// Following a container runtime through the Docker Engine API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub mode: Mode,
    /// Group that owns the socket; empty keeps root's group.
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Files(FilesSinkConfig),
    Stdout(StdoutSinkConfig),
    Kafka(KafkaSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Files(_) => "files",
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::Kafka(_) => "kafka",
        }
    }

    /// An optional sink is skipped ahead (and counts what it skipped) rather than holding the
    /// ring full for the other sinks.
    pub fn optional(&self) -> bool {
        match self {
            SinkConfig::Files(c) => c.optional,
            SinkConfig::Stdout(c) => c.optional,
            SinkConfig::Kafka(c) => c.optional,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSinkConfig {
    pub dir: PathBuf,
    /// Zone that decides the day in `{service}/{module}.{YYYYMMDD}`.
    pub timezone: Timezone,
    /// `raw`: the line's bytes; `json`: the record's envelope with its identity.
    pub format: Format,
    pub optional: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutSinkConfig {
    pub optional: bool,
}

/// Apache Kafka through librdkafka: acks=all, the idempotent producer, and a record leaves the
/// ring only when its delivery report says the broker has it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic per record, e.g. `logs.{service}`; see [`Template`] for the fields.
    pub topic: Template,
    /// Message key: records with one key keep their order in one partition.
    pub key: Template,
    /// Record headers with the record's identity (service, module, volume, path, host, pid).
    pub headers: bool,
    pub format: Format,
    pub compression: Compression,
    /// How long librdkafka may try one message before its delivery fails and logtap retries it.
    pub delivery_timeout: Dur,
    /// Largest message value; longer records are split into parts (counted).
    pub max_message_bytes: ByteSize,
    /// Other librdkafka properties, passed as they are and applied last.
    pub options: BTreeMap<String, String>,
    pub optional: bool,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".into()],
            topic: Template::parse("logs.{service}").unwrap_or_default(),
            key: Template::parse("{volume}/{module}").unwrap_or_default(),
            headers: true,
            format: Format::Raw,
            compression: Compression::Lz4,
            delivery_timeout: Dur(Duration::from_secs(30)),
            max_message_bytes: ByteSize(1_000_000),
            options: BTreeMap::new(),
            optional: false,
        }
    }
}

/// How a sink writes a record (a Kafka message's value, a line of the files sink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The line's bytes as they were written.
    Raw,
    /// The JSON envelope with the record's identity (`message`, or `message_base64` for
    /// non-UTF-8).
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: String::new(),
            shutdown_timeout: Dur(Duration::from_secs(10)),
            volumes: VolumesConfig::default(),
            ring: RingConfig::default(),
            control: ControlConfig::default(),
            pipes: PipesConfig::default(),
            discovery: DiscoveryConfig::default(),
            sinks: BTreeMap::from([("files".to_string(), SinkConfig::Files(FilesSinkConfig::default()))]),
        }
    }
}

impl Default for VolumesConfig {
    fn default() -> Self {
        Self {
            mount: "/run/logtap/volumes".into(),
            allow_other: true,
            writeback_cache: true,
            max_write: ByteSize(1 << 20),
            flush_interval: Dur(Duration::from_millis(200)),
            partial_flush: Dur(Duration::from_secs(1)),
            max_record_bytes: ByteSize(256 << 10),
            tail_bytes: ByteSize(64 << 10),
            plugin_socket: "/run/docker/plugins/logtap.sock".into(),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self { socket: "/run/logtap/logtap.sock".into(), mode: Mode(0o660), group: String::new() }
    }
}

impl Default for FilesSinkConfig {
    fn default() -> Self {
        Self { dir: "/var/log/logtap".into(), timezone: Timezone(chrono_tz::UTC), format: Format::Raw, optional: false }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        config.validate().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        Ok(config)
    }

    /// Checks what single values cannot: bounds and relations between keys.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.volumes;
        if !v.mount.is_absolute() {
            return Err(format!("volumes.mount must be an absolute path, not {:?}", v.mount));
        }
        if !(4096..=1 << 20).contains(&v.max_write.0) {
            return Err(format!("volumes.max_write must be between 4KiB and 1MiB, not {}", v.max_write));
        }
        if v.tail_bytes.0 < 4096 {
            return Err(format!(
                "volumes.tail_bytes must be at least 4KiB (the kernel reads partly written pages back), not {}",
                v.tail_bytes
            ));
        }
        if v.max_record_bytes.0 == 0 {
            return Err("volumes.max_record_bytes must be at least 1 byte".into());
        }
        if v.flush_interval.0 < Duration::from_millis(10) {
            return Err(format!("volumes.flush_interval must be at least 10ms, not {}", v.flush_interval));
        }
        if self.ring.capacity.0 < 2 * v.max_record_bytes.0 {
            return Err(format!(
                "ring.capacity ({}) must hold at least two records of volumes.max_record_bytes ({})",
                self.ring.capacity, v.max_record_bytes
            ));
        }
        let p = &self.pipes;
        let max_capture = (logtap_common::CHUNK as u64) * u64::from(logtap_common::MAX_CHUNKS);
        if !(1..=max_capture).contains(&p.max_write_capture.0) {
            return Err(format!(
                "pipes.max_write_capture must be between 1B and {} (what the eBPF programs copy per write), not {}",
                ByteSize(max_capture),
                p.max_write_capture
            ));
        }
        if !p.ring_buffer.0.is_power_of_two() || !(64 << 10..=1 << 30).contains(&p.ring_buffer.0) {
            return Err(format!(
                "pipes.ring_buffer must be a power of two between 64KiB and 1GiB, not {}",
                p.ring_buffer
            ));
        }
        for t in &p.targets {
            if t.pid.is_some() == t.cgroup.is_some() {
                return Err("each [[pipes.targets]] names exactly one of pid or cgroup".into());
            }
        }
        if self.sinks.is_empty() {
            return Err("no sinks: configure at least one [sinks.NAME]".into());
        }
        for (name, sink) in &self.sinks {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(format!("sink name {name:?} may use only ASCII letters, digits, '_' and '-'"));
            }
            if let SinkConfig::Files(f) = sink {
                if !f.dir.is_absolute() {
                    return Err(format!("sinks.{name}.dir must be an absolute path, not {:?}", f.dir));
                }
                if f.dir.starts_with(&v.mount) {
                    return Err(format!(
                        "sinks.{name}.dir ({}) is inside volumes.mount ({}): the sink would capture its own output",
                        f.dir.display(),
                        v.mount.display()
                    ));
                }
            }
            if let SinkConfig::Kafka(k) = sink {
                crate::sinks::kafka::check(k).map_err(|e| format!("sinks.{name}: {e}"))?;
            }
        }
        if !v.plugin_socket.as_os_str().is_empty() && !v.plugin_socket.is_absolute() {
            return Err(format!("volumes.plugin_socket must be an absolute path or empty, not {:?}", v.plugin_socket));
        }
        let d = &self.discovery;
        if !d.docker_socket.is_absolute() {
            return Err(format!("discovery.docker_socket must be an absolute path, not {:?}", d.docker_socket));
        }
        if d.hold_timeout.0 < Duration::from_millis(100) {
            return Err(format!("discovery.hold_timeout must be at least 100ms, not {}", d.hold_timeout));
        }
        if !self.control.socket.is_absolute() {
            return Err(format!("control.socket must be an absolute path, not {:?}", self.control.socket));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Policy;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn the_documented_defaults_are_the_defaults() {
        assert_eq!(parse(DEFAULT_TOML).unwrap(), Config::default());
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_documented_kafka_example_is_the_kafka_default() {
        let start = DEFAULT_TOML.find("# [sinks.kafka]").unwrap();
        let example: String = DEFAULT_TOML[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(""))
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&example).unwrap();
        assert_eq!(c.sinks["kafka"], SinkConfig::Kafka(KafkaSinkConfig::default()), "{example}");
    }

    #[test]
    fn values_parse() {
        let c = parse(
            r#"
            host = "h1"
            [ring]
            capacity = "1MiB"
            policy = "block"
            block_timeout = "250ms"
            [sinks.out]
            type = "stdout"
            [sinks.archive]
            type = "files"
            dir = "/tmp/x"
            timezone = "Asia/Shanghai"
            "#,
        )
        .unwrap();
        assert_eq!(c.ring.capacity, ByteSize(1 << 20));
        assert_eq!(c.ring.policy, Policy::Block);
        assert_eq!(c.ring.block_timeout, Dur(Duration::from_millis(250)));
        assert_eq!(c.sinks.len(), 2);
        match &c.sinks["archive"] {
            SinkConfig::Files(f) => assert_eq!(f.timezone, Timezone(chrono_tz::Asia::Shanghai)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let e = parse("[ring]\n\ncapacity = \"lots\"\n").unwrap_err().to_string();
        assert!(e.starts_with("test.toml: "), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("invalid size"), "{e}");

        let e = parse("[volumes]\nmount_point = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("unknown field `mount_point`"), "{e}");

        // Sink tables are tagged by `type`, so their errors point at the table's line.
        let e = parse("\n[sinks.a]\ntype = \"files\"\ntimezone = \"Mars/Olympus\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("unknown time zone"), "{e}");

        let e = parse("[sinks.a]\ntype = \"kafkaa\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown variant `kafkaa`"), "{e}");

        let e = parse("[ring]\npolicy = \"sometimes\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("unknown variant"), "{e}");

        let e = parse("[volumes]\nflush_interval = 5\n").unwrap_err().to_string();
        assert!(e.contains("expected a duration"), "{e}");

        let e = parse("[ring\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn relations_are_checked() {
        let e = parse("[ring]\ncapacity = \"300KiB\"\n").unwrap_err().to_string();
        assert!(e.contains("ring.capacity"), "{e}");
        let e = parse("[sinks.f]\ntype = \"files\"\ndir = \"/run/logtap/volumes/x\"\n").unwrap_err().to_string();
        assert!(e.contains("capture its own output"), "{e}");
        let e = parse("[volumes]\ntail_bytes = 100\n").unwrap_err().to_string();
        assert!(e.contains("tail_bytes"), "{e}");
        let e = parse("[pipes]\nring_buffer = \"3MiB\"\n").unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        let e = parse("[pipes]\nmax_write_capture = \"1MiB\"\n").unwrap_err().to_string();
        assert!(e.contains("max_write_capture"), "{e}");
        let e = parse("[[pipes.targets]]\nservice = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("exactly one of pid or cgroup"), "{e}");
        let e = parse("[volumes]\nmount = \"rel/path\"\n").unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
    }
}
