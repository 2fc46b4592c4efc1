//! Sinks: where records go. A sink is one type implementing [`Sink`]; [`start`] gives each
//! configured sink its own reader of the ring and its own thread, so a slow or blocking
//! destination holds back only itself. With encryption on, the runner decides once per record
//! whether it goes out sealed, in clear, or not at all ([`Outgoing`]); the sink seals.

pub mod files;
pub mod kafka;
pub mod stdout;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tracing::{info, warn};

use crate::counters::{Sealing, SinkCounters};
use crate::encryption::keys::TenantKey;
use crate::encryption::{Encryption, Treatment};
use crate::record::Record;
use crate::ring::{Batch, Mark, ReaderId, Ring};
use crate::values::lock;
use files::FilesSinkConfig;
use kafka::KafkaSinkConfig;
use stdout::StdoutSinkConfig;

/// Records per batch handed to a sink.
pub const BATCH_RECORDS: usize = 4096;
/// About how many bytes per batch.
const BATCH_BYTES: usize = 4 << 20;
/// Batches a sink may have in delivery at once: what keeps a network sink busy while earlier
/// batches wait for their acknowledgements. Bounded (and to half the ring) so that a
/// stalled destination leaves the records waiting in the ring, where the policy applies, and
/// the memory held stays near the ring's capacity.
const MAX_BATCHES_IN_FLIGHT: usize = 64;
const MAX_BYTES_IN_FLIGHT: usize = 16 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What became of one record in a delivery that did not fully succeed. Ordered from best to
/// worst: a record sent as several messages takes the worst outcome of its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Delivered = 0,
    /// Refused for good by the destination (counted as rejected); not offered again.
    Rejected = 1,
    /// Not delivered: offered again after a backoff.
    Retry = 2,
}

/// A delivery that did not fully succeed: the outcome of each record of the batch, in order.
#[derive(Debug)]
pub struct DeliveryError {
    pub outcomes: Vec<Outcome>,
    pub error: anyhow::Error,
}

impl DeliveryError {
    /// The first `delivered` of `len` records got through; the rest are to be offered again.
    pub fn after(delivered: usize, len: usize, error: anyhow::Error) -> Self {
        let outcomes = (0..len).map(|i| if i < delivered { Outcome::Delivered } else { Outcome::Retry }).collect();
        Self { outcomes, error }
    }
}

/// A delivery under way: resolves when the destination has the records.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send>>;

/// A record on its way to one sink: sealed with `key`, or sent in clear.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub record: Record,
    pub key: Option<Arc<TenantKey>>,
}

impl Outgoing {
    pub fn clear(record: Record) -> Self {
        Self { record, key: None }
    }
}

pub trait Sink: Send + 'static {
    /// Starts delivering records in order; the returned future resolves when all of them are
    /// at the destination (Ok), or says what became of each. Deliveries may overlap: the next
    /// one can start before the previous resolves.
    fn deliver(&mut self, records: &[Outgoing]) -> Delivery;
}

/// Starts every configured sink, each reading the ring from now on. Returns the threads of
/// the required sinks, which shutdown waits for; optional ones may be stalled for good.
/// The sinks started: their counters, and the threads of the required ones (shutdown waits
/// for those).
pub struct Started {
    pub counters: Vec<Arc<SinkCounters>>,
    pub required: Vec<std::thread::JoinHandle<()>>,
}

/// `[sinks.NAME]`: one table per sink, its kind in `type`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Files(FilesSinkConfig),
    Stdout(StdoutSinkConfig),
    Kafka(KafkaSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Files(_) => "files",
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::Kafka(_) => "kafka",
        }
    }

    /// Checks the table of sink `name`.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if let Err(e) = logtap_fusefs::Name::parse(name) {
            return Err(format!("invalid sink name {name:?}: {e}"));
        }
        match self {
            SinkConfig::Files(f) if !f.dir.is_absolute() => {
                Err(format!("sinks.{name}.dir must be an absolute path, not {:?}", f.dir))
            }
            SinkConfig::Kafka(k) => kafka::check(k).map_err(|e| format!("sinks.{name}: {e}")),
            _ => Ok(()),
        }
    }

    /// An optional sink is skipped ahead (and counts what it skipped) rather than holding the
    /// ring full for the other sinks.
    pub fn optional(&self) -> bool {
        match self {
            SinkConfig::Files(c) => c.optional,
            SinkConfig::Stdout(c) => c.optional,
            SinkConfig::Kafka(c) => c.optional,
        }
    }
}

