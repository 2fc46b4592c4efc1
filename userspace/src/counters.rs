//! Counters every stage updates on its hot path, and the snapshots they are read as.
//!
//! Counters are monotonic `*_total` values, as in Vector's component specs; gauges say so.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::lock;

/// What a source counts about one stream of bytes (a file, a volume).
#[derive(Debug, Default)]
pub struct Counters {
    pub captured_records: AtomicU64,
    pub captured_bytes: AtomicU64,
    pub dropped_records: AtomicU64,
    pub dropped_bytes: AtomicU64,
    /// Beyond a configured rate (`ring.source_rate`, `ring.tenant_rate`): dropped, or delayed
    /// and then dropped, by the ring's policy.
    pub throttled_records: AtomicU64,
    pub throttled_bytes: AtomicU64,
    pub split_records: AtomicU64,
    pub copied_bytes: AtomicU64,
    pub overwritten_bytes: AtomicU64,
    pub refused_bytes: AtomicU64,
    /// Gauge: memory the stream's content holds (a volume file's).
    pub memory_bytes: AtomicU64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub captured_records_total: u64,
    pub captured_bytes_total: u64,
    pub dropped_records_total: u64,
    pub dropped_bytes_total: u64,
    #[serde(default)]
    pub throttled_records_total: u64,
    #[serde(default)]
    pub throttled_bytes_total: u64,
    pub split_records_total: u64,
    #[serde(default)]
    pub copied_bytes_total: u64,
    pub overwritten_bytes_total: u64,
    pub refused_bytes_total: u64,
    /// Gauge: memory the content holds (volume files), bytes.
    #[serde(default)]
    pub memory_bytes: u64,
}

impl CountersSnapshot {
    /// Adds another stream's counts (a container's over its targets).
    pub fn add(&mut self, o: &CountersSnapshot) {
        self.captured_records_total += o.captured_records_total;
        self.captured_bytes_total += o.captured_bytes_total;
        self.dropped_records_total += o.dropped_records_total;
        self.dropped_bytes_total += o.dropped_bytes_total;
        self.throttled_records_total += o.throttled_records_total;
        self.throttled_bytes_total += o.throttled_bytes_total;
        self.split_records_total += o.split_records_total;
        self.copied_bytes_total += o.copied_bytes_total;
        self.overwritten_bytes_total += o.overwritten_bytes_total;
        self.refused_bytes_total += o.refused_bytes_total;
        self.memory_bytes += o.memory_bytes;
    }
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            captured_records_total: self.captured_records.load(Relaxed),
            captured_bytes_total: self.captured_bytes.load(Relaxed),
            dropped_records_total: self.dropped_records.load(Relaxed),
            dropped_bytes_total: self.dropped_bytes.load(Relaxed),
            throttled_records_total: self.throttled_records.load(Relaxed),
            throttled_bytes_total: self.throttled_bytes.load(Relaxed),
            split_records_total: self.split_records.load(Relaxed),
            copied_bytes_total: self.copied_bytes.load(Relaxed),
            overwritten_bytes_total: self.overwritten_bytes.load(Relaxed),
            refused_bytes_total: self.refused_bytes.load(Relaxed),
            memory_bytes: self.memory_bytes.load(Relaxed),
        }
    }
}

/// The counters a stream updates: its own (a file's, a process's stdout) and its group's
/// totals (the volume's, the watch target's).
#[derive(Debug, Clone)]
pub struct StreamCounters {
    pub stream: Arc<Counters>,
    pub total: Arc<Counters>,
}

impl StreamCounters {
    /// Counters attached to no registry (tests, benchmarks).
    pub fn detached() -> Self {
        Self { stream: Arc::default(), total: Arc::default() }
    }

    fn add(&self, pick: impl Fn(&Counters) -> &AtomicU64, n: u64) {
        pick(&self.stream).fetch_add(n, Relaxed);
        pick(&self.total).fetch_add(n, Relaxed);
    }

    pub fn captured(&self, records: u64, bytes: u64, split: u64) {
        self.add(|c| &c.captured_records, records);
        self.add(|c| &c.captured_bytes, bytes);
        if split > 0 {
            self.add(|c| &c.split_records, split);
        }
    }

