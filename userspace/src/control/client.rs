//! The CLI's side of the control socket: one HTTP/1.1 request per call.

use std::path::Path;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};

use crate::host::http::send;

/// Sends one request and returns the body of a 2xx answer; any other status is an error
/// carrying the server's message.
pub async fn call(socket: &Path, method: Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Bytes> {
    let mut req = Request::builder().method(method).uri(path).header(hyper::header::HOST, "logtap");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).context("building the request")?;
    let resp = send(socket, req).await.context("no answer from the agent (is `logtap daemon` running?)")?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.context("reading the control answer")?.to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{status}: {message}");
    }
    Ok(bytes)
}
