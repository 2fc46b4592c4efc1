//! The one shared ring: every source pushes records in, every sink reads them out.
//!
//! Bounded in bytes. Each sink is a reader with its own cursor; a record's space comes back
//! only when every reader has acknowledged it. An optional reader never holds the ring full:
//! when space is needed and only optional readers still hold the oldest record, it is evicted
//! and counted against those readers (they skip ahead). When a required reader holds the ring
//! full, the policy decides: `drop_oldest` evicts from the head (counted against each reader
//! that had not read the record yet, and against the record's source), `block` makes the
//! pushing source wait up to `block_timeout` and then drops the newest records (counted).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::api::{ReaderSnapshot, RingSnapshot};
use crate::record::Record;
use crate::values::{lock, ByteSize, Dur};

/// Memory a record costs beyond its bytes: its slot in the deque, counted twice because the
/// deque grows by doubling, which also covers the shared buffer headers.
pub const RECORD_OVERHEAD: usize = 2 * std::mem::size_of::<Record>();

pub fn cost(r: &Record) -> usize {
    r.bytes.len() + RECORD_OVERHEAD
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderId(usize);

/// Records handed to a reader, starting at ring sequence `first`.
#[derive(Debug)]
pub struct Batch {
    pub first: u64,
    pub records: Vec<Record>,
}

impl Batch {
    /// The sequence after the last record: what to acknowledge.
    pub fn end(&self) -> u64 {
        self.first + self.records.len() as u64
    }
}

#[derive(Debug)]
struct Reader {
    name: String,
    /// Skipped ahead rather than waited for.
    optional: bool,
    /// Next sequence to hand out.
    next: u64,
    /// Every sequence below this is acknowledged.
    acked: u64,
    dropped_records: u64,
    dropped_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    records: VecDeque<Record>,
    /// Sequence of `records[0]`.
    head: u64,
    used: usize,
    readers: Vec<Reader>,
    closed: bool,
    /// Shutdown's deadline: no push waits for room past it, whatever `block_timeout` says.
    stop_waiting_at: Option<Instant>,
    pushed_records: u64,
    dropped_records: u64,
    dropped_bytes: u64,
    /// Pushes that had to wait for room (block policy).
    blocked_pushes: u64,
}

impl State {
    fn tail(&self) -> u64 {
        self.head + self.records.len() as u64
    }

    /// Evicts the oldest record; counts it as dropped for every reader that had not read it.
    fn evict_front(&mut self) {
        let Some(record) = self.records.pop_front() else { return };
        let seq = self.head;
        self.head += 1;
        self.used -= cost(&record);
        let len = record.bytes.len() as u64;
        let mut lost = false;
        for r in &mut self.readers {
            if r.next <= seq {
                r.next = seq + 1;
                r.dropped_records += 1;
                r.dropped_bytes += len;
                // Lost to the pipeline only if a required sink misses it; an optional one
                // skipping counts against that sink alone.
                lost |= !r.optional;
            }
            r.acked = r.acked.max(seq + 1);
        }
        if lost {
            self.drop_record(&record);
        }
    }

    /// Every record below this is acknowledged by every required reader.
    fn required_floor(&self) -> u64 {
        self.readers.iter().filter(|r| !r.optional).map(|r| r.acked).min().unwrap_or_else(|| self.tail())
    }

    fn drop_record(&mut self, record: &Record) {
        self.dropped_records += 1;
        self.dropped_bytes += record.bytes.len() as u64;
        record.origin.counters.dropped(1, record.bytes.len() as u64);
    }

    fn reclaim(&mut self) {
        let floor = self.readers.iter().map(|r| r.acked).min().unwrap_or(self.head);
        while self.head < floor {
            if let Some(record) = self.records.pop_front() {
                self.used -= cost(&record);
            }
            self.head += 1;
        }
    }
}

/// `[ring]`: the ring's size and what happens when it is full.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    pub capacity: ByteSize,
    pub policy: Policy,
    pub block_timeout: Dur,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self { capacity: ByteSize(64 << 20), policy: Policy::DropOldest, block_timeout: Dur(Duration::from_secs(5)) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Writers never wait: the oldest records are dropped and counted.
    DropOldest,
    /// Writers wait for room up to `block_timeout`; then the newest are dropped and counted.
    Block,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::DropOldest => "drop_oldest",
            Policy::Block => "block",
        })
    }
}

