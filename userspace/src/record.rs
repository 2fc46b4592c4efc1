//! A record: one line (or a piece of an over-long one) with where and when it was captured.

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer};
use serde::Serialize;

use crate::api::Container;
use crate::counters::StreamCounters;

/// Whose bytes these are. Shared by every record of a stream, so a record costs one `Arc`.
#[derive(Debug, Clone)]
pub struct Origin {
    pub host: Arc<str>,
    /// The writing process, for pipe streams (0 for volume files).
    pub pid: u32,
    /// The volume, for volume files (empty for pipe streams).
    pub volume: Arc<str>,
    pub service: Arc<str>,
    pub module: Arc<str>,
    /// Path of the file inside its volume, or `stdout`/`stderr`.
    pub path: Arc<str>,
    /// Who the container's owner is (`logtap.tenant`); empty when not set.
    pub tenant: Arc<str>,
    /// The container, for records of containers (their stdout/stderr, their volumes).
    pub container: Option<Arc<Container>>,
    pub counters: StreamCounters,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub captured_at: SystemTime,
    pub origin: Arc<Origin>,
    /// Per-stream sequence number, from 0.
    pub seq: u64,
    /// The line without its newline, unchanged (binary and invalid UTF-8 included).
    pub bytes: Bytes,
    /// A piece of a line longer than `max_record_bytes`.
    pub split: bool,
    /// Ended by close, fsync, truncate, unlink or `partial_flush` rather than a newline.
    pub unterminated: bool,
}

/// The JSON form of a record: `message` when the bytes are UTF-8, else `message_base64`,
/// so that no byte is lost or altered.
#[derive(Serialize)]
pub struct Envelope<'a> {
    pub timestamp: String,
    pub host: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    pub pid: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub volume: &'a str,
    pub service: &'a str,
    pub module: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub tenant: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a Container>,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_base64: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub split: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unterminated: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Record {
    pub fn envelope(&self) -> Envelope<'_> {
        let (message, message_base64) = match std::str::from_utf8(&self.bytes) {
            Ok(s) => (Some(s), None),
            Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(&self.bytes))),
        };
        let ts: chrono::DateTime<chrono::Utc> = self.captured_at.into();
        let o = &*self.origin;
        Envelope {
            timestamp: ts.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            host: &o.host,
            pid: o.pid,
            volume: &o.volume,
            service: &o.service,
            module: &o.module,
            path: &o.path,
            tenant: &o.tenant,
            container: o.container.as_deref(),
            seq: self.seq,
            message,
            message_base64,
            split: self.split,
            unterminated: self.unterminated,
        }
    }

    /// The record as one JSON object.
    pub fn to_json(&self, out: &mut Vec<u8>) {
        // Serialising plain strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &self.envelope());
    }

    /// The record as one JSON line (with the newline).
    pub fn to_json_line(&self, out: &mut Vec<u8>) {
        self.to_json(out);
        out.push(b'\n');
    }
}

/// A record field a [`Template`] can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Host,
    Service,
    Module,
    Volume,
    Path,
    Pid,
    Tenant,
    Container,
    ContainerId,
    Image,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Field(Field),
}

/// Text with `{field}` placeholders: `{host}`, `{service}`, `{module}`, `{volume}`, `{path}`
/// (the file in its volume, or `stdout`/`stderr`), `{pid}`, and for containers' records
/// `{tenant}`, `{container}` (its name), `{container_id}`, `{image}` (empty otherwise).
/// `{{` and `}}` are literal braces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Template(pub Vec<Part>);

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let field = match name.as_str() {
                        "host" => Field::Host,
                        "service" => Field::Service,
                        "module" => Field::Module,
                        "volume" => Field::Volume,
                        "path" => Field::Path,
                        "pid" => Field::Pid,
                        "tenant" => Field::Tenant,
                        "container" => Field::Container,
                        "container_id" => Field::ContainerId,
                        "image" => Field::Image,
                        _ => {
                            return Err(format!(
                                "unknown field {{{name}}} in template {s:?}: use host, service, module, volume, \
                                 path, pid, tenant, container, container_id or image"
                            ))
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(field));
                }
                '}' => return Err(format!("unmatched '}}' in template {s:?} (write '}}}}' for a brace)")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template(parts))
    }

    /// The literal text of the template (no fields).
    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            Part::Field(_) => None,
        })
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn origin(path: &str) -> Arc<Origin> {
        Arc::new(Origin {
            host: "h".into(),
            pid: 0,
            volume: "v".into(),
            service: "svc".into(),
            module: "app".into(),
            path: path.into(),
            tenant: "".into(),
            container: None,
            counters: StreamCounters::detached(),
        })
    }

    pub fn record(bytes: &[u8]) -> Record {
        Record {
            captured_at: SystemTime::UNIX_EPOCH,
            origin: origin("app.log"),
            seq: 0,
            bytes: Bytes::copy_from_slice(bytes),
            split: false,
            unterminated: false,
        }
    }

    #[test]
    fn json_is_lossless_for_any_bytes() {
        let mut out = Vec::new();
        record("héllo \"q\"".as_bytes()).to_json_line(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["message"], "héllo \"q\"");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000000Z");

        let raw = [0xff, 0x00, b'a', 0xc3];
        out.clear();
        record(&raw).to_json_line(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("message").is_none());
        let back = base64::engine::general_purpose::STANDARD.decode(v["message_base64"].as_str().unwrap()).unwrap();
        assert_eq!(back, raw);
    }
}
