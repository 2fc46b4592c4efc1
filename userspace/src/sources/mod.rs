//! Sources: where records come from. Each source keeps a [`LineStream`] per stream of bytes
//! (a file, a process's stdout), which frames them with the one [`crate::framer`] and pushes
//! the records into the one [`crate::ring`].

pub mod pipes;
pub mod volume;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::framer::{Frame, Framer};
use crate::record::{Origin, Record};
use crate::ring::Ring;

/// One stream of bytes on its way to the ring: framing, sequence numbers, counting.
pub struct LineStream {
    pub origin: Arc<Origin>,
    framer: Framer,
    seq: u64,
    frames: Vec<Frame>,
    ring: Arc<Ring>,
}

impl LineStream {
    pub fn new(origin: Arc<Origin>, max_record_bytes: usize, ring: Arc<Ring>) -> Self {
        Self { origin, framer: Framer::new(max_record_bytes), seq: 0, frames: Vec::new(), ring }
    }

    /// New bytes of the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.framer.push(data, Instant::now(), &mut self.frames);
        self.emit();
    }

    /// What came so far ends a record.
    pub fn end_record(&mut self) {
        self.framer.flush(&mut self.frames);
        self.emit();
    }

    /// Ends a partial record that has waited `age`.
    pub fn idle(&mut self, now: Instant, age: Duration) {
        self.framer.flush_older_than(now, age, &mut self.frames);
        self.emit();
    }

    /// Bytes of a partial line waiting for its end.
    pub fn pending(&self) -> usize {
        self.framer.pending()
    }

    fn emit(&mut self) {
        if self.frames.is_empty() {
            return;
        }
        let at = SystemTime::now();
        let mut bytes = 0;
        let mut split = 0;
        let records: Vec<Record> = self
            .frames
            .drain(..)
            .map(|f| {
                bytes += f.bytes.len() as u64;
                split += u64::from(f.split);
                let seq = self.seq;
                self.seq += 1;
                Record {
                    captured_at: at,
                    origin: self.origin.clone(),
                    seq,
                    bytes: f.bytes,
                    split: f.split,
                    unterminated: f.unterminated,
                }
            })
            .collect();
        self.origin.counters.captured(records.len() as u64, bytes, split);
        self.ring.push(records);
    }
}
