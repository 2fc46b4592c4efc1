use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::counters::StreamCounters;
use crate::record::tests::record;

/// Bytes of a test record whose footprint is 1 KiB: a 4 KiB ring holds four, and a source
/// holding more than the reserve (512 B) may fill three.
const KB_RECORD: usize = 1024 - HEADER;

fn ring(capacity: usize, policy: Policy) -> Ring {
    Ring::new(capacity, policy, Duration::from_millis(50), Rates::default()).unwrap()
}

/// A record of `len` bytes, all `b`.
fn rec(b: u8, len: usize) -> Record {
    record(&vec![b; len])
}

/// A stream of the volume `volume`, of tenant `tenant`.
fn origin(volume: &str, tenant: &str) -> Arc<Origin> {
    file(volume, "app.log", tenant)
}

fn file(volume: &str, path: &str, tenant: &str) -> Arc<Origin> {
    Arc::new(Origin {
        host: "h".into(),
        pid: 0,
        volume: volume.into(),
        service: "svc".into(),
        module: "app".into(),
        path: path.into(),
        tenant: tenant.into(),
        container: None,
        counters: StreamCounters::detached(),
    })
}

/// Whether a record read out is of the stream `o` (records carry the ring's copy of it).
fn is(r: &Record, o: &Origin) -> bool {
    (&*r.origin.volume, &*r.origin.path, &*r.origin.tenant) == (&*o.volume, &*o.path, &*o.tenant)
}

fn of(origin: &Arc<Origin>, seq: u64, len: usize) -> Record {
    Record {
        captured_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(seq),
        origin: origin.clone(),
        seq,
        bytes: Bytes::from(vec![seq as u8; len]),
        split: false,
        unterminated: false,
    }
}

fn firsts(batch: &Batch) -> Vec<u8> {
    batch.records.iter().map(|r| r.bytes[0]).collect()
}

/// Reads and acknowledges everything until the ring closes, as a sink does.
fn read_all(ring: &Ring, reader: ReaderId) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut got = Vec::new();
        while let Some(batch) = ring.read(reader, 10, 1 << 20).await {
            got.extend(firsts(&batch));
            ring.ack(reader, batch.end);
        }
        got
    })
}

#[test]
fn records_come_out_as_they_went_in_with_a_small_header() {
    let ring = ring(1 << 20, Policy::DropOldest);
    let a = ring.add_reader("a", false);
    let o = origin("v", "t");
    let mut sent = Vec::new();
    for (i, len) in [0usize, 1, 2, 3, 4, 5, 100, 4096].into_iter().enumerate() {
        let mut r = of(&o, i as u64, len);
        r.bytes = Bytes::from((0..len).map(|j| (j * 7 + i) as u8).collect::<Vec<u8>>());
        r.split = i % 2 == 0;
        r.unterminated = i % 3 == 0;
        sent.push(r);
    }
    ring.push(sent.clone());
    let batch = ring.try_read(a, 100, 1 << 20).unwrap();
    assert_eq!(batch.records.len(), sent.len());
    for (got, want) in batch.records.iter().zip(&sent) {
        assert_eq!(got.bytes, want.bytes);
        assert_eq!((got.seq, got.split, got.unterminated), (want.seq, want.split, want.unterminated));
        assert_eq!(got.captured_at, want.captured_at);
        assert!(is(got, &o));
    }
    let overhead = ring.snapshot().used_bytes as usize - sent.iter().map(|r| r.bytes.len()).sum::<usize>();
    assert!(overhead <= 32 * sent.len(), "{overhead} bytes of overhead for {} records", sent.len());
    // A one-byte record takes 28 bytes.
    assert_eq!(footprint(1), 28);
}