    pub fn dropped(&self, records: u64, bytes: u64) {
        self.add(|c| &c.dropped_records, records);
        self.add(|c| &c.dropped_bytes, bytes);
    }

    pub fn throttled(&self, records: u64, bytes: u64) {
        self.add(|c| &c.throttled_records, records);
        self.add(|c| &c.throttled_bytes, bytes);
    }

    /// The stream's content went from `was` to `now` bytes of memory.
    pub fn held(&self, was: u64, now: u64) {
        for c in [&self.stream, &self.total] {
            c.memory_bytes.fetch_add(now.wrapping_sub(was), Relaxed);
        }
    }

    pub fn copied(&self, bytes: u64) {
        self.add(|c| &c.copied_bytes, bytes);
    }

    pub fn overwritten(&self, bytes: u64) {
        self.add(|c| &c.overwritten_bytes, bytes);
    }

    pub fn refused(&self, bytes: u64) {
        self.add(|c| &c.refused_bytes, bytes);
    }
}

/// A group's totals and its streams' counters, by name (a volume's files by path, a watch
/// target's streams by pid and fd).
#[derive(Debug, Default)]
pub struct GroupCounters {
    pub totals: Arc<Counters>,
    streams: Mutex<BTreeMap<String, Arc<Counters>>>,
}

impl GroupCounters {
    /// Counters for a new stream.
    pub fn stream(&self, name: &str) -> StreamCounters {
        let file = Arc::new(Counters::default());
        lock(&self.streams).insert(name.to_string(), file.clone());
        StreamCounters { stream: file, total: self.totals.clone() }
    }

    /// A stream was renamed (a file moved): its counters follow it.
    pub fn stream_moved(&self, from: &str, to: &str, counters: &Arc<Counters>) {
        let mut streams = lock(&self.streams);
        if streams.get(from).is_some_and(|c| Arc::ptr_eq(c, counters)) {
            streams.remove(from);
        }
        streams.insert(to.to_string(), counters.clone());
    }

    /// A stream is gone for good; its counts stay in the totals.
    pub fn stream_gone(&self, path: &str, counters: &Arc<Counters>) {
        let mut streams = lock(&self.streams);
        if streams.get(path).is_some_and(|c| Arc::ptr_eq(c, counters)) {
            streams.remove(path);
        }
    }

    pub fn streams(&self) -> BTreeMap<String, CountersSnapshot> {
        lock(&self.streams).iter().map(|(k, v)| (k.clone(), v.snapshot())).collect()
    }
}

/// Latency histogram: log-linear buckets (8 per power of two, about 9 % wide) over
/// microseconds, cheap enough to update per record.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    max_us: AtomicU64,
}

const SUB: u32 = 8;
const BUCKETS: usize = (SUB as usize) * 40;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("count", &self.count.load(Relaxed)).finish()
    }
}

