//! HTTP/1.1 over a Unix socket, one request per connection: the CLI asking the agent, the agent
//! asking the container runtime.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Sends one request on a new connection to the Unix socket; the answer's body is not read yet.
pub async fn send(socket: &Path, req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
    let stream =
        UnixStream::connect(socket).await.with_context(|| format!("cannot connect to {}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake failed")?;
    tokio::spawn(conn);
    let what = format!("{} {}", req.method(), req.uri());
    sender.send_request(req).await.with_context(|| format!("{what} failed"))
}