#[test]
fn drop_oldest_counts_what_each_reader_missed() {
    let ring = ring(4096, Policy::DropOldest);
    let a = ring.add_reader("a", false);
    let b = ring.add_reader("b", false);
    let o = origin("v", "");
    ring.push(vec![of(&o, 1, KB_RECORD), of(&o, 2, KB_RECORD)]);
    // a reads 1 and 2 (in flight), b reads nothing yet.
    assert_eq!(firsts(&ring.try_read(a, 10, 1 << 20).unwrap()), vec![1, 2]);
    ring.push(vec![of(&o, 3, KB_RECORD), of(&o, 4, KB_RECORD), of(&o, 5, KB_RECORD)]);
    let snap = ring.snapshot();
    assert_eq!(snap.records, 3, "one source fills all but the reserve");
    assert_eq!(snap.readers[0].dropped_records_total, 0, "a had 1 and 2 in flight");
    assert_eq!(snap.readers[1].dropped_records_total, 2);
    assert_eq!(snap.dropped_records_total, 2);
    assert_eq!(o.counters.stream.snapshot().dropped_records_total, 2);
    assert_eq!(firsts(&ring.try_read(b, 10, 1 << 20).unwrap()), vec![3, 4, 5]);
    assert_eq!(firsts(&ring.try_read(a, 10, 1 << 20).unwrap()), vec![3, 4, 5]);
}

#[test]
fn an_optional_reader_is_skipped_not_waited_for() {
    let ring = ring(4096, Policy::Block);
    let required = ring.add_reader("files", false);
    let optional = ring.add_reader("debug", true);
    // The required reader keeps up; the optional one never reads.
    for b in 1..=6 {
        ring.push(vec![rec(b, KB_RECORD)]);
        let batch = ring.try_read(required, 10, 1 << 20).unwrap();
        ring.ack(required, batch.end);
    }
    let snap = ring.snapshot();
    assert_eq!(snap.blocked_pushes_total, 0, "nobody waited for the optional reader");
    assert_eq!(snap.dropped_records_total, 0, "nothing was lost to the pipeline");
    assert_eq!(snap.readers[0].dropped_records_total, 0);
    assert_eq!(snap.readers[1].dropped_records_total, 3, "the optional reader skipped the oldest three");
    // It resumes with what is still there, in order.
    assert_eq!(firsts(&ring.try_read(optional, 10, 1 << 20).unwrap()), vec![4, 5, 6]);
    // Shutdown does not wait for it.
    assert_eq!(ring.wait_drained(Instant::now() + Duration::from_millis(1)), 0);
}

#[test]
fn space_returns_only_when_every_reader_acked_and_memory_goes_back() {
    let ring = ring(1 << 20, Policy::Block);
    let a = ring.add_reader("a", false);
    let b = ring.add_reader("b", false);
    ring.push((0..500).map(|i| rec(i as u8, 1000)).collect());
    assert!(ring.snapshot().memory_bytes >= 500 * 1000);
    let ba = ring.try_read(a, 1000, 1 << 20).unwrap();
    ring.ack(a, ba.end);
    assert_eq!(ring.snapshot().records, 500);
    let bb = ring.try_read(b, 1000, 1 << 20).unwrap();
    ring.ack(b, bb.end);
    let snap = ring.snapshot();
    assert_eq!((snap.records, snap.used_bytes), (0, 0));
    assert!(snap.memory_bytes <= 2 * 4096 + 4096, "an empty ring holds {} bytes", snap.memory_bytes);
}

