//! The few Docker Engine API calls discovery needs, over the runtime's Unix socket: version,
//! container list, inspect, and the event stream. Models are lenient (unknown fields and values
//! are fine): podman's compatible API reports states such as `stopped` and `configured` that
//! Docker's schema does not have, and a strict client (bollard 0.21) fails to read them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::host::http;

/// A request (not the event stream) that takes longer than this has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The oldest API version whose calls and fields are enough here (Docker 20.10, podman 4).
const MIN_VERSION: &str = "1.40";

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Summary {
    pub id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Inspect {
    pub id: String,
    pub name: String,
    /// The image id; `Config.Image` has the name it was run by.
    pub image: String,
    pub state: State,
    pub config: Config,
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct State {
    pub status: String,
    pub running: bool,
    pub pid: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Config {
    pub image: String,
    pub tty: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Mount {
    pub name: String,
    pub source: String,
    pub driver: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Event {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Action")]
    pub action: String,
    #[serde(rename = "Actor")]
    pub actor: Actor,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Actor {
    #[serde(rename = "ID")]
    pub id: String,
}

fn null_as_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Deserialize)]
struct Version {
    #[serde(rename = "ApiVersion")]
    api_version: Option<String>,
}

pub struct Api {
    socket: PathBuf,
    /// `/v1.41`: every path is prefixed with the version agreed on.
    prefix: String,
    pub version: String,
}

async fn send(socket: &Path, path: &str) -> anyhow::Result<Response<Incoming>> {
    let req = Request::get(path).header(hyper::header::HOST, "docker").body(Full::new(Bytes::new()))?;
    http::send(socket, req).await
}

async fn get(socket: &Path, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let call = async {
        let resp = send(socket, path).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await.with_context(|| format!("reading GET {path}"))?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, call).await.with_context(|| format!("GET {path} timed out"))?
}

fn parse<T: DeserializeOwned>(path: &str, status: StatusCode, body: &[u8]) -> anyhow::Result<T> {
    if !status.is_success() {
        bail!("GET {path}: {status}: {}", String::from_utf8_lossy(body).trim());
    }
    serde_json::from_slice(body).with_context(|| format!("GET {path}: unreadable answer"))
}

/// The lower of two `major.minor` versions.
fn lower(a: &str, b: &str) -> String {
    let key = |v: &str| -> (u32, u32) {
        let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
        (major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
    };
    if key(a) <= key(b) {
        a.to_string()
    } else {
        b.to_string()
    }
}

impl Api {
    /// Asks the runtime its API version; the calls then use it (at most the newest we know).
    pub async fn connect(socket: &Path) -> anyhow::Result<Api> {
        let (status, body) = get(socket, "/version").await?;
        let v: Version = parse("/version", status, &body)?;
        let version = lower(v.api_version.as_deref().unwrap_or(MIN_VERSION), "1.45");
        Ok(Api { socket: socket.to_path_buf(), prefix: format!("/v{version}"), version })
    }

    pub async fn containers(&self) -> anyhow::Result<Vec<Summary>> {
        let path = format!("{}/containers/json?all=true", self.prefix);
        let (status, body) = get(&self.socket, &path).await?;
        parse(&path, status, &body)
    }

    /// A container's description; `None` when the runtime does not know it.
    pub async fn inspect(&self, id: &str) -> anyhow::Result<Option<Inspect>> {
        if !id.chars().all(logtap_fusefs::is_name_char) {
            bail!("not a container id: {id:?}");
        }
        let path = format!("{}/containers/{id}/json", self.prefix);
        let (status, body) = get(&self.socket, &path).await?;
        // Podman answers 500 "no such container" for one removed meanwhile.
        let missing = status == StatusCode::NOT_FOUND
            || (status == StatusCode::INTERNAL_SERVER_ERROR
                && String::from_utf8_lossy(&body).contains("no such container"));
        if missing {
            return Ok(None);
        }
        parse(&path, status, &body).map(Some)
    }

    /// Container events from `since` (Unix seconds) on, as they happen.
    pub async fn events(&self, since: u64) -> anyhow::Result<Events> {
        let filters = r#"{"type":["container"]}"#;
        let path = format!("{}/events?since={since}&filters={}", self.prefix, urlencode(filters));
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, send(&self.socket, &path))
            .await
            .context("subscribing to events timed out")??;
        if !resp.status().is_success() {
            bail!("GET {path}: {}", resp.status());
        }
        Ok(Events { body: resp.into_body(), buf: BytesMut::new() })
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The event stream: JSON objects one after another.
pub struct Events {
    body: Incoming,
    buf: BytesMut,
}

impl Events {
    /// The next event; `None` when the runtime ends the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            let (next, used) = {
                let mut objects = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Event>();
                (objects.next(), objects.byte_offset())
            };
            match next {
                Some(Ok(event)) => {
                    self.buf.advance(used);
                    return Ok(Some(event));
                }
                Some(Err(e)) if !e.is_eof() => return Err(e).context("unreadable event"),
                _ => {}
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame.context("reading the event stream")?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_states_and_nulls_are_read() {
        let text = r#"{"Id":"abc","Name":"/c2","Image":"sha256:1","State":{"Status":"stopped","Running":false,
            "Pid":0,"Health":{"Status":""}},"Config":{"Image":"localhost/x:latest","Tty":false,"Env":null,
            "Labels":null},"Mounts":[{"Type":"bind","Source":"/run/logtap/volumes/web","Destination":"/var/log/app"}]}"#;
        let i: Inspect = serde_json::from_str(text).unwrap();
        assert_eq!(i.state.status, "stopped");
        assert!(i.config.env.is_empty() && i.config.labels.is_empty());
        assert_eq!(i.mounts[0].source, "/run/logtap/volumes/web");
    }

    #[test]
    fn versions() {
        assert_eq!(lower("1.41", "1.45"), "1.41");
        assert_eq!(lower("1.47", "1.45"), "1.45");
        assert_eq!(lower("1.9", "1.45"), "1.9");
        assert_eq!(urlencode(r#"{"a":["b"]}"#), "%7B%22a%22%3A%5B%22b%22%5D%7D");
    }
}