/// How a sink writes a record (a Kafka message's value, a line of the files sink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The line's bytes as they were written.
    Raw,
    /// The JSON envelope with the record's identity (`message`, or `message_base64` for
    /// non-UTF-8).
    Json,
}

pub fn start(
    sinks: &std::collections::BTreeMap<String, SinkConfig>,
    host: &str,
    ring: &Arc<Ring>,
    encryption: Option<Arc<Encryption>>,
) -> anyhow::Result<Started> {
    let mut started = Started { counters: Vec::new(), required: Vec::new() };
    for (name, config) in sinks {
        let counters = Arc::new(SinkCounters::new(name, config.kind()));
        started.counters.push(counters.clone());
        let reader = ring.add_reader(name, config.optional());
        let context = || format!("sink {name}");
        let runner = Runner { ring: ring.clone(), reader, counters: counters.clone(), encryption: encryption.clone() };
        let thread = match config {
            SinkConfig::Files(c) => spawn(name, files::FilesSink::new(c).with_context(context)?, runner),
            SinkConfig::Stdout(_) => spawn(name, stdout::StdoutSink::new(), runner),
            SinkConfig::Kafka(c) => {
                spawn(name, kafka::KafkaSink::new(c, host, counters).with_context(context)?, runner)
            }
        }
        .with_context(|| format!("cannot start sink {name}"))?;
        info!(sink = %name, kind = config.kind(), optional = config.optional(), "sink started");
        if !config.optional() {
            started.required.push(thread);
        }
    }
    Ok(started)
}

/// What runs one sink: its reader of the ring, its counters, and the encryption policy.
pub struct Runner {
    pub ring: Arc<Ring>,
    pub reader: ReaderId,
    pub counters: Arc<SinkCounters>,
    pub encryption: Option<Arc<Encryption>>,
}

fn spawn<S: Sink>(name: &str, sink: S, runner: Runner) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("sink-{name}")).spawn(move || {
        yield_to_capture();
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(sink = %runner.counters.name, "cannot start the sink's runtime: {e}");
                return;
            }
        };
        rt.block_on(runner.run(sink));
    })
}

/// How much less CPU weight a sink's thread has than the capture threads when both want it.
const SINK_NICENESS: libc::c_int = 5;

/// Lowers this thread's priority: when cores are short (a burst), the sources capture first,
/// because what is captured waits in the ring and what is not may be lost in the kernel's
/// buffer; the sinks still run, with a smaller share, and catch up after.
fn yield_to_capture() {
    // SAFETY: gettid and setpriority on this thread only.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: as above; a failure (no permission to change it) leaves the priority as it was.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, now + SINK_NICENESS) } != 0 {
        tracing::debug!("cannot lower the sink thread's priority: {}", std::io::Error::last_os_error());
    }
}

/// The encryption counters of consecutive records of one tenant, looked up once per run.
struct TenantRun {
    tenant: Option<Arc<str>>,
    counters: Option<Arc<Sealing>>,
}

impl TenantRun {
    fn new() -> Self {
        Self { tenant: None, counters: None }
    }

    fn of(&mut self, sink: &SinkCounters, tenant: &Arc<str>) -> &Sealing {
        if !self.tenant.as_ref().is_some_and(|t| Arc::ptr_eq(t, tenant)) {
            self.tenant = Some(tenant.clone());
            self.counters = None;
        }
        self.counters.get_or_insert_with(|| sink.tenant(tenant))
    }
}

