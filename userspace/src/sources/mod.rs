//! Sources: where records come from. Each source keeps a [`LineStream`] per stream of bytes
//! (a file, a process's stdout), which frames them with the one [`crate::framer`]; the source
//! pushes the records into the one [`crate::ring`].

pub mod hold;
pub mod pipes;
pub mod volume;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::discovery::identity::Identity;
use crate::discovery::Listener;
use crate::framer::{Frame, Framer};
use crate::record::{Origin, Record};

/// Both sources, as discovery's listener: a container's identity reaches its volumes' files and
/// its pipe target.
pub struct Sources {
    pub volumes: Arc<volume::VolumeSource>,
    pub pipes: Arc<pipes::PipeSource>,
}

impl Listener for Sources {
    fn described(&self, identity: &Arc<Identity>, volumes: &[String], unmounted: &[String]) {
        let id = &identity.container.id;
        for v in unmounted {
            self.volumes.unlink(v, id);
        }
        for v in volumes {
            self.volumes.link(v, identity.clone());
        }
        self.pipes.identified(id);
    }

    fn unknown(&self, container_id: &str) {
        self.pipes.identified(container_id);
    }

    fn died(&self, container_id: &str) {
        self.pipes.died(container_id);
    }

    fn removed(&self, container_id: &str, volumes: &[String]) {
        for v in volumes {
            self.volumes.unlink(v, container_id);
        }
        self.pipes.died(container_id);
    }
}

/// When a batch of bytes was captured: read once per FUSE request or ring-buffer drain, not
/// once per line (clock reads were a tenth of the agent's time with small lines).
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub now: Instant,
    pub wall: SystemTime,
}

impl Stamp {
    pub fn now() -> Self {
        Self { now: Instant::now(), wall: SystemTime::now() }
    }
}

/// Held records take the origin their stream has now: `reorigin` makes it from an old one,
/// once per stream.
pub fn reorigin_all(records: &mut [Record], mut reorigin: impl FnMut(&Origin) -> Arc<Origin>) {
    let mut renamed: HashMap<*const Origin, Arc<Origin>> = HashMap::new();
    for r in records {
        r.origin = renamed.entry(Arc::as_ptr(&r.origin)).or_insert_with(|| reorigin(&r.origin)).clone();
    }
}

/// One stream of bytes on its way to the ring: framing, sequence numbers, counting. Records go
/// into the caller's batch, which the caller pushes (or holds while its identity is unknown).
pub struct LineStream {
    pub origin: Arc<Origin>,
    framer: Framer,
    seq: u64,
    frames: Vec<Frame>,
}

impl LineStream {
    pub fn new(origin: Arc<Origin>, max_record_bytes: usize) -> Self {
        Self { origin, framer: Framer::new(max_record_bytes), seq: 0, frames: Vec::new() }
    }

    /// New bytes of the stream.
    pub fn push(&mut self, data: &[u8], at: Stamp, batch: &mut Vec<Record>) {
        self.framer.push(data, at.now, &mut self.frames);
        self.emit(at.wall, batch);
    }

    /// What came so far ends a record.
    pub fn end_record(&mut self, at: Stamp, batch: &mut Vec<Record>) {
        self.framer.flush(&mut self.frames);
        self.emit(at.wall, batch);
    }

    /// Ends a partial record that has waited `age`.
    pub fn idle(&mut self, now: Instant, age: Duration, batch: &mut Vec<Record>) {
        self.framer.flush_older_than(now, age, &mut self.frames);
        self.emit(SystemTime::now(), batch);
    }

    /// Bytes of a partial line waiting for its end.
    pub fn pending(&self) -> usize {
        self.framer.pending()
    }

    fn emit(&mut self, at: SystemTime, batch: &mut Vec<Record>) {
        if self.frames.is_empty() {
            return;
        }
        let (mut bytes, mut split) = (0, 0);
        let records = self.frames.len() as u64;
        for f in self.frames.drain(..) {
            bytes += f.bytes.len() as u64;
            split += u64::from(f.split);
            let seq = self.seq;
            self.seq += 1;
            batch.push(Record {
                captured_at: at,
                origin: self.origin.clone(),
                seq,
                bytes: f.bytes,
                split: f.split,
                unterminated: f.unterminated,
            });
        }
        self.origin.counters.captured(records, bytes, split);
    }
}
