//! The daemon's side of the control socket.
//!
//! `GET /v1/stats`, `GET /v1/volumes`, `POST /v1/volumes`, `GET /v1/targets[/ID]`,
//! `GET /v1/containers`, `POST /v1/watch`, `POST /v1/unwatch`, `GET /metrics`, `GET /v1/health`.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{SpecError, TargetSpec, UnwatchSpec, UpgradeSpec, VolumeSpec};
use crate::config::ControlConfig;
use crate::keeper::client::KeeperLink;
use crate::report::{prometheus, Report};
use crate::sources::pipes::PipeSource;
use crate::sources::volume::VolumeSource;
use crate::state::WorkerState;

/// Connections served at once (the CLI, Prometheus, `logtap run`s, the runtime's plugin calls).
const MAX_CONNECTIONS: usize = 64;
/// A connection that sends no whole request head within this is closed, so that idle clients
/// cannot hold the connections for long (local clients send theirs at once).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Largest request body accepted.
const MAX_BODY: usize = 64 << 10;

pub struct Control {
    pub report: Arc<Report>,
    pub volumes: Arc<VolumeSource>,
    pub pipes: Arc<PipeSource>,
    pub mountpoint: PathBuf,
    /// Where volume definitions are kept for the next worker.
    pub state: Option<Arc<WorkerState>>,
    /// The keeper, for upgrades.
    pub keeper: Option<Arc<KeeperLink>>,
}

/// Binds the socket: refuses to start beside a live agent, replaces a stale socket file,
/// and sets the configured mode and group.
pub fn bind(config: &ControlConfig) -> anyhow::Result<UnixListener> {
    let path = &config.socket;
    let listener = bind_unix(path, config.mode.0)?;
    if !config.group.is_empty() {
        let gid = group_id(&config.group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {}", path.display(), config.group))?;
    }
    Ok(listener)
}

/// The socket the last worker listened on, kept by the keeper: clients that connected while no
/// worker ran are answered now instead of refused. `None` if it is not (or no longer) the one
/// configured at `path`.
pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> anyhow::Result<Option<UnixListener>> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    let bound = listener.local_addr().context("the kept control socket's address")?;
    let same_file = |a: &Path| {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        ino(a).is_some() && ino(a) == ino(path)
    };
    if !bound.as_pathname().is_some_and(same_file) {
        return Ok(None);
    }
    listener.set_nonblocking(true).context("the kept control socket")?;
    Ok(Some(UnixListener::from_std(listener).context("the kept control socket")?))
}

/// Binds a Unix socket unless a live server answers there; a stale socket file is replaced.
pub fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another logtap is already serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).context("group name has a NUL byte")?;
    // SAFETY: getgrnam reads a valid C string; the result is used before any other call.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        bail!("control.group: no group named {name:?}");
    }
    // SAFETY: non-null pointer returned by getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

/// Serves the control API until `stop`.
pub async fn serve(listener: UnixListener, control: Arc<Control>, stop: CancellationToken) {
    serve_http(listener, move |req| handle(req, control.clone()), stop).await
}

/// Serves HTTP/1.1 connections on `listener` with `handler`, until `stop`.
pub async fn serve_http<H, F>(listener: UnixListener, handler: H, stop: CancellationToken)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Past the limit, new connections wait in the socket's backlog.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = open.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(handler);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!("control connection ended: {e}");
            }
        });
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error: message.into() })
}

