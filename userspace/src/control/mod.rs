//! The control socket: HTTP/1.1 over a local Unix socket, serving the stats (JSON and
//! Prometheus text) and the volume API. [`server`] is the daemon's side, [`client`] the CLI's.

pub mod client;
pub mod server;
