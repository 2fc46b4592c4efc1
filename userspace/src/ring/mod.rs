//! The one shared ring: every source pushes records in, every sink reads them out.
//!
//! Records are compact (a 24-byte header and the line, see [`region`]) in a memfd region
//! that another process can map; the stream a record belongs to is named by a slot in the
//! ring's table of owners, not copied. Each sink is a reader with its own position; a
//! record's space comes back when every reader has acknowledged it. Reads copy a batch out
//! in one piece outside the lock, and pushes copy in under it a chunk at a time, so pushing
//! and draining go on together.
//!
//! When a push finds no room: records that only optional readers still hold are evicted
//! (counted against those readers). Then the policy decides. `drop_oldest` takes space from
//! the head, but only from a tenant, then a source, holding at least as much as the pusher:
//! a record of a lighter one at the head makes the pusher's own record go instead. `block`
//! makes the pusher wait up to `block_timeout` and then drops its newest records. The last
//! eighth of the ring is kept for sources and tenants holding less than an eighth: a flood
//! fills at most the rest, and a quiet source always finds room. Optional per-source and
//! per-tenant rates drop (or, under `block`, delay) what goes beyond them, counted as
//! throttled. Every loss is counted against the stream, its tenant and each reader.

mod owners;
mod rate;
pub mod region;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::api::{ReaderSnapshot, RingSnapshot};
use crate::record::{Origin, Record};
use crate::state::OriginImage;
use crate::state::WorkerState;
use crate::values::{lock, ByteSize, Dur};
use owners::Owners;
pub use owners::Rates;
use region::{footprint, Header, Region, HEADER};

/// Bytes a push copies in under the lock before it lets readers in.
const CHUNK: usize = 64 << 10;
/// One part in this many of the ring is kept for sources and tenants holding less than it.
const RESERVE: usize = 8;
/// An empty ring gives its touched pages back at most this often.
const GIVE_BACK: Duration = Duration::from_secs(1);

/// A place in the ring: in bytes (where a record starts) and in records (its number).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    pub pos: u64,
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderId(usize);

/// Records handed to a reader: a copy, so they outlive their place in the ring.
#[derive(Debug)]
pub struct Batch {
    /// The mark after the last record: what to acknowledge.
    pub end: Mark,
    pub records: Vec<Record>,
}

#[derive(Debug)]
struct Reader {
    name: String,
    /// Skipped ahead rather than waited for.
    optional: bool,
    /// Next record to hand out.
    next: Mark,
    /// Every record before this is acknowledged.
    acked: Mark,
    /// Where a copy out of the ring is under way: the head stays before it.
    copying: Option<u64>,
    dropped_records: u64,
    dropped_bytes: u64,
}

struct State {
    head: Mark,
    tail: Mark,
    readers: Vec<Reader>,
    owners: Owners,
    closed: bool,
    /// Shutdown's deadline: no push waits for room past it, whatever `block_timeout` says.
    stop_waiting_at: Option<Instant>,
    pushed_records: u64,
    dropped_records: u64,
    dropped_bytes: u64,
    throttled_records: u64,
    throttled_bytes: u64,
    /// Pushes that had to wait for room or rate (block policy).
    blocked_pushes: u64,
    /// Pages from here to the tail may have been touched since they were last given back.
    touched_from: u64,
    given_back_at: Option<Instant>,
}

impl State {
    fn used(&self) -> usize {
        (self.tail.pos - self.head.pos) as usize
    }

    /// Every record before this is acknowledged by every required reader.
    fn required_floor(&self) -> u64 {
        self.readers.iter().filter(|r| !r.optional).map(|r| r.acked.pos).min().unwrap_or(self.tail.pos)
    }

    fn copying_at_head(&self) -> bool {
        self.readers.iter().any(|r| r.copying == Some(self.head.pos))
    }