fn bucket_of(us: u64) -> usize {
    if us < u64::from(SUB) {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= 3
    let mantissa = (us >> (exp - 3)) & u64::from(SUB - 1);
    (((exp - 2) * SUB) as usize + mantissa as usize).min(BUCKETS - 1)
}

/// Upper bound (exclusive) of a bucket, in microseconds.
fn bucket_upper(i: usize) -> u64 {
    if i < SUB as usize {
        return i as u64 + 1;
    }
    let exp = (i / SUB as usize) as u32 + 2;
    let mantissa = (i % SUB as usize) as u64;
    ((u64::from(SUB) + mantissa + 1) << (exp - 3)).min(u64::MAX >> 1)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySnapshot {
    pub count: u64,
    pub p50_seconds: f64,
    pub p90_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        self.record_n(d, 1);
    }

    /// `n` observations of the same value.
    pub fn record_n(&self, d: Duration, n: u64) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[bucket_of(us)].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    /// The `q` quantile in seconds (bucket upper bound, capped by the maximum seen).
    pub fn quantile(&self, q: f64) -> f64 {
        let count = self.count.load(Relaxed);
        if count == 0 {
            return 0.0;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                return bucket_upper(i).min(self.max_us.load(Relaxed).max(1)) as f64 / 1e6;
            }
        }
        self.max_us.load(Relaxed) as f64 / 1e6
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            count: self.count.load(Relaxed),
            p50_seconds: self.quantile(0.5),
            p90_seconds: self.quantile(0.9),
            p99_seconds: self.quantile(0.99),
            max_seconds: self.max_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// Topics counted one by one per sink, at most.
pub const TOPICS_KEPT: usize = 1024;
/// Where the topics past [`TOPICS_KEPT`] are counted.
pub const OTHER_TOPICS: &str = "(other topics)";
/// Where the tenants past [`TOPICS_KEPT`] are counted.
pub const OTHER_TENANTS: &str = "(other tenants)";

/// What a sink counts.
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub name: String,
    pub kind: String,
    pub delivered_records: AtomicU64,
    pub delivered_bytes: AtomicU64,
    /// Failed delivery attempts (each retried).
    pub errors: AtomicU64,
    /// Errors by kind, as the destination names them.
    errors_by_kind: Mutex<BTreeMap<String, u64>>,
    pub last_error: Mutex<Option<String>>,
    /// Records handed to the destination and not yet acknowledged (a gauge).
    pub in_flight_records: AtomicU64,
    /// Records offered again after a failed attempt.
    pub retried_records: AtomicU64,
    /// Records the destination refuses for good (too large for the broker): dropped, counted.
    pub rejected_records: AtomicU64,
    pub rejected_bytes: AtomicU64,
    /// Records sent as several messages because they exceed the destination's size limit.
    pub split_records: AtomicU64,
    /// Delivered per topic (Kafka).
    topics: Mutex<BTreeMap<String, Arc<Delivered>>>,
    /// With encryption on: per tenant, what was sealed, sent in clear or dropped for want of
    /// a key.
    tenants: Mutex<BTreeMap<String, Arc<Sealing>>>,
    /// From capture to delivery.
    pub latency: Histogram,
}

/// Delivered records and bytes of one destination (a topic).
#[derive(Debug, Default)]
pub struct Delivered {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
}

/// What encryption did with one tenant's records in one sink.
#[derive(Debug, Default)]
pub struct Sealing {
    /// Delivered sealed (bytes: the values before sealing).
    pub sealed: Delivered,
    /// Delivered in clear because the tenant has no key (`without_key = "plaintext"`).
    pub plaintext: Delivered,
    /// Not sent: no usable key, and policy said drop (or a wait that shutdown ended).
    pub dropped: Delivered,
    /// Gauge: held until the tenant's key is there (`required_without_key = "wait"`).
    pub waiting_records: AtomicU64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealingSnapshot {
    pub sealed_records_total: u64,
    pub sealed_bytes_total: u64,
    pub plaintext_records_total: u64,
    pub plaintext_bytes_total: u64,
    pub dropped_records_total: u64,
    pub dropped_bytes_total: u64,
    pub waiting_records: u64,
}

impl Delivered {
    pub fn add(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// The entry of `key` in a table keyed by names that come from records (topics, tenants):
/// past [`TOPICS_KEPT`] entries the rest share the entry `other`, so the table stays bounded.
fn bounded<T: Default>(table: &Mutex<BTreeMap<String, Arc<T>>>, key: &str, other: &str) -> Arc<T> {
    let mut table = lock(table);
    if let Some(d) = table.get(key) {
        return d.clone();
    }
    let key = if table.len() < TOPICS_KEPT { key } else { other };
    table.entry(key.to_string()).or_default().clone()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveredSnapshot {
    pub delivered_records_total: u64,
    pub delivered_bytes_total: u64,
}

impl SinkCounters {
    pub fn new(name: &str, kind: &str) -> Self {
        Self { name: name.into(), kind: kind.into(), ..Default::default() }
    }

    /// Counts an error of `kind`; `message`, when given, becomes the last error.
    pub fn error(&self, kind: &str, message: Option<String>) {
        *lock(&self.errors_by_kind).entry(kind.to_string()).or_default() += 1;
        if let Some(m) = message {
            *lock(&self.last_error) = Some(m);
        }
    }

    /// The counters of one topic, created on first use. Topics come from templates over
    /// records' identities, so past [`TOPICS_KEPT`] of them the rest count together under
    /// [`OTHER_TOPICS`] and the list stays bounded.
    pub fn topic(&self, topic: &str) -> Arc<Delivered> {
        bounded(&self.topics, topic, OTHER_TOPICS)
    }

    /// The encryption counters of one tenant (`""`: records of no tenant), bounded like topics.
    pub fn tenant(&self, tenant: &str) -> Arc<Sealing> {
        bounded(&self.tenants, tenant, OTHER_TENANTS)
    }

    pub fn snapshot(&self) -> SinkSnapshot {
        SinkSnapshot {
            name: self.name.clone(),
            kind: self.kind.clone(),
            delivered_records_total: self.delivered_records.load(Relaxed),
            delivered_bytes_total: self.delivered_bytes.load(Relaxed),
            errors_total: self.errors.load(Relaxed),
            errors_by_kind: lock(&self.errors_by_kind).clone(),
            last_error: lock(&self.last_error).clone(),
            in_flight_records: self.in_flight_records.load(Relaxed),
            retried_records_total: self.retried_records.load(Relaxed),
            rejected_records_total: self.rejected_records.load(Relaxed),
            rejected_bytes_total: self.rejected_bytes.load(Relaxed),
            split_records_total: self.split_records.load(Relaxed),
            topics: lock(&self.topics)
                .iter()
                .map(|(t, d)| {
                    let d = DeliveredSnapshot {
                        delivered_records_total: d.records.load(Relaxed),
                        delivered_bytes_total: d.bytes.load(Relaxed),
                    };
                    (t.clone(), d)
                })
                .collect(),
            encryption: lock(&self.tenants)
                .iter()
                .map(|(t, s)| {
                    let snapshot = SealingSnapshot {
                        sealed_records_total: s.sealed.records.load(Relaxed),
                        sealed_bytes_total: s.sealed.bytes.load(Relaxed),
                        plaintext_records_total: s.plaintext.records.load(Relaxed),
                        plaintext_bytes_total: s.plaintext.bytes.load(Relaxed),
                        dropped_records_total: s.dropped.records.load(Relaxed),
                        dropped_bytes_total: s.dropped.bytes.load(Relaxed),
                        waiting_records: s.waiting_records.load(Relaxed),
                    };
                    (t.clone(), snapshot)
                })
                .collect(),
            latency: self.latency.snapshot(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkSnapshot {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub delivered_records_total: u64,
    pub delivered_bytes_total: u64,
    pub errors_total: u64,
    #[serde(default)]
    pub errors_by_kind: BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub in_flight_records: u64,
    pub retried_records_total: u64,
    pub rejected_records_total: u64,
    pub rejected_bytes_total: u64,
    pub split_records_total: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topics: BTreeMap<String, DeliveredSnapshot>,
    /// With encryption on, per tenant (`""`: records of no tenant).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub encryption: BTreeMap<String, SealingSnapshot>,
    /// Capture to delivery (for Kafka: to the broker's acknowledgement).
    pub latency: LatencySnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_tight() {
        let mut last = 0;
        for us in [0u64, 1, 7, 8, 9, 15, 16, 100, 1000, 12_345, 1 << 30] {
            let b = bucket_of(us);
            assert!(b >= last);
            last = b;
            let upper = bucket_upper(b);
            assert!(us < upper, "{us} < {upper}");
            assert!(upper as f64 <= (us as f64 + 1.0) * 1.13, "{us} -> {upper}");
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((0.050..0.056).contains(&p50), "{p50}");
        assert!((0.099..0.101).contains(&p99), "{p99}");
        assert_eq!(h.snapshot().count, 100);
    }

    #[test]
    fn topics_counted_one_by_one_stay_bounded() {
        let s = SinkCounters::new("k", "kafka");
        for i in 0..TOPICS_KEPT + 10 {
            s.topic(&format!("logs.{i}")).records.fetch_add(1, Relaxed);
        }
        s.topic("logs.0").records.fetch_add(1, Relaxed);
        let topics = s.snapshot().topics;
        assert_eq!(topics.len(), TOPICS_KEPT + 1);
        assert_eq!(topics[OTHER_TOPICS].delivered_records_total, 10);
        assert_eq!(topics["logs.0"].delivered_records_total, 2);
    }
}