#[test]
fn block_waits_for_room_then_drops_the_newest() {
    let ring = Arc::new(ring(4096, Policy::Block));
    let a = ring.add_reader("a", false);
    ring.push(vec![rec(1, KB_RECORD), rec(2, KB_RECORD), rec(3, KB_RECORD)]);
    // Nobody acks: after one block_timeout the newest are dropped, all of them at once.
    let start = Instant::now();
    ring.push(vec![rec(4, KB_RECORD), rec(40, KB_RECORD), rec(41, KB_RECORD)]);
    assert!(start.elapsed() < Duration::from_millis(500), "one timeout for the batch, not one per record");
    let snap = ring.snapshot();
    assert_eq!((snap.records, snap.dropped_records_total, snap.blocked_pushes_total), (3, 3, 1));

    // A reader acking in time lets the push through.
    let r2 = ring.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(10));
        let batch = r2.try_read(a, 1, 1 << 20).unwrap();
        r2.ack(a, batch.end);
    });
    ring.push(vec![rec(5, KB_RECORD)]);
    t.join().unwrap();
    assert_eq!(ring.snapshot().dropped_records_total, 3);
    assert_eq!(firsts(&ring.try_read(a, 10, 1 << 20).unwrap()), vec![2, 3, 5]);
}

#[test]
fn a_blocked_push_wakes_sleeping_readers() {
    let ring = Arc::new(Ring::new(4096, Policy::Block, Duration::from_secs(30), Rates::default()).unwrap());
    let a = ring.add_reader("a", false);
    let r2 = ring.clone();
    // Six records into room for three: the push blocks after the third.
    let pusher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        r2.push((1..=6).map(|b| rec(b, KB_RECORD)).collect());
        r2.close();
    });
    let got = read_all(&ring, a);
    pusher.join().unwrap();
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(ring.snapshot().dropped_records_total, 0);
}

#[test]
fn readers_wake_and_finish_after_close() {
    let ring = Arc::new(ring(4096, Policy::DropOldest));
    let a = ring.add_reader("a", false);
    let r2 = ring.clone();
    let pusher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        r2.push(vec![rec(7, 1)]);
        r2.close();
    });
    let got = read_all(&ring, a);
    pusher.join().unwrap();
    assert_eq!(got, vec![7]);
    assert_eq!(ring.wait_drained(Instant::now() + Duration::from_millis(1)), 0);
}

#[test]
fn a_flood_cannot_make_a_quiet_source_lose_a_line() {
    let ring = ring(64 << 10, Policy::DropOldest);
    let sink = ring.add_reader("sink", false);
    let flood = origin("flood", "a");
    let quiet = origin("quiet", "b");
    let mut got_quiet = Vec::new();
    let mut seq = 0;
    for round in 0..2000u64 {
        // The flood pushes 40 records for each one of the quiet source; the sink reads 10.
        ring.push((0..40).map(|_| of(&flood, 0, 100)).collect());
        ring.push(vec![of(&quiet, seq, 60)]);
        seq += 1;
        if round % 2 == 0 {
            if let Some(batch) = ring.try_read(sink, 10, 1 << 20) {
                got_quiet.extend(batch.records.iter().filter(|r| is(r, &quiet)).map(|r| r.seq));
                ring.ack(sink, batch.end);
            }
        }
    }
    while let Some(batch) = ring.try_read(sink, 1000, 1 << 20) {
        got_quiet.extend(batch.records.iter().filter(|r| is(r, &quiet)).map(|r| r.seq));
        ring.ack(sink, batch.end);
    }
    assert_eq!(got_quiet, (0..seq).collect::<Vec<_>>(), "the quiet source lost nothing");
    let snap = ring.snapshot();
    let flood_dropped = flood.counters.stream.snapshot().dropped_records_total;
    assert!(flood_dropped > 10_000, "the flood lost {flood_dropped}");
    assert_eq!(snap.dropped_records_total, flood_dropped, "every loss is the flood's");
    assert_eq!(quiet.counters.stream.snapshot().dropped_records_total, 0);
    let tenant = |t: &str| snap.tenants.iter().find(|x| x.tenant == t).unwrap().dropped_records_total;
    assert_eq!((tenant("a"), tenant("b")), (flood_dropped, 0));
}

