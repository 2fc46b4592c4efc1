//! A Docker volume plugin (the VolumeDriver protocol, HTTP/1.1 JSON on a Unix socket such as
//! `/run/docker/plugins/logtap.sock`), so that
//! `docker run --mount type=volume,volume-driver=logtap,src=NAME,dst=/var/log/app` gives a
//! container a logtap volume. Podman uses the same plugin (`[engine.volume_plugins]`).
//!
//! A volume is a directory of the logtap mount; `Mount` answers its path, which the runtime
//! bind-mounts into the container (the FUSE mount exists before the container starts).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::server::{self, Control};
use crate::api::VolumeSpec;
use crate::values::lock;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Req {
    #[serde(default)]
    name: String,
    #[serde(default)]
    opts: Option<HashMap<String, String>>,
    /// The caller of Mount/Unmount (one per mount).
    #[serde(default, rename = "ID")]
    id: String,
}

struct Plugin {
    control: Arc<Control>,
    /// Mount ids per volume: a mounted volume is not removed.
    mounts: Mutex<HashMap<String, HashSet<String>>>,
}

/// Binds the plugin socket (mode 0660: the runtime runs as root).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    server::bind_unix(path, 0o660)
}

pub async fn serve(listener: UnixListener, control: Arc<Control>, stop: CancellationToken) {
    let plugin = Arc::new(Plugin { control, mounts: Mutex::default() });
    server::serve_http(listener, move |req| handle(req, plugin.clone()), stop).await
}

/// The protocol's media type.
const MEDIA: &str = "application/vnd.docker.plugins.v1.2+json";

fn answer(body: Value) -> Response<Full<Bytes>> {
    let mut r = server::json(StatusCode::OK, &body);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(MEDIA));
    r
}

/// The protocol's error answer: HTTP 500 with `Err` set.
fn failed(message: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = answer(json!({ "Err": message.into() }));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

async fn handle(req: Request<Incoming>, plugin: Arc<Plugin>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(failed("the plugin protocol uses POST"));
    }
    let path = req.uri().path().to_string();
    let r: Req = match server::read_json(req).await {
        Ok(r) => r,
        Err(e) => return Ok(failed(e)),
    };
    Ok(match path.as_str() {
        "/Plugin.Activate" => answer(json!({ "Implements": ["VolumeDriver"] })),
        "/VolumeDriver.Capabilities" => answer(json!({ "Capabilities": { "Scope": "local" } })),
        "/VolumeDriver.Create" => plugin.create(&r).await,
        "/VolumeDriver.Remove" => plugin.remove(&r).await,
        "/VolumeDriver.Mount" => plugin.mount(&r).await,
        "/VolumeDriver.Unmount" => plugin.unmount(&r),
        "/VolumeDriver.Path" => plugin.path(&r),
        "/VolumeDriver.Get" => plugin.get(&r),
        "/VolumeDriver.List" => plugin.list(),
        _ => failed(format!("unknown plugin call {path}")),
    })
}

/// Create options: `service`, `tenant`, `label=k=v,k2=v2` or `label.k=v`, `uid`, `gid`, `mode`
/// (octal).
fn spec_of(name: &str, opts: &HashMap<String, String>) -> Result<VolumeSpec, String> {
    let mut labels = BTreeMap::new();
    let mut spec = VolumeSpec { name: name.to_string(), ..Default::default() };
    let number = |k: &str, v: &str, radix: u32| {
        u32::from_str_radix(v.trim(), radix).map_err(|_| format!("option {k}={v:?} is not a number"))
    };
    for (k, v) in opts {
        match k.as_str() {
            "service" => spec.service = Some(v.clone()),
            "tenant" => spec.tenant = Some(v.clone()),
            "uid" => spec.uid = Some(number(k, v, 10)?),
            "gid" => spec.gid = Some(number(k, v, 10)?),
            "mode" => spec.mode = Some(number(k, v, 8)?),
            "label" | "labels" => {
                for pair in v.split(',').filter(|p| !p.is_empty()) {
                    let (lk, lv) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} is not KEY=VALUE"))?;
                    labels.insert(lk.to_string(), lv.to_string());
                }
            }
            _ => match k.strip_prefix("label.") {
                Some(lk) => {
                    labels.insert(lk.to_string(), v.clone());
                }
                None => return Err(format!("unknown option {k:?}: use service, tenant, label, uid, gid or mode")),
            },
        }
    }
    spec.labels = labels;
    Ok(spec)
}

impl Plugin {
    fn mountpoint(&self, name: &str) -> PathBuf {
        self.control.mountpoint.join(name)
    }