pub struct Ring {
    state: Mutex<State>,
    /// Signalled when space is freed (block policy waits on it) or the ring drains.
    room: Condvar,
    /// Wakes readers waiting for records.
    readable: Notify,
    capacity: usize,
    policy: Policy,
    block_timeout: Duration,
}

impl Ring {
    pub fn new(capacity: usize, policy: Policy, block_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            room: Condvar::new(),
            readable: Notify::new(),
            capacity,
            policy,
            block_timeout,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds a reader that sees every record pushed from now on; an `optional` one is skipped
    /// ahead instead of holding the ring full.
    pub fn add_reader(&self, name: &str, optional: bool) -> ReaderId {
        let mut s = self.lock();
        let tail = s.tail();
        s.readers.push(Reader {
            name: name.into(),
            optional,
            next: tail,
            acked: tail,
            dropped_records: 0,
            dropped_bytes: 0,
        });
        ReaderId(s.readers.len() - 1)
    }

    /// Pushes records in order, applying the policy when the ring is full.
    pub fn push(&self, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let mut s = self.lock();
        let mut waited = false;
        // block_timeout bounds the wait since the last progress: a sink that is slow but
        // moving loses nothing, a stalled one costs one timeout per batch, not one per record.
        let mut deadline: Option<Instant> = None;
        for record in batch {
            let c = cost(&record);
            loop {
                if s.used + c <= self.capacity || s.records.is_empty() {
                    s.used += c;
                    s.pushed_records += 1;
                    s.records.push_back(record);
                    deadline = None;
                    break;
                }
                if s.head < s.required_floor() {
                    // Only optional readers hold the oldest record: they skip it.
                    s.evict_front();
                    continue;
                }
                match self.policy {
                    Policy::DropOldest => s.evict_front(),
                    Policy::Block => {
                        let now = Instant::now();
                        let mut until = *deadline.get_or_insert(now + self.block_timeout);
                        until = s.stop_waiting_at.map_or(until, |at| until.min(at));
                        if now >= until || s.closed {
                            s.drop_record(&record);
                            break;
                        }
                        if !waited {
                            waited = true;
                            s.blocked_pushes += 1;
                        }
                        // Readers may be asleep, waiting for what this push already added.
                        self.readable.notify_waiters();
                        s = self.room.wait_timeout(s, until - now).unwrap_or_else(|e| e.into_inner()).0;
                    }
                }
            }
        }
        drop(s);
        self.readable.notify_waiters();
    }

    /// Pushes records from the front of `batch` while they fit without taking anything from
    /// a required reader; the rest stays in `batch`. For a source that has its own place for
    /// what waits (a volume file's memory): it waits rather than make the ring drop.
    pub fn push_fitting(&self, batch: &mut VecDeque<Record>) {
        if batch.is_empty() {
            return;
        }
        let mut s = self.lock();
        while let Some(record) = batch.front() {
            let c = cost(record);
            if s.used + c > self.capacity && !s.records.is_empty() {
                if s.head < s.required_floor() {
                    s.evict_front();
                    continue;
                }
                break;
            }
            if let Some(record) = batch.pop_front() {
                s.used += c;
                s.pushed_records += 1;
                s.records.push_back(record);
            }
        }
        drop(s);
        self.readable.notify_waiters();
    }

    /// Whether `bytes` fit now without taking anything from a required reader (records that
    /// only optional readers still hold make room, as a push would).
    pub fn has_room(&self, bytes: usize) -> bool {
        let mut s = self.lock();
        while s.used + bytes > self.capacity && s.head < s.required_floor() {
            s.evict_front();
        }
        s.used + bytes <= self.capacity
    }

    /// Up to `max_records` records (and about `max_bytes`) for `reader`, without waiting.
    pub fn try_read(&self, reader: ReaderId, max_records: usize, max_bytes: usize) -> Option<Batch> {
        let mut s = self.lock();
        let head = s.head;
        let tail = s.tail();
        let r = &s.readers[reader.0];
        let first = r.next.max(head);
        if first >= tail {
            return None;
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        for record in s.records.range((first - head) as usize..) {
            if records.len() >= max_records || (bytes >= max_bytes && !records.is_empty()) {
                break;
            }
            bytes += record.bytes.len();
            records.push(record.clone());
        }
        s.readers[reader.0].next = first + records.len() as u64;
        Some(Batch { first, records })
    }

    /// Waits for records for `reader`; `None` once the ring is closed and this reader has
    /// had everything.
    pub async fn read(&self, reader: ReaderId, max_records: usize, max_bytes: usize) -> Option<Batch> {
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(batch) = self.try_read(reader, max_records, max_bytes) {
                return Some(batch);
            }
            if self.lock().closed {
                return None;
            }
            notified.await;
        }
    }

    /// `reader` has delivered everything below `end`.
    pub fn ack(&self, reader: ReaderId, end: u64) {
        let mut s = self.lock();
        let r = &mut s.readers[reader.0];
        r.acked = r.acked.max(end);
        s.reclaim();
        drop(s);
        self.room.notify_all();
    }

    /// Shutdown has begun and must be over by `at`: pushes waiting for room (block policy) give
    /// up then, dropping (and counting) their records, so that writers held in FUSE requests
    /// cannot stretch shutdown one `block_timeout` after another.
    pub fn stop_waiting_at(&self, at: Instant) {
        self.lock().stop_waiting_at = Some(at);
        self.room.notify_all();
    }

    /// No more records will come; readers finish what is there.
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.notify_all();
        self.readable.notify_waiters();
    }

