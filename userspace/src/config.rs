//! The agent's configuration: a TOML file whose every key has a default.
//!
//! `config/logtap.toml` is the documented default file (printed by `logtap config default`); a
//! test keeps it equal to [`Config::default`]. Unknown keys and bad values are rejected with the
//! file, line and reason, and the agent does not start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::discovery::DiscoveryConfig;
use crate::encryption::EncryptionConfig;
use crate::ring::RingConfig;
use crate::sinks::files::FilesSinkConfig;
use crate::sinks::SinkConfig;
use crate::sources::pipes::PipesConfig;
use crate::sources::volume::VolumesConfig;
use crate::values::{Dur, Mode};

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
    /// Per-tenant sealing of records on their way into the sinks.
    pub encryption: EncryptionConfig,
    /// Named sinks; all of them receive every record.
    pub sinks: BTreeMap<String, SinkConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub mode: Mode,
    /// Group that owns the socket; empty keeps root's group.
    pub group: String,
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
            encryption: EncryptionConfig::default(),
            sinks: BTreeMap::from([("files".to_string(), SinkConfig::Files(FilesSinkConfig::default()))]),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self { socket: "/run/logtap/logtap.sock".into(), mode: Mode(0o660), group: String::new() }
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

    /// Checks what single values cannot: each section's bounds (its own `validate`), and the
    /// relations between sections.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.volumes;
        v.validate()?;
        if self.ring.capacity.0 < 2 * v.max_record_bytes.0 {
            return Err(format!(
                "ring.capacity ({}) must hold at least two records of volumes.max_record_bytes ({})",
                self.ring.capacity, v.max_record_bytes
            ));
        }
        self.pipes.validate()?;
        if self.sinks.is_empty() {
            return Err("no sinks: configure at least one [sinks.NAME]".into());
        }
        for (name, sink) in &self.sinks {
            sink.validate(name)?;
            if let SinkConfig::Files(f) = sink {
                if f.dir.starts_with(&v.mount) {
                    return Err(format!(
                        "sinks.{name}.dir ({}) is inside volumes.mount ({}): the sink would capture its own output",
                        f.dir.display(),
                        v.mount.display()
                    ));
                }
            }
        }
        self.discovery.validate()?;
        self.encryption.validate()?;
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
    use crate::sinks::kafka::KafkaSinkConfig;
    use crate::values::{ByteSize, Timezone};

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
