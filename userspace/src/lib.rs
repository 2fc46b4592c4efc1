//! logtap: diskless container log capture.
//!
//! The path of a line: a write into a FUSE volume (crate `logtap-fusefs`) or to a stdout pipe
//! (crate `logtap-ebpf`) -> [`sources::volume`] or [`sources::pipes`] -> [`framer`] ->
//! [`record`] -> the one [`ring`] -> [`sinks`]. [`discovery`] follows the container runtime and
//! tells the sources whose records are whose; [`encryption`] seals each tenant's records with
//! its key on their way into the sinks. [`stats`] counts every stage; [`control`] serves
//! the stats and the volume API over a Unix socket (and the Docker volume plugin); [`daemon`]
//! wires it all from the [`config`].

pub mod api;
pub mod config;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod discovery;
pub mod encryption;
pub mod framer;
pub mod host;
pub mod keeper;
pub mod record;
pub mod report;
pub mod ring;
pub mod sinks;
pub mod sources;
pub mod state;
pub mod values;
