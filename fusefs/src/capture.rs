//! The seam between the filesystem and whoever consumes what it captures.
//!
//! The model owns one [`Stream`] per regular file and tells it about new bytes (beyond the file's
//! captured high-water mark) and about the events that end a partial record. What a stream does
//! with the bytes (framing, records, the ring) is the consumer's business: the model only knows
//! offsets.

use std::time::Instant;

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
}

/// What the model tells about one file.
pub trait Stream: Send {
    /// Bytes that were never seen before, in file order.
    fn append(&mut self, data: &[u8]);
    /// Bytes written again below the high-water mark (writeback page re-sends, seeks back).
    fn overwritten(&mut self, bytes: u64);
    /// Bytes refused because the agent is shutting down.
    fn refused(&mut self, bytes: u64);
    /// What came so far ends a record: fsync, close, unlink, truncate.
    fn end_record(&mut self);
    /// The file now lives at `path` in the same volume (rename).
    fn moved(&mut self, path: &str);
    /// Called periodically, so that partial records can time out.
    fn idle(&mut self, now: Instant);
}