#[test]
fn a_rate_drops_what_goes_beyond_it_and_counts_it_as_throttled() {
    let rates = Rates { source: Some(10_000), tenant: None };
    let ring = Ring::new(1 << 20, Policy::DropOldest, Duration::from_millis(50), rates).unwrap();
    let a = ring.add_reader("a", false);
    let limited = origin("limited", "");
    let other = origin("other", "");
    // A burst (a tenth of a second of the rate) passes at once; the rest is throttled.
    ring.push((0..20).map(|i| of(&limited, i, 100)).collect());
    ring.push((0..20).map(|i| of(&other, i, 100)).collect());
    let batch = ring.try_read(a, 100, 1 << 20).unwrap();
    let passed = batch.records.iter().filter(|r| is(r, &limited)).count();
    assert_eq!(passed, 10);
    assert_eq!(batch.records.len(), 20, "another source has a rate of its own");
    let c = limited.counters.stream.snapshot();
    assert_eq!((c.throttled_records_total, c.throttled_bytes_total, c.dropped_records_total), (10, 1000, 0));
    assert_eq!(ring.snapshot().throttled_records_total, 20);
}

#[test]
fn a_tenant_rate_holds_over_all_its_sources_and_blocks_under_block() {
    let rates = Rates { source: None, tenant: Some(10_000) };
    let ring = Ring::new(1 << 20, Policy::Block, Duration::from_millis(300), rates).unwrap();
    let a = ring.add_reader("a", false);
    let (one, two, other) = (origin("one", "t"), origin("two", "t"), origin("other", "u"));
    // Tenant t's burst (1000 bytes) goes at once, shared by its two sources; the next record
    // waits for the rate (10 ms for 100 bytes) rather than being dropped.
    ring.push((0..5).map(|i| of(&one, i, 100)).collect());
    ring.push((0..5).map(|i| of(&two, i, 100)).collect());
    let start = Instant::now();
    ring.push(vec![of(&one, 5, 100), of(&two, 5, 100)]);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(15), "delayed by the rate: {waited:?}");
    ring.push(vec![of(&other, 0, 100)]);
    let batch = ring.try_read(a, 100, 1 << 20).unwrap();
    assert_eq!(batch.records.len(), 13, "nothing dropped: delayed");
    let snap = ring.snapshot();
    assert_eq!((snap.throttled_records_total, snap.dropped_records_total), (0, 0));
    assert!(snap.blocked_pushes_total >= 1);
    // While it makes progress it waits as long as the rate says: 20 records, 200 ms.
    let start = Instant::now();
    ring.push((0..20).map(|i| of(&one, 6 + i, 100)).collect());
    assert!(start.elapsed() >= Duration::from_millis(180), "{:?}", start.elapsed());
    assert_eq!(ring.snapshot().throttled_records_total, 0);
    // Once shutdown says stop waiting, what is beyond the rate goes, counted as throttled
    // against its stream and tenant.
    ring.stop_waiting_at(Instant::now());
    ring.push((0..5).map(|i| of(&two, 6 + i, 100)).collect());
    let snap = ring.snapshot();
    assert_eq!(snap.throttled_records_total, 5);
    let t = snap.tenants.iter().find(|t| t.tenant == "t").unwrap();
    assert_eq!((t.throttled_records_total, t.throttled_bytes_total), (5, 500));
    assert_eq!(two.counters.stream.snapshot().throttled_records_total, 5);
}

#[test]
fn another_process_finds_the_unacknowledged_records_in_the_memfd() {
    let ring = ring(1 << 20, Policy::DropOldest);
    let a = ring.add_reader("files", false);
    let o = origin("v", "");
    ring.push((0..10).map(|i| of(&o, i, 10 + i as usize)).collect());
    let batch = ring.try_read(a, 4, 1 << 20).unwrap();
    ring.ack(a, batch.end);
    // A second mapping, from the fd as another process would get it.
    let view = region::View::open(ring.memfd()).unwrap();
    let readers = view.readers();
    assert_eq!(readers.len(), 1);
    assert_eq!((readers[0].name.as_str(), readers[0].acked), ("files", batch.end.pos));
    let left = view.records(readers[0].acked);
    assert_eq!(left.iter().map(|(_, h, _)| h.seq).collect::<Vec<_>>(), (4..10).collect::<Vec<_>>());
    assert!(left.iter().all(|(_, h, b)| b == &vec![h.seq as u8; 10 + h.seq as usize]));
}