    /// Waits until every required reader has acknowledged every record, or `deadline`.
    /// Returns the records still unacknowledged.
    pub fn wait_drained(&self, deadline: Instant) -> u64 {
        let mut s = self.lock();
        loop {
            let left = s.tail() - s.required_floor().min(s.tail());
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            s = self
                .room
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn snapshot(&self) -> RingSnapshot {
        let s = self.lock();
        let tail = s.tail();
        RingSnapshot {
            capacity_bytes: self.capacity as u64,
            used_bytes: s.used as u64,
            records: s.records.len() as u64,
            policy: self.policy.to_string(),
            pushed_records_total: s.pushed_records,
            dropped_records_total: s.dropped_records,
            dropped_bytes_total: s.dropped_bytes,
            blocked_pushes_total: s.blocked_pushes,
            readers: s
                .readers
                .iter()
                .map(|r| ReaderSnapshot {
                    name: r.name.clone(),
                    optional: r.optional,
                    lag_records: tail.saturating_sub(r.next),
                    in_flight_records: r.next.saturating_sub(r.acked),
                    dropped_records_total: r.dropped_records,
                    dropped_bytes_total: r.dropped_bytes,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::record::tests::record;

    fn ring(records: usize, policy: Policy) -> Ring {
        Ring::new(records * (RECORD_OVERHEAD + 1), policy, Duration::from_millis(50))
    }

    fn rec(b: u8) -> Record {
        record(&[b])
    }

    fn bytes(batch: &Batch) -> Vec<u8> {
        batch.records.iter().map(|r| r.bytes[0]).collect()
    }

    /// Reads and acknowledges everything until the ring closes, as a sink does.
    fn read_all(ring: &Ring, reader: ReaderId) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut got = Vec::new();
            while let Some(batch) = ring.read(reader, 10, 1 << 20).await {
                got.extend(bytes(&batch));
                ring.ack(reader, batch.end());
            }
            got
        })
    }

    #[test]
    fn drop_oldest_counts_what_each_reader_missed() {
        let ring = ring(3, Policy::DropOldest);
        let a = ring.add_reader("a", false);
        let b = ring.add_reader("b", false);
        ring.push(vec![rec(1), rec(2)]);
        // a reads 1 and 2 (in flight), b reads nothing yet.
        let batch = ring.try_read(a, 10, 1 << 20).unwrap();
        assert_eq!(bytes(&batch), vec![1, 2]);
        ring.push(vec![rec(3), rec(4), rec(5)]);
        let snap = ring.snapshot();
        assert_eq!(snap.records, 3);
        assert_eq!(snap.readers[0].dropped_records_total, 0, "a had 1 and 2 in flight");
        assert_eq!(snap.readers[1].dropped_records_total, 2);
        assert_eq!(snap.dropped_records_total, 2);
        assert_eq!(bytes(&ring.try_read(b, 10, 1 << 20).unwrap()), vec![3, 4, 5]);
        assert_eq!(bytes(&ring.try_read(a, 10, 1 << 20).unwrap()), vec![3, 4, 5]);
    }

    #[test]
    fn an_optional_reader_is_skipped_not_waited_for() {
        let ring = ring(3, Policy::Block);
        let required = ring.add_reader("files", false);
        let optional = ring.add_reader("debug", true);
        // The required reader keeps up; the optional one never reads.
        for b in 1..=6 {
            ring.push(vec![rec(b)]);
            let batch = ring.try_read(required, 10, 1 << 20).unwrap();
            ring.ack(required, batch.end());
        }
        let snap = ring.snapshot();
        assert_eq!(snap.blocked_pushes_total, 0, "nobody waited for the optional reader");
        assert_eq!(snap.dropped_records_total, 0, "nothing was lost to the pipeline");
        assert_eq!(snap.readers[0].dropped_records_total, 0);
        assert_eq!(snap.readers[1].dropped_records_total, 3, "the optional reader skipped the oldest three");
        // It resumes with what is still there, in order.
        assert_eq!(bytes(&ring.try_read(optional, 10, 1 << 20).unwrap()), vec![4, 5, 6]);
        // Shutdown does not wait for it.
        assert_eq!(ring.wait_drained(Instant::now() + Duration::from_millis(1)), 0);
    }

    #[test]
    fn space_returns_only_when_every_reader_acked() {
        let ring = ring(2, Policy::Block);
        let a = ring.add_reader("a", false);
        let b = ring.add_reader("b", false);
        ring.push(vec![rec(1), rec(2)]);
        let ba = ring.try_read(a, 10, 1 << 20).unwrap();
        ring.ack(a, ba.end());
        assert_eq!(ring.snapshot().records, 2);
        let bb = ring.try_read(b, 10, 1 << 20).unwrap();
        ring.ack(b, bb.end());
        assert_eq!(ring.snapshot().records, 0);
        assert_eq!(ring.snapshot().used_bytes, 0);
    }

    #[test]
    fn block_waits_for_room_then_drops_the_newest() {
        let ring = Arc::new(ring(2, Policy::Block));
        let a = ring.add_reader("a", false);
        ring.push(vec![rec(1), rec(2)]);
        // Nobody acks: after one block_timeout the newest are dropped, all of them at once.
        let start = Instant::now();
        ring.push(vec![rec(3), rec(30), rec(31)]);
        assert!(start.elapsed() < Duration::from_millis(500), "one timeout for the batch, not one per record");
        let snap = ring.snapshot();
        assert_eq!((snap.records, snap.dropped_records_total, snap.blocked_pushes_total), (2, 3, 1));

        // A reader acking in time lets the push through.
        let r2 = ring.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            let batch = r2.try_read(a, 1, 1 << 20).unwrap();
            r2.ack(a, batch.end());
        });
        ring.push(vec![rec(4)]);
        t.join().unwrap();
        assert_eq!(ring.snapshot().dropped_records_total, 3);
        assert_eq!(bytes(&ring.try_read(a, 10, 1 << 20).unwrap()), vec![2, 4]);
    }

    #[test]
    fn a_blocked_push_wakes_sleeping_readers() {
        let ring = Arc::new(Ring::new(2 * (RECORD_OVERHEAD + 1), Policy::Block, Duration::from_secs(30)));
        let a = ring.add_reader("a", false);
        let r2 = ring.clone();
        // Three records into room for two: the push blocks after the second.
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r2.push(vec![rec(1), rec(2), rec(3)]);
            r2.close();
        });
        let got = read_all(&ring, a);
        pusher.join().unwrap();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(ring.snapshot().dropped_records_total, 0);
    }

    #[test]
    fn readers_wake_and_finish_after_close() {
        let ring = Arc::new(ring(8, Policy::DropOldest));
        let a = ring.add_reader("a", false);
        let r2 = ring.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r2.push(vec![rec(7)]);
            r2.close();
        });
        let got = read_all(&ring, a);
        pusher.join().unwrap();
        assert_eq!(got, vec![7]);
        assert_eq!(ring.wait_drained(Instant::now() + Duration::from_millis(1)), 0);
    }
}