async fn handle(req: Request<Incoming>, control: Arc<Control>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/stats") => json(StatusCode::OK, &control.report.snapshot()),
        (&Method::GET, "/v1/volumes") => json(StatusCode::OK, &control.report.volumes()),
        (&Method::POST, "/v1/volumes") => create_volume(req, &control).await,
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(prometheus(&control.report.snapshot()))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/v1/health") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/v1/targets") => json(StatusCode::OK, &control.report.pipes()),
        (&Method::GET, p) if p.starts_with("/v1/targets/") => {
            let id = &p["/v1/targets/".len()..];
            match control.pipes.live_target(id) {
                Some(t) => json(StatusCode::OK, &t),
                None => error(StatusCode::NOT_FOUND, format!("no live target {id}")),
            }
        }
        (&Method::GET, "/v1/containers") => match control.report.discovery() {
            Some(d) => json(StatusCode::OK, &d),
            None => error(StatusCode::NOT_FOUND, "container discovery is off (discovery.enabled = false)"),
        },
        (&Method::POST, "/v1/watch") => match body::<TargetSpec>(req).await {
            Ok(spec) => match control.pipes.watch(&spec) {
                Ok(id) => json(StatusCode::CREATED, &serde_json::json!({ "target": id })),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            },
            Err(r) => r,
        },
        (&Method::POST, "/v1/unwatch") => match body::<UnwatchSpec>(req).await {
            Ok(spec) => match control.pipes.unwatch(&spec) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({})),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            },
            Err(r) => r,
        },
        (&Method::POST, "/v1/upgrade") => match body::<UpgradeSpec>(req).await {
            Ok(spec) => upgrade(&control, &spec),
            Err(r) => r,
        },
        (
            _,
            "/v1/stats" | "/v1/volumes" | "/metrics" | "/v1/health" | "/v1/targets" | "/v1/containers" | "/v1/watch"
            | "/v1/unwatch" | "/v1/upgrade",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    };
    Ok(response)
}

/// Asks the keeper to run `binary` as the next worker: this one is stopped for it, and the mount,
/// the volumes and the ring stay.
fn upgrade(control: &Control, spec: &UpgradeSpec) -> Response<Full<Bytes>> {
    let Some(keeper) = &control.keeper else {
        return error(StatusCode::CONFLICT, "this agent runs without a keeper: nothing would keep the mount");
    };
    let binary = Path::new(&spec.binary);
    if !binary.is_absolute() || !binary.is_file() {
        return error(StatusCode::BAD_REQUEST, format!("{}: not an absolute path to a file", spec.binary));
    }
    // The keeper stops this worker at once: the answer goes out first.
    let (keeper, binary, itself) = (keeper.clone(), spec.binary.clone(), spec.keeper);
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Err(e) = keeper.upgrade(&binary, itself) {
            warn!("cannot reach the keeper for the upgrade: {e}");
        }
    });
    json(StatusCode::ACCEPTED, &serde_json::json!({ "binary": spec.binary, "keeper": spec.keeper }))
}

/// A JSON request body (`{}` when empty), or the error text.
pub async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, String> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Err(format!("cannot read the request body: {e}")),
    };
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| format!("invalid request: {e}"))
}

/// A JSON request body, or the error answer to send.
async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    read_json(req).await.map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

/// Defines a volume and makes its directory through the mount; whether it existed already.
pub async fn ensure_volume(control: &Control, spec: VolumeSpec) -> Result<bool, (StatusCode, String)> {
    let existed = control.volumes.get(&spec.name).is_some();
    if let Err(e) = control.volumes.define(&spec) {
        let status = if matches!(e, SpecError::Conflict(_)) { StatusCode::CONFLICT } else { StatusCode::BAD_REQUEST };
        return Err((status, e.to_string()));
    }
    if let Some(state) = &control.state {
        state.volume(&spec);
    }
    let dir = control.mountpoint.join(&spec.name);
    match tokio::task::spawn_blocking(move || make_dir(&dir, &spec)).await {
        Ok(Ok(())) => Ok(existed),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("volume creation failed: {e}"))),
    }
}

async fn create_volume(req: Request<Incoming>, control: &Control) -> Response<Full<Bytes>> {
    let spec: VolumeSpec = match body(req).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let name = spec.name.clone();
    let existed = match ensure_volume(control, spec).await {
        Ok(existed) => existed,
        Err((status, message)) => return error(status, message),
    };
    let snapshot = control.report.volumes().into_iter().find(|v| v.name == name);
    if !existed {
        info!(volume = %name, "volume created through the control socket");
    }
    json(if existed { StatusCode::OK } else { StatusCode::CREATED }, &snapshot)
}

/// Makes the volume's directory through the mount, so the kernel sees it like any mkdir.
fn make_dir(dir: &Path, spec: &VolumeSpec) -> anyhow::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot make {}", dir.display())),
    }
    if spec.uid.is_some() || spec.gid.is_some() {
        std::os::unix::fs::chown(dir, spec.uid, spec.gid).with_context(|| format!("cannot chown {}", dir.display()))?;
    }
    if let Some(mode) = spec.mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7777))
            .with_context(|| format!("cannot chmod {}", dir.display()))?;
    }
    Ok(())
}