#[test]
fn a_new_worker_delivers_what_the_old_ring_held_with_its_origins() {
    let state = crate::state::WorkerState::open(logtap_fusefs::Journal::new(c"t").unwrap()).unwrap();
    let ring =
        Ring::keeping(1 << 20, Policy::Block, Duration::from_secs(1), Rates::default(), Some(state.clone())).unwrap();
    let r = ring.add_reader("files", false);
    let (a, b) = (origin("a", "t1"), origin("b", "t2"));
    // Read from the BPF ring buffer up to 4096: the next worker reads on from there.
    ring.push_events((0..10).map(|i| of(if i % 2 == 0 { &a } else { &b }, i, 5)).collect(), 4096);
    let first = ring.try_read(r, 2, 1 << 20).unwrap();
    ring.ack(r, first.end);
    // Two more handed out, never acknowledged: the worker dies with them in flight.
    ring.try_read(r, 2, 1 << 20).unwrap();

    // The next worker's ring keeps its origins in the same state, under its own generation: a
    // worker killed before the keeper holds it leaves the old ring readable as it was.
    let next =
        Ring::keeping(1 << 20, Policy::Block, Duration::from_secs(1), Rates::default(), Some(state.clone())).unwrap();
    assert_ne!(next.generation(), ring.generation());
    let r2 = next.add_reader("files", false);
    next.push(vec![of(&origin("c", "t3"), 0, 5)]);
    let (pushed, again) = next.take_over(ring.memfd(), &state).unwrap();
    assert_eq!(next.events_mark(), 4096, "the mark comes over with the records");
    assert_eq!((pushed, again), (8, 2));
    let got = next.try_read(r2, 100, 1 << 20).unwrap().records;
    let got = &got[1..];
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), (2..10).collect::<Vec<_>>());
    assert!(got.iter().all(|r| r.origin.volume.as_ref() == if r.seq % 2 == 0 { "a" } else { "b" }));
    assert_eq!(got[1].origin.tenant.as_ref(), "t2");
}

#[test]
fn concurrent_pushers_and_readers_lose_and_repeat_nothing_under_block() {
    let ring = Arc::new(Ring::new(64 << 10, Policy::Block, Duration::from_secs(30), Rates::default()).unwrap());
    let readers: Vec<ReaderId> = (0..3).map(|i| ring.add_reader(&format!("r{i}"), false)).collect();
    let streams: Vec<Arc<Origin>> = (0..3).map(|i| origin(&format!("v{i}"), "")).collect();
    let pushers: Vec<_> = streams
        .iter()
        .cloned()
        .map(|o| {
            let ring = ring.clone();
            std::thread::spawn(move || {
                for chunk in 0..200u64 {
                    ring.push((0..100).map(|i| of(&o, chunk * 100 + i, ((chunk * 100 + i) % 300) as usize)).collect());
                }
            })
        })
        .collect();
    let sinks: Vec<_> = readers
        .iter()
        .map(|&r| {
            let ring = ring.clone();
            let streams = streams.clone();
            std::thread::spawn(move || {
                let mut next = [0u64; 3];
                while next.iter().any(|&n| n < 20_000) {
                    let Some(batch) = ring.try_read(r, 333, 1 << 20) else {
                        std::thread::yield_now();
                        continue;
                    };
                    for rec in &batch.records {
                        let s = streams.iter().position(|o| is(rec, o)).unwrap();
                        assert_eq!(rec.seq, next[s], "stream {s} in order, nothing lost or repeated");
                        assert_eq!(rec.bytes.len() as u64, rec.seq % 300);
                        assert!(rec.bytes.iter().all(|&b| b == rec.seq as u8));
                        next[s] += 1;
                    }
                    ring.ack(r, batch.end);
                }
            })
        })
        .collect();
    for t in pushers.into_iter().chain(sinks) {
        t.join().unwrap();
    }
    let snap = ring.snapshot();
    assert_eq!((snap.pushed_records_total, snap.dropped_records_total, snap.records), (60_000, 0, 0));
}