fn delivered<'a>(counters: &SinkCounters, encrypting: bool, records: impl Iterator<Item = &'a Outgoing>) {
    let now = SystemTime::now();
    let mut bytes = 0;
    // Records of one capture batch share their time: one histogram update per run.
    let mut run: Option<(SystemTime, u64)> = None;
    let mut n_records = 0;
    let mut tenant = TenantRun::new();
    for o in records {
        let r = &o.record;
        n_records += 1;
        bytes += r.bytes.len() as u64;
        match &o.key {
            Some(k) => tenant.of(counters, &k.tenant).sealed.add(1, r.bytes.len() as u64),
            None if encrypting => tenant.of(counters, &r.origin.tenant).plaintext.add(1, r.bytes.len() as u64),
            None => {}
        }
        match &mut run {
            Some((at, n)) if *at == r.captured_at => *n += 1,
            _ => {
                if let Some((at, n)) = run.replace((r.captured_at, 1)) {
                    counters.latency.record_n(now.duration_since(at).unwrap_or_default(), n);
                }
            }
        }
    }
    if let Some((at, n)) = run {
        counters.latency.record_n(now.duration_since(at).unwrap_or_default(), n);
    }
    counters.delivered_records.fetch_add(n_records, Relaxed);
    counters.delivered_bytes.fetch_add(bytes, Relaxed);
}

/// A batch in delivery.
struct InFlight {
    /// The ring's mark after the batch: acknowledged when the batch is done.
    end: Mark,
    records: Vec<Outgoing>,
    bytes: usize,
    delivery: Delivery,
    /// The batch failed at least once: no new batches start until it is through.
    retrying: bool,
}

enum Event {
    Read(Option<Batch>),
    Done(Result<(), DeliveryError>),
}