    /// The head moves past its record `h`, whose space its owners no longer hold.
    fn pass_head(&mut self, h: Header) {
        self.owners.release(h.stream, h.footprint() as u64);
        self.head = Mark { pos: self.head.pos + h.footprint() as u64, index: self.head.index + 1 };
    }

    /// Counts a record that will not reach the sinks against its stream, tenant and the ring.
    fn lose(&mut self, id: u32, len: usize, loss: Loss) {
        let len = len as u64;
        match loss {
            Loss::Dropped => {
                self.owners.dropped(id, len);
                self.dropped_records += 1;
                self.dropped_bytes += len;
            }
            Loss::Throttled => {
                self.owners.throttled(id, len);
                self.throttled_records += 1;
                self.throttled_bytes += len;
            }
        }
    }

    fn publish(&self, region: &Region) {
        region.publish(self.head.pos, self.tail.pos);
    }
}

#[derive(Clone, Copy)]
enum Loss {
    /// No room.
    Dropped,
    /// Beyond a rate.
    Throttled,
}

/// What a push found.
enum Room {
    Fits,
    Full,
    /// The head is being copied out: wait for it.
    Copying,
}

/// `[ring]`: the ring's size, what happens when it is full, and optional rates.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    pub capacity: ByteSize,
    pub policy: Policy,
    pub block_timeout: Dur,
    /// Bytes per second one source (a container, a volume, a service) may push.
    pub source_rate: Option<ByteSize>,
    /// Bytes per second one tenant may push.
    pub tenant_rate: Option<ByteSize>,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            capacity: ByteSize(64 << 20),
            policy: Policy::DropOldest,
            block_timeout: Dur(Duration::from_secs(5)),
            source_rate: None,
            tenant_rate: None,
        }
    }
}