/// A plain model of the ring under `drop_oldest` (and `block` without waiting): records as a list, holdings summed when
/// asked, the same rules written the simple way.
#[derive(Debug, Default)]
struct Model {
    capacity: usize,
    /// `block` with no wait: what does not fit goes at once.
    block: bool,
    records: VecDeque<(usize, usize, u64)>,
    head: u64,
    readers: Vec<ModelReader>,
    dropped: u64,
}

#[derive(Debug, Default, Clone)]
struct ModelReader {
    optional: bool,
    next: u64,
    acked: u64,
    in_flight: VecDeque<u64>,
    dropped: u64,
}

/// Streams 0 and 1 are one source of tenant 0, stream 2 another source of tenant 0, stream 3
/// a source of tenant 1.
const SOURCE: [usize; 4] = [0, 0, 1, 2];
const TENANT: [usize; 3] = [0, 0, 1];

impl Model {
    fn tail(&self) -> u64 {
        self.head + self.records.len() as u64
    }

    fn used(&self) -> usize {
        self.records.iter().map(|r| footprint(r.1)).sum()
    }

    fn weight(&self, stream: usize) -> (u64, u64) {
        let (src, ten) = (SOURCE[stream], TENANT[SOURCE[stream]]);
        let held = |f: &dyn Fn(usize) -> bool| {
            self.records.iter().filter(|r| f(r.0)).map(|r| footprint(r.1) as u64).sum::<u64>()
        };
        (held(&|s| TENANT[SOURCE[s]] == ten), held(&|s| SOURCE[s] == src))
    }

    fn push(&mut self, stream: usize, len: usize, seq: u64) {
        let size = footprint(len);
        let reserve = self.capacity / RESERVE;
        let (t, s) = self.weight(stream);
        let alone = self.records.iter().all(|r| TENANT[SOURCE[r.0]] == TENANT[SOURCE[stream]]);
        let small = s + size as u64 <= reserve as u64 && (t + size as u64 <= reserve as u64 || alone);
        let limit = if small { self.capacity } else { self.capacity - reserve };
        loop {
            if self.used() + size <= limit {
                self.records.push_back((stream, len, seq));
                return;
            }
            let Some(&(owner, _, _)) = self.records.front() else {
                self.dropped += 1;
                return;
            };
            let floor = self.readers.iter().filter(|r| !r.optional).map(|r| r.acked).min().unwrap_or(self.tail());
            let fair = !self.block && self.weight(owner) >= self.weight(stream);
            if !(self.head < floor || fair) {
                self.dropped += 1;
                return;
            }
            let mut lost = false;
            for r in &mut self.readers {
                if r.next <= self.head {
                    r.next = self.head + 1;
                    r.dropped += 1;
                    lost |= !r.optional;
                }
                r.acked = r.acked.max(self.head + 1);
            }
            self.dropped += u64::from(lost);
            self.records.pop_front();
            self.head += 1;
        }
    }

    fn read(&mut self, reader: usize, max: usize) -> Vec<(usize, usize, u64)> {
        let r = &mut self.readers[reader];
        let first = r.next.max(self.head);
        let end = (first + max as u64).min(self.head + self.records.len() as u64);
        if first >= end {
            return Vec::new();
        }
        r.next = end;
        r.in_flight.push_back(end);
        self.records.range((first - self.head) as usize..(end - self.head) as usize).copied().collect()
    }

