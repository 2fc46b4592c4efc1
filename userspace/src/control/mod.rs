//! The control socket: HTTP/1.1 over a local Unix socket, serving the stats (JSON and
//! Prometheus text) and the volume API. [`server`] is the daemon's side, [`client`] the CLI's;
//! [`plugin`] serves the Docker volume plugin protocol on its own socket.

pub mod client;
pub mod plugin;
pub mod server;
