//! logtap: diskless container log capture.
//!
//! The path of a line: a write into a FUSE volume (crate `logtap-fusefs`) ->
//! [`sources::volume`] -> [`framer`] -> [`record`] -> the one [`ring`] -> [`sinks`].
//! [`stats`] counts every stage; [`control`] serves the stats and the volume API over a Unix
//! socket; [`daemon`] wires it all from the [`config`].

pub mod config;
pub mod control;
pub mod daemon;
pub mod framer;
pub mod record;
pub mod ring;
pub mod sinks;
pub mod sources;
pub mod stats;