    fn ack(&mut self, reader: usize) {
        let r = &mut self.readers[reader];
        if let Some(end) = r.in_flight.pop_front() {
            r.acked = r.acked.max(end);
        }
        let floor = self.readers.iter().map(|r| r.acked).min().unwrap_or(self.head);
        while self.head < floor {
            self.records.pop_front();
            self.head += 1;
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push { stream: usize, len: usize, count: usize },
    Read { reader: usize, max: usize },
    Ack { reader: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, prop_oneof![0usize..8, 0usize..300, 1000usize..3000], 1usize..20)
            .prop_map(|(stream, len, count)| Op::Push { stream, len, count }),
        2 => (0usize..3, 1usize..50).prop_map(|(reader, max)| Op::Read { reader, max }),
        2 => (0usize..3).prop_map(|reader| Op::Ack { reader }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random pushes, reads and acks: the ring holds, hands out, evicts and counts exactly
    /// what the model does.
    #[test]
    fn the_ring_behaves_as_its_model(
        ops in proptest::collection::vec(op(), 1..200),
        pages in 1usize..4,
        block in any::<bool>(),
    ) {
        let capacity = pages * 4096;
        let policy = if block { Policy::Block } else { Policy::DropOldest };
        let ring = Ring::new(capacity, policy, Duration::ZERO, Rates::default()).unwrap();
        let mut model = Model { capacity, block, ..Model::default() };
        let ids: Vec<ReaderId> = (0..3).map(|i| ring.add_reader(&format!("r{i}"), i == 2)).collect();
        model.readers = (0..3).map(|i| ModelReader { optional: i == 2, ..ModelReader::default() }).collect();
        let vols = ["a", "a", "b", "c"];
        let tenants = ["x", "x", "x", "y"];
        // Streams 0 and 1 are two files of volume "a": one source.
        let streams: Vec<Arc<Origin>> = (0..4).map(|i| file(vols[i], &format!("f{i}"), tenants[i])).collect();
        let mut in_flight: Vec<VecDeque<Mark>> = vec![VecDeque::new(); 3];
        let mut seq = 0u64;
        for op in ops {
            match op {
                Op::Push { stream, len, count } => {
                    let batch: Vec<Record> = (0..count).map(|i| of(&streams[stream], seq + i as u64, len)).collect();
                    for i in 0..count {
                        model.push(stream, len, seq + i as u64);
                    }
                    seq += count as u64;
                    ring.push(batch);
                }
                Op::Read { reader, max } => {
                    let want = model.read(reader, max);
                    let got = ring.try_read(ids[reader], max, usize::MAX);
                    let got: Vec<(usize, usize, u64)> = got.map_or(Vec::new(), |b| {
                        in_flight[reader].push_back(b.end);
                        b.records.iter().map(|r| {
                            let s = streams.iter().position(|o| is(r, o)).unwrap();
                            assert!(r.bytes.iter().all(|&x| x == r.seq as u8));
                            (s, r.bytes.len(), r.seq)
                        }).collect()
                    });
                    prop_assert_eq!(got, want);
                }
                Op::Ack { reader } => {
                    model.ack(reader);
                    if let Some(end) = in_flight[reader].pop_front() {
                        ring.ack(ids[reader], end);
                    }
                }
            }
            let snap = ring.snapshot();
            prop_assert_eq!(snap.records, model.records.len() as u64);
            prop_assert_eq!(snap.used_bytes as usize, model.used());
            prop_assert!(snap.used_bytes as usize <= capacity);
            prop_assert_eq!(snap.dropped_records_total, model.dropped);
            for (r, m) in snap.readers.iter().zip(&model.readers) {
                prop_assert_eq!(r.dropped_records_total, m.dropped);
                prop_assert_eq!(r.lag_records, model.tail() - m.next.max(model.head));
            }
            let counted: u64 = streams.iter().map(|o| o.counters.stream.snapshot().dropped_records_total).sum();
            prop_assert_eq!(counted, model.dropped, "every loss counted against its stream");
        }
    }
}
