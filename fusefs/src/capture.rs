//! The seam between the filesystem and whoever consumes what it captures.
//!
//! Each regular file has one [`Stream`]. Capture reads the file's content in order from where it
//! left off and hands the new bytes over, along with the events that end a partial record. What
//! a stream does with the bytes (framing, records, the ring) is the consumer's business.

use std::time::Instant;

/// How the mount serves file contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// FUSE passthrough: apps read and write the in-memory content directly.
    Passthrough,
    /// Every write() is a request to the agent; `why` says why not passthrough.
    Requests { why: String },
    /// The kernel's writeback cache turns writes into page-sized requests; `why` as above.
    Writeback { why: String },
}

impl Serving {
    pub fn name(&self) -> &'static str {
        match self {
            Serving::Passthrough => "passthrough",
            Serving::Requests { .. } => "requests",
            Serving::Writeback { .. } => "writeback",
        }
    }

    /// Why passthrough is not used (empty when it is).
    pub fn why(&self) -> &str {
        match self {
            Serving::Passthrough => "",
            Serving::Requests { why } | Serving::Writeback { why } => why,
        }
    }
}

/// Creates the per-file streams and hears about volumes coming and going.
pub trait Capture: Send + 'static {
    type Stream: Stream;

    /// A top-level directory (a volume) was made.
    fn volume_created(&self, volume: &str);
    /// A volume was removed (it was empty).
    fn volume_removed(&self, volume: &str);
    /// A regular file was created at `path` (relative to its volume, `/`-separated) by process
    /// `creator` (0 when unknown): a container's process, for a container's log directory.
    fn stream(&self, volume: &str, path: &str, creator: u32) -> Self::Stream;
    /// The mount was made, or fell back from passthrough to requests.
    fn serving(&self, how: &Serving);
}

/// What capture tells about one file.
pub trait Stream: Send + 'static {
    /// Whether more bytes can be taken now. While not, capture leaves them in the file.
    fn ready(&mut self) -> bool;
    /// Bytes never seen before, in file order.
    fn append(&mut self, data: &[u8]);
    /// Whatever waits for room goes out now, as the consumer's policy allows (the file is
    /// changing under capture, or the agent is stopping).
    fn flush(&mut self);
    /// Bytes that repeat content of another file of the volume (a copy being made of it, as
    /// logrotate's `copytruncate` and `cp` do): not handed over again.
    fn copied(&mut self, bytes: u64);
    /// Bytes not captured because the volume was over its memory budget.
    fn dropped(&mut self, bytes: u64);
    /// Bytes written again below what was captured (seeks back), not captured again.
    fn overwritten(&mut self, bytes: u64);
    /// Bytes refused because the agent is shutting down.
    fn refused(&mut self, bytes: u64);
    /// What came so far ends a record: fsync, close, unlink, truncate.
    fn end_record(&mut self);
    /// The file now lives at `path` in the same volume (rename).
    fn moved(&mut self, path: &str);
    /// The file's content now holds `bytes` of memory.
    fn held(&mut self, bytes: u64);
    /// Called periodically, so that partial records can time out.
    fn idle(&mut self, now: Instant);
    /// Bytes appended that are not safe yet (a partial line; `None` while records wait to be
    /// taken, when that cannot be told): a worker taking over captures them again.
    fn unsettled(&self) -> Option<u64>;
}