async fn front(in_flight: &mut VecDeque<InFlight>) -> Result<(), DeliveryError> {
    match in_flight.front_mut() {
        Some(f) => f.delivery.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Longest pause between two looks for a key that records wait for.
const MAX_KEY_WAIT: Duration = Duration::from_secs(1);

impl Runner {
    /// Decides once per record how it goes out, counting what is dropped. Records waiting for
    /// their tenant's key hold the batch (delivery stays in ring order) until the key is there,
    /// or the ring closes (then they are dropped and counted).
    async fn plan(&self, records: Vec<Record>) -> Vec<Outgoing> {
        let Some(e) = &self.encryption else { return records.into_iter().map(Outgoing::clear).collect() };
        let mut pause = Duration::from_millis(50);
        let mut waited: Vec<Arc<Sealing>> = Vec::new();
        let treatments = loop {
            let set = e.keys.current();
            // Records of one stream come in runs: one decision per run.
            let mut last: Option<(&Arc<crate::record::Origin>, Treatment)> = None;
            let treatments: Vec<Treatment> = records
                .iter()
                .map(|r| match &last {
                    Some((o, t)) if Arc::ptr_eq(o, &r.origin) => t.clone(),
                    _ => last.insert((&r.origin, e.treat(&set, &r.origin.tenant))).1.clone(),
                })
                .collect();
            for w in waited.drain(..) {
                w.waiting_records.store(0, Relaxed);
            }
            if !treatments.iter().any(|t| matches!(t, Treatment::Wait)) || self.ring.is_closed() {
                break treatments;
            }
            for (r, _) in records.iter().zip(&treatments).filter(|(_, t)| matches!(t, Treatment::Wait)) {
                let tenant = self.counters.tenant(&r.origin.tenant);
                if !waited.iter().any(|w| Arc::ptr_eq(w, &tenant)) {
                    waited.push(tenant.clone());
                }
                tenant.waiting_records.fetch_add(1, Relaxed);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_KEY_WAIT);
        };
        let mut tenant = TenantRun::new();
        let mut out = Vec::with_capacity(records.len());
        for (record, treatment) in records.into_iter().zip(treatments) {
            match treatment {
                Treatment::Clear => out.push(Outgoing { record, key: None }),
                Treatment::Seal(key) => out.push(Outgoing { record, key: Some(key) }),
                Treatment::Drop | Treatment::Wait => {
                    tenant.of(&self.counters, &record.origin.tenant).dropped.add(1, record.bytes.len() as u64)
                }
            }
        }
        out
    }

    /// Reads, delivers (several batches at once), acknowledges in ring order; retries
    /// failures with backoff until the ring closes and everything is delivered.
    async fn run<S: Sink>(self, mut sink: S) {
        let Runner { ring, reader, counters, .. } = &self;
        let encrypting = self.encryption.is_some();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut bytes_in_flight = 0;
        let mut closed = false;
        let mut backoff = Duration::from_millis(50);
        let max_bytes = (ring.capacity() / 2).min(MAX_BYTES_IN_FLIGHT);
        while !(closed && in_flight.is_empty()) {
            let room = !closed
                && in_flight.len() < MAX_BATCHES_IN_FLIGHT
                && bytes_in_flight < max_bytes
                && !in_flight.front().is_some_and(|f| f.retrying);
            let event = tokio::select! {
                biased;
                done = front(&mut in_flight) => Event::Done(done),
                batch = ring.read(*reader, BATCH_RECORDS, BATCH_BYTES), if room => Event::Read(batch),
            };
            match event {
                Event::Read(None) => closed = true,
                Event::Read(Some(batch)) => {
                    let end = batch.end;
                    let records = self.plan(batch.records).await;
                    let bytes = records.iter().map(|o| o.record.bytes.len()).sum();
                    let delivery = sink.deliver(&records);
                    bytes_in_flight += bytes;
                    in_flight.push_back(InFlight { end, records, bytes, delivery, retrying: false });
                }
                Event::Done(result) => {
                    let Some(f) = in_flight.front_mut() else { continue };
                    let mut finished = true;
                    match result {
                        Ok(()) => {
                            delivered(counters, encrypting, f.records.iter());
                            backoff = Duration::from_millis(50);
                        }
                        Err(DeliveryError { outcomes, error }) => {
                            let mut retry = Vec::new();
                            let mut done = Vec::new();
                            for (o, outcome) in
                                f.records.drain(..).zip(outcomes.iter().chain(std::iter::repeat(&Outcome::Retry)))
                            {
                                match outcome {
                                    Outcome::Delivered => done.push(o),
                                    Outcome::Rejected => {
                                        counters.rejected_records.fetch_add(1, Relaxed);
                                        counters.rejected_bytes.fetch_add(o.record.bytes.len() as u64, Relaxed);
                                    }
                                    Outcome::Retry => retry.push(o),
                                }
                            }
                            delivered(counters, encrypting, done.iter());
                            let message = format!("{error:#}");
                            *lock(&counters.last_error) = Some(message.clone());
                            if !retry.is_empty() {
                                counters.errors.fetch_add(1, Relaxed);
                                counters.retried_records.fetch_add(retry.len() as u64, Relaxed);
                                warn!(sink = %counters.name, records = retry.len(), retry_in = ?backoff, "delivery failed: {message}");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(MAX_BACKOFF);
                                f.delivery = sink.deliver(&retry);
                                f.records = retry;
                                f.retrying = true;
                                finished = false;
                            }
                        }
                    }
                    if finished {
                        if let Some(f) = in_flight.pop_front() {
                            bytes_in_flight -= f.bytes;
                            ring.ack(*reader, f.end);
                        }
                    }
                }
            }
            counters.in_flight_records.store(in_flight.iter().map(|f| f.records.len() as u64).sum(), Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::record::tests::record;
    use crate::ring::{Policy, Rates};

    /// Answers each delivery from a script; records what it was offered.
    struct Scripted {
        offered: Arc<Mutex<Vec<Vec<u8>>>>,
        script: VecDeque<Vec<Outcome>>,
    }

    impl Sink for Scripted {
        fn deliver(&mut self, records: &[Outgoing]) -> Delivery {
            self.offered.lock().unwrap().push(records.iter().map(|o| o.record.bytes[0]).collect());
            let result = match self.script.pop_front() {
                Some(outcomes) => Err(DeliveryError { outcomes, error: anyhow::anyhow!("scripted") }),
                None => Ok(()),
            };
            Box::pin(std::future::ready(result))
        }
    }

    #[test]
    fn only_what_failed_is_offered_again_and_rejected_records_are_counted_not_retried() {
        use Outcome::*;
        let ring = Arc::new(Ring::new(1 << 20, Policy::Block, Duration::from_secs(1), Rates::default()).unwrap());
        let reader = ring.add_reader("s", false);
        ring.push((1..=4).map(|b| record(&[b])).collect());
        ring.close();
        let offered = Arc::new(Mutex::new(Vec::new()));
        let sink = Scripted {
            offered: offered.clone(),
            script: VecDeque::from([vec![Delivered, Rejected, Retry, Delivered]]),
        };
        let counters = Arc::new(SinkCounters::new("s", "test"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let runner = Runner { ring: ring.clone(), reader, counters: counters.clone(), encryption: None };
        rt.block_on(runner.run(sink));
        assert_eq!(*offered.lock().unwrap(), vec![vec![1, 2, 3, 4], vec![3]]);
        let s = counters.snapshot();
        assert_eq!((s.delivered_records_total, s.rejected_records_total, s.retried_records_total), (3, 1, 1));
        assert_eq!((s.errors_total, s.in_flight_records), (1, 0));
        assert_eq!(
            ring.wait_drained(std::time::Instant::now() + Duration::from_millis(1)),
            0,
            "everything acknowledged"
        );
    }

    /// First byte and key id of each record a sink was handed.
    type Handed = Arc<Mutex<Vec<(u8, Option<String>)>>>;

    /// Delivers at once and notes what it was handed.
    struct Noting(Handed);

    impl Sink for Noting {
        fn deliver(&mut self, records: &[Outgoing]) -> Delivery {
            let mut seen = self.0.lock().unwrap();
            seen.extend(records.iter().map(|o| (o.record.bytes[0], o.key.as_ref().map(|k| k.id.to_string()))));
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[test]
    fn records_waiting_for_their_key_go_out_sealed_once_it_is_there_and_dropped_ones_are_counted() {
        use crate::encryption::keys::Keys;
        use crate::encryption::{EncryptionConfig, Missing, WithoutKey};
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::open(dir.path()).unwrap();
        let config = EncryptionConfig {
            keys: dir.path().into(),
            without_key: WithoutKey::Drop,
            required: vec!["bank".into()],
            required_without_key: Missing::Wait,
            ..Default::default()
        };
        let encryption = Some(Arc::new(Encryption::new(config, keys.clone())));
        let ring = Arc::new(Ring::new(1 << 20, Policy::Block, Duration::from_secs(1), Rates::default()).unwrap());
        let reader = ring.add_reader("s", false);
        let of = |tenant: &str, b: u8| {
            let mut r = record(&[b]);
            r.origin = Arc::new(crate::record::Origin { tenant: tenant.into(), ..(*r.origin).clone() });
            r
        };
        ring.push(vec![of("bank", 1), of("other", 2), of("bank", 3)]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(SinkCounters::new("s", "test"));
        let runner = Runner { ring: ring.clone(), reader, counters: counters.clone(), encryption };
        let sink = Noting(seen.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(runner.run(sink));
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(seen.lock().unwrap().is_empty(), "nothing goes out before the bank's key");
        assert_eq!(counters.snapshot().encryption["bank"].waiting_records, 2);

        let key = dir.path().join("bank.k1.key");
        std::fs::write(&key, [3; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        keys.reload();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        ring.close();
        thread.join().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(1, Some("k1".into())), (3, Some("k1".into()))]);
        let s = counters.snapshot().encryption;
        assert_eq!((s["bank"].sealed_records_total, s["bank"].waiting_records), (2, 0));
        assert_eq!((s["other"].dropped_records_total, s["other"].sealed_records_total), (1, 0));
    }
}