impl RingConfig {
    pub fn rates(&self) -> Rates {
        Rates { source: self.source_rate.map(|r| r.0), tenant: self.tenant_rate.map(|r| r.0) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Writers never wait: the oldest records of whoever holds most are dropped and counted.
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
    region: Region,
    state: Mutex<State>,
    /// Signalled when space is freed (block policy waits on it), a copy out ends, or the ring
    /// drains.
    room: Condvar,
    /// Wakes readers waiting for records.
    readable: Notify,
    policy: Policy,
    block_timeout: Duration,
    rated: bool,
}

/// Capture times as nanoseconds; the records of one capture share theirs, so the last one is
/// kept.
#[derive(Default)]
struct Stamp {
    last: Option<(SystemTime, u64)>,
}

impl Stamp {
    fn of(&mut self, t: SystemTime) -> u64 {
        match self.last {
            Some((at, ns)) if at == t => ns,
            _ => {
                let ns = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
                self.last = Some((t, ns));
                ns
            }
        }
    }
}

impl Ring {
    /// A ring of `capacity` bytes (whole pages) in a fresh memfd.
    pub fn new(capacity: usize, policy: Policy, block_timeout: Duration, rates: Rates) -> io::Result<Self> {
        Self::keeping(capacity, policy, block_timeout, rates, None)
    }

    /// A ring whose streams' origins are kept in `state` (under its generation), so that another
    /// worker can deliver what it holds.
    pub fn keeping(
        capacity: usize,
        policy: Policy,
        block_timeout: Duration,
        rates: Rates,
        state: Option<Arc<WorkerState>>,
    ) -> io::Result<Self> {
        let generation = crate::values::random_u64();
        let region = Region::new(capacity, generation)?;
        Ok(Self {
            region,
            state: Mutex::new(State {
                head: Mark::default(),
                tail: Mark::default(),
                readers: Vec::new(),
                owners: Owners::new(rates, state.map(|s| (s, generation))),
                closed: false,
                stop_waiting_at: None,
                pushed_records: 0,
                dropped_records: 0,
                dropped_bytes: 0,
                throttled_records: 0,
                throttled_bytes: 0,
                blocked_pushes: 0,
                touched_from: 0,
                given_back_at: None,
            }),
            room: Condvar::new(),
            readable: Notify::new(),
            policy,
            block_timeout,
            rated: rates.source.is_some() || rates.tenant.is_some(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.region.capacity()
    }

    /// The number this ring's stream origins are kept under.
    pub fn generation(&self) -> u64 {
        self.region.generation()
    }

    /// Pushes records read from the BPF ring buffer up to its position `read`, and marks
    /// that far as pushed (before the reader gives that space back to the kernel).
    pub fn push_events(&self, batch: Vec<Record>, read: u64) {
        self.push(batch);
        self.region.set_events_mark(read);
    }

    /// How far into the BPF ring buffer the records pushed here (or carried over) reach.
    pub fn events_mark(&self) -> u64 {
        self.region.events_mark()
    }

    /// The memfd holding the ring, for a process that maps it (see [`region::View`]).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>, for_: Duration) -> MutexGuard<'a, State> {
        self.room.wait_timeout(s, for_).unwrap_or_else(|e| e.into_inner()).0
    }

    /// Adds a reader that sees every record pushed from now on; an `optional` one is skipped
    /// ahead instead of holding the ring full.
    pub fn add_reader(&self, name: &str, optional: bool) -> ReaderId {
        let mut s = self.lock();
        let tail = s.tail;
        s.readers.push(Reader {
            name: name.into(),
            optional,
            next: tail,
            acked: tail,
            copying: None,
            dropped_records: 0,
            dropped_bytes: 0,
        });
        let id = s.readers.len() - 1;
        self.region.publish_reader(id, name, tail.pos, tail.pos);
        ReaderId(id)
    }

    /// Pushes records in order, applying the rates and the policy.
    pub fn push(&self, batch: Vec<Record>) {
        self.push_from(&mut VecDeque::from(batch), false);
    }

    /// Pushes records from the front of `batch` while they fit without taking anything from
    /// a required reader and within the rates; the rest stays in `batch`. For a source that
    /// has its own place for what waits (a volume file's memory): it waits rather than make
    /// the ring drop.
    pub fn push_fitting(&self, batch: &mut VecDeque<Record>) {
        self.push_from(batch, true);
    }

    /// Whether `bytes` more of `origin`'s stream fit now without taking anything from a
    /// required reader (records only optional readers still hold make room, as a push would).
    pub fn has_room(&self, origin: &Arc<Origin>, bytes: usize) -> bool {
        let mut s = self.lock();
        let head = s.head.pos;
        let id = s.owners.stream(origin, head, Instant::now());
        matches!(self.room_for(&mut s, id, bytes, true), Room::Fits)
    }

    /// Makes room for `size` bytes of stream `id` as far as the policy allows (`fitting`:
    /// taking nothing from a required reader).
    fn room_for(&self, s: &mut State, id: u32, size: usize, fitting: bool) -> Room {
        let capacity = self.capacity();
        let reserve = capacity / RESERVE;
        if s.used() + size <= capacity - reserve {
            // Room for anyone: no need to ask who holds what.
            return Room::Fits;
        }
        let limit = if s.owners.small(id, size as u64, reserve as u64) { capacity } else { capacity - reserve };
        loop {
            if s.used() + size <= limit {
                return Room::Fits;
            }
            if s.head == s.tail {
                return Room::Full;
            }
            if s.copying_at_head() {
                return Room::Copying;
            }
            // SAFETY: head < tail: a record is there, and nobody writes it.
            let h = unsafe { self.region.header(s.head.pos) };
            let free = s.head.pos < s.required_floor();
            let fair =
                !fitting && self.policy == Policy::DropOldest && s.owners.weight(h.stream) >= s.owners.weight(id);
            if !(free || fair) {
                return Room::Full;
            }
            self.evict_head(s, h);
        }
    }

    /// Evicts the record at the head; counts it as dropped for every reader that had not read
    /// it, and against its stream if a required reader misses it.
    fn evict_head(&self, s: &mut State, h: Header) {
        let pos = s.head.pos;
        s.pass_head(h);
        let next = s.head;
        let len = u64::from(h.len);
        let mut lost = false;
        for (i, r) in s.readers.iter_mut().enumerate() {
            if r.next.pos <= pos {
                r.next = next;
                r.dropped_records += 1;
                r.dropped_bytes += len;
                // Lost to the pipeline only if a required sink misses it; an optional one
                // skipping counts against that sink alone.
                lost |= !r.optional;
            }
            if r.acked.pos < next.pos {
                r.acked = next;
            }
            self.region.publish_reader(i, &r.name, r.next.pos, r.acked.pos);
        }
        if lost {
            s.lose(h.stream, len as usize, Loss::Dropped);
        }
    }

    fn push_from(&self, batch: &mut VecDeque<Record>, fitting: bool) {
        if batch.is_empty() {
            return;
        }
        let mut s = self.lock();
        let mut now = Instant::now();
        let mut waited = false;
        // block_timeout bounds the wait since the last progress: a sink that is slow but
        // moving loses nothing, a stalled one costs one timeout per batch, not one per record.
        let mut deadline: Option<Instant> = None;
        let mut chunk = 0;
        let mut last: Option<(*const Origin, u32)> = None;
        let mut stamp = Stamp::default();
        while let Some(record) = batch.front() {
            let id = match last {
                Some((p, id)) if std::ptr::eq(p, Arc::as_ptr(&record.origin)) => id,
                _ => {
                    let head = s.head.pos;
                    let id = s.owners.stream(&record.origin, head, now);
                    last = Some((Arc::as_ptr(&record.origin), id));
                    id
                }
            };
            let len = record.bytes.len();
            let size = footprint(len);
            if len > region::MAX_LEN || size > self.capacity() {
                s.lose(id, len, Loss::Dropped);
                batch.pop_front();
                continue;
            }
            let within = !self.rated || s.owners.allows(id, len, now);
            let room = if within { self.room_for(&mut s, id, size, fitting) } else { Room::Full };
            let loss = if within { Loss::Dropped } else { Loss::Throttled };
            match room {
                Room::Fits => {
                    if self.rated {
                        s.owners.take(id, len);
                    }
                    let pos = s.tail.pos;
                    let header = Header {
                        len: len as u32,
                        split: record.split,
                        unterminated: record.unterminated,
                        stream: id,
                        seq: record.seq,
                        at_ns: stamp.of(record.captured_at),
                    };
                    // SAFETY: `size` bytes after the tail are free (room_for said so) and
                    // only pushers, under this lock, write there.
                    unsafe {
                        self.region.write(pos, &header.encode());
                        self.region.write(pos + HEADER as u64, &record.bytes);
                    }
                    s.tail = Mark { pos: pos + size as u64, index: s.tail.index + 1 };
                    let tail = s.tail.pos;
                    s.owners.hold(id, size as u64, tail);
                    s.pushed_records += 1;
                    batch.pop_front();
                    deadline = None;
                    chunk += size;
                    if chunk >= CHUNK {
                        // Let readers in between chunks of a long batch.
                        chunk = 0;
                        s.publish(&self.region);
                        drop(s);
                        self.readable.notify_waiters();
                        s = self.lock();
                        now = Instant::now();
                    }
                }
                Room::Copying => s = self.wait(s, Duration::from_millis(1)),
                // A source with its own place for what waits keeps it, unless the rate says drop.
                Room::Full if fitting && (within || self.policy == Policy::Block) => break,
                Room::Full if self.policy == Policy::DropOldest => {
                    s.lose(id, len, loss);
                    batch.pop_front();
                }
                Room::Full => {
                    now = Instant::now();
                    let mut until = *deadline.get_or_insert(now + self.block_timeout);
                    until = s.stop_waiting_at.map_or(until, |at| until.min(at));
                    if now >= until || s.closed {
                        s.lose(id, len, loss);
                        batch.pop_front();
                        continue;
                    }
                    if !waited {
                        waited = true;
                        s.blocked_pushes += 1;
                    }
                    let for_ = if within { until - now } else { s.owners.wait(id, len, now).min(until - now) };
                    s.publish(&self.region);
                    // Readers may be asleep, waiting for what this push already added.
                    self.readable.notify_waiters();
                    s = self.wait(s, for_);
                    now = Instant::now();
                }
            }
        }
        s.publish(&self.region);
        drop(s);
        self.readable.notify_waiters();
    }

    /// Up to `max_records` records (and about `max_bytes`) for `reader`, without waiting.
    pub fn try_read(&self, reader: ReaderId, max_records: usize, max_bytes: usize) -> Option<Batch> {
        let mut s = self.lock();
        let r = &s.readers[reader.0];
        let first = if r.next.pos < s.head.pos { s.head } else { r.next };
        if first.pos >= s.tail.pos {
            return None;
        }
        let mut end = first;
        let mut bytes = 0;
        let mut origins: Vec<(u32, Arc<Origin>)> = Vec::new();
        while end.pos < s.tail.pos && ((end.index - first.index) as usize) < max_records {
            if bytes >= max_bytes && end != first {
                break;
            }
            // SAFETY: records lie from the head to the tail; pushers write only after the tail.
            let h = unsafe { self.region.header(end.pos) };
            // Newest first: a batch is mostly runs of one stream.
            if !origins.iter().rev().any(|(id, _)| *id == h.stream) {
                origins.push((h.stream, s.owners.origin(h.stream).clone()));
            }
            bytes += h.len as usize;
            end = Mark { pos: end.pos + h.footprint() as u64, index: end.index + 1 };
        }
        let r = &mut s.readers[reader.0];
        r.next = end;
        r.copying = Some(first.pos);
        self.region.publish_reader(reader.0, &r.name, end.pos, r.acked.pos);
        drop(s);
        let span = (end.pos - first.pos) as usize;
        // SAFETY: the head stays before `first` while `copying` is set, and pushers write only
        // after the tail, so nothing writes the span.
        let copy = Bytes::copy_from_slice(unsafe { self.region.slice(first.pos, span) });
        self.lock().readers[reader.0].copying = None;
        self.room.notify_all();
        Some(Batch { end, records: records_of(&copy, &origins) })
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
            if tokio::time::timeout(GIVE_BACK, notified).await.is_err() {
                self.give_back(&mut self.lock());
            }
        }
    }

    /// `reader` has delivered everything before `end`.
    pub fn ack(&self, reader: ReaderId, end: Mark) {
        let mut s = self.lock();
        let r = &mut s.readers[reader.0];
        if r.acked.pos < end.pos {
            r.acked = end;
        }
        self.region.publish_reader(reader.0, &r.name, r.next.pos, r.acked.pos);
        let floor = s.readers.iter().map(|r| r.acked).min_by_key(|m| m.pos).unwrap_or(s.head);
        while s.head.pos < floor.pos {
            // SAFETY: head < tail, and acknowledged records are not written.
            let h = unsafe { self.region.header(s.head.pos) };
            s.pass_head(h);
        }
        s.publish(&self.region);
        self.give_back(&mut s);
        drop(s);
        self.room.notify_all();
    }

    /// Gives the pages an empty ring touched back to the system, at most every [`GIVE_BACK`]:
    /// a burst's memory is not held after it.
    fn give_back(&self, s: &mut State) {
        if s.head != s.tail || s.touched_from >= s.tail.pos {
            return;
        }
        let now = Instant::now();
        if s.given_back_at.is_some_and(|at| now.duration_since(at) < GIVE_BACK) {
            return;
        }
        self.region.release(s.touched_from, s.tail.pos);
        s.owners.sweep(s.head.pos);
        s.touched_from = s.tail.pos;
        s.given_back_at = Some(now);
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

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits until every required reader has acknowledged every record, or `deadline`.
    /// Returns the records still unacknowledged.
    pub fn wait_drained(&self, deadline: Instant) -> u64 {
        let mut s = self.lock();
        loop {
            let floor = s.readers.iter().filter(|r| !r.optional).map(|r| r.acked.index).min();
            let left = s.tail.index - floor.unwrap_or(s.tail.index).min(s.tail.index);
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            s = self.wait(s, (deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// Pushes what an earlier worker's ring (its memfd `old`) still held for some sink: every
    /// record from the lowest acknowledged position on, with its stream's origin as `state`
    /// kept it for that ring's generation. Returns the records pushed and those of them some
    /// sink had already been handed (delivered again now: at least once).
    pub fn take_over(&self, old: BorrowedFd<'_>, state: &WorkerState) -> io::Result<(u64, u64)> {
        let view = region::View::open(old)?;
        let origins = state.streams(view.generation());
        let readers = view.readers();
        let from = readers.iter().map(|r| r.acked).min().unwrap_or(view.tail());
        let handed = readers.iter().map(|r| r.next).max().unwrap_or(from);
        let mut made: HashMap<u32, Arc<Origin>> = HashMap::new();
        let unknown = Arc::new(OriginImage::unknown().origin());
        let (mut records, mut again) = (Vec::new(), 0);
        for (pos, h, bytes) in view.records(from) {
            let origin = match origins.get(&h.stream) {
                Some(o) => made.entry(h.stream).or_insert_with(|| Arc::new(o.origin())).clone(),
                None => unknown.clone(),
            };
            again += u64::from(pos < handed);
            records.push(Record {
                captured_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(h.at_ns),
                origin,
                seq: h.seq,
                bytes: Bytes::from(bytes),
                split: h.split,
                unterminated: h.unterminated,
            });
        }
        let n = records.len() as u64;
        // The old ring's records are this one's now, and with them how far they reach.
        self.push_events(records, view.events_mark());
        Ok((n, again))
    }

    pub fn snapshot(&self) -> RingSnapshot {
        let s = self.lock();
        RingSnapshot {
            capacity_bytes: self.capacity() as u64,
            used_bytes: s.used() as u64,
            memory_bytes: self.region.resident(),
            records: s.tail.index - s.head.index,
            policy: self.policy.to_string(),
            pushed_records_total: s.pushed_records,
            dropped_records_total: s.dropped_records,
            dropped_bytes_total: s.dropped_bytes,
            throttled_records_total: s.throttled_records,
            throttled_bytes_total: s.throttled_bytes,
            blocked_pushes_total: s.blocked_pushes,
            readers: s
                .readers
                .iter()
                .map(|r| ReaderSnapshot {
                    name: r.name.clone(),
                    optional: r.optional,
                    lag_records: s.tail.index.saturating_sub(r.next.index),
                    in_flight_records: r.next.index.saturating_sub(r.acked.index),
                    dropped_records_total: r.dropped_records,
                    dropped_bytes_total: r.dropped_bytes,
                })
                .collect(),
            tenants: s.owners.tenants(),
            sources: s.owners.sources(),
        }
    }
}

/// The records of a copied span: each one's bytes a slice of the copy.
fn records_of(copy: &Bytes, origins: &[(u32, Arc<Origin>)]) -> Vec<Record> {
    let mut records = Vec::new();
    let mut at = 0;
    let mut last = 0;
    while at + HEADER <= copy.len() {
        let h = Header::read(&copy[at..]);
        let start = at + HEADER;
        if origins.get(last).is_none_or(|(id, _)| *id != h.stream) {
            let Some(i) = origins.iter().position(|(id, _)| *id == h.stream) else {
                unreachable!("every stream of the span was looked up under the lock")
            };
            last = i;
        }
        let origin = &origins[last].1;
        records.push(Record {
            captured_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(h.at_ns),
            origin: origin.clone(),
            seq: h.seq,
            bytes: copy.slice(start..start + h.len as usize),
            split: h.split,
            unterminated: h.unterminated,
        });
        at += h.footprint();
    }
    records
}