    fn exists(&self, name: &str) -> bool {
        self.control.volumes.get(name).is_some() && self.mountpoint(name).is_dir()
    }

    async fn create(&self, r: &Req) -> Response<Full<Bytes>> {
        let spec = match spec_of(&r.name, r.opts.as_ref().unwrap_or(&HashMap::new())) {
            Ok(s) => s,
            Err(e) => return failed(e),
        };
        match server::ensure_volume(&self.control, spec).await {
            Ok(existed) => {
                if !existed {
                    info!(volume = %r.name, "volume created by the volume plugin");
                }
                answer(json!({ "Err": "" }))
            }
            Err((_, message)) => failed(message),
        }
    }

    async fn remove(&self, r: &Req) -> Response<Full<Bytes>> {
        if !self.exists(&r.name) {
            return failed(format!("no volume {:?}", r.name));
        }
        if lock(&self.mounts).get(&r.name).is_some_and(|m| !m.is_empty()) {
            return failed(format!("volume {:?} is mounted", r.name));
        }
        // Through the mount, like `rm -r`: open files end their records first.
        let dir = self.mountpoint(&r.name);
        match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await {
            Ok(Ok(())) => {
                info!(volume = %r.name, "volume removed by the volume plugin");
                answer(json!({ "Err": "" }))
            }
            Ok(Err(e)) => failed(format!("cannot remove volume {:?}: {e}", r.name)),
            Err(e) => failed(format!("cannot remove volume {:?}: {e}", r.name)),
        }
    }

    async fn mount(&self, r: &Req) -> Response<Full<Bytes>> {
        // A volume made outside the plugin (or lost with a restarted agent) is made on demand.
        if !self.exists(&r.name) {
            let spec = VolumeSpec { name: r.name.clone(), ..Default::default() };
            if let Err((_, message)) = server::ensure_volume(&self.control, spec).await {
                return failed(message);
            }
        }
        lock(&self.mounts).entry(r.name.clone()).or_default().insert(r.id.clone());
        answer(json!({ "Mountpoint": self.mountpoint(&r.name), "Err": "" }))
    }

    fn unmount(&self, r: &Req) -> Response<Full<Bytes>> {
        let mut mounts = lock(&self.mounts);
        if let Some(ids) = mounts.get_mut(&r.name) {
            ids.remove(&r.id);
            if ids.is_empty() {
                mounts.remove(&r.name);
            }
        }
        answer(json!({ "Err": "" }))
    }

    fn path(&self, r: &Req) -> Response<Full<Bytes>> {
        if !self.exists(&r.name) {
            return failed(format!("no volume {:?}", r.name));
        }
        answer(json!({ "Mountpoint": self.mountpoint(&r.name), "Err": "" }))
    }

    fn get(&self, r: &Req) -> Response<Full<Bytes>> {
        let Some(v) = self.control.report.volumes().into_iter().find(|v| v.name == r.name) else {
            return failed(format!("no volume {:?}", r.name));
        };
        let status = json!({ "service": v.service, "labels": v.labels, "captured_records_total": v.totals.captured_records_total });
        answer(json!({
            "Volume": { "Name": v.name, "Mountpoint": self.mountpoint(&v.name), "Status": status },
            "Err": ""
        }))
    }

    fn list(&self) -> Response<Full<Bytes>> {
        let volumes: Vec<Value> = self
            .control
            .report
            .volumes()
            .into_iter()
            .map(|v| json!({ "Name": v.name, "Mountpoint": self.mountpoint(&v.name) }))
            .collect();
        answer(json!({ "Volumes": volumes, "Err": "" }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_options() {
        let opts: HashMap<String, String> = [
            ("service", "shop"),
            ("tenant", "acme"),
            ("label", "team=pay,tier=1"),
            ("label.env", "prod"),
            ("uid", "1000"),
            ("mode", "0777"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = spec_of("web", &opts).unwrap();
        assert_eq!(s.service.as_deref(), Some("shop"));
        assert_eq!(s.tenant.as_deref(), Some("acme"));
        assert_eq!(s.uid, Some(1000));
        assert_eq!(s.mode, Some(0o777));
        assert_eq!(s.labels.len(), 3);
        assert_eq!(s.labels["env"], "prod");
        let bad = |k: &str, v: &str| spec_of("web", &HashMap::from([(k.to_string(), v.to_string())])).unwrap_err();
        assert!(bad("uid", "root").contains("not a number"));
        assert!(bad("label", "novalue").contains("KEY=VALUE"));
        assert!(bad("size", "1G").contains("unknown option"));
    }
}
