//! The CLI's side of the control socket: one HTTP/1.1 request per call.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};

use crate::host::http::send;

/// The agent answered, with an error: unlike no answer (a worker restarting), this is its word.
#[derive(Debug)]
pub struct Refused {
    pub status: hyper::StatusCode,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for Refused {}

/// Whether a failed call may be answered if made again: the agent took it and did not answer
/// (its worker died on it; the keeper holds the socket, so the next worker answers). Not when
/// the agent refused it, or no agent listens.
pub fn may_answer_later(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<Refused>().is_some() {
        return false;
    }
    let absent =
        |io: &std::io::Error| matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound);
    !e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(absent)
}

/// Sends one request and returns the body of a 2xx answer; any other status is a [`Refused`]
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
        return Err(Refused { status, message }.into());
    }
    Ok(bytes)
}
