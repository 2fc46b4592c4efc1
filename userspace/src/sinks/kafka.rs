//! The Kafka sink: each record becomes a message of librdkafka's idempotent producer with
//! acks=all, and a batch is done only when every message's delivery report is in.
//!
//! A message: topic and key from templates over the record's origin, headers with its identity
//! (`host`, `service`, `module`, `path`; `volume` for volume records, `pid` for pipe records),
//! the value raw (the line) or the JSON envelope, the capture time as its timestamp.
//!
//! A sealed record (its tenant has a key) is the value: the raw line or the JSON envelope,
//! sealed; headers `enc` (the algorithm) and `key_id` say so, the identity headers stay in clear
//! for routing.
//!
//! The size rule: a value longer than `max_message_bytes` is split into parts that fit, sent in
//! order under the same key (raw and sealed parts carry a `part` header `i/n`, to be joined
//! before decrypting; JSON parts have `"split": true`), counted as split. A message the broker still refuses as too large (its
//! limit is lower than ours) or as an invalid record is rejected: dropped and counted, because
//! no retry could succeed and it would hold the ring. Every other failure is retried.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext, PurgeConfig};
use tracing::{debug, error, warn};

use super::{Delivery, DeliveryError, Outcome, Outgoing, Sink};
use crate::counters::{Delivered, SinkCounters};
use crate::encryption::sealed::{Sealer, ALGORITHM};
use crate::record::{Field, Origin, Part, Record, Template};
use crate::sinks::Format;
use crate::values::{lock, ByteSize, Dur};

/// Apache Kafka through librdkafka: acks=all, the idempotent producer, and a record leaves the
/// ring only when its delivery report says the broker has it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic per record, e.g. `logs.{service}`; see [`Template`] for the fields.
    pub topic: Template,
    /// Message key: records with one key keep their order in one partition.
    pub key: Template,
    /// Record headers with the record's identity (service, module, volume, path, host, pid).
    pub headers: bool,
    pub format: Format,
    pub compression: Compression,
    /// How long librdkafka may try one message before its delivery fails and logtap retries it.
    pub delivery_timeout: Dur,
    /// Largest message value; longer records are split into parts (counted).
    pub max_message_bytes: ByteSize,
    /// Other librdkafka properties, passed as they are and applied last.
    pub options: BTreeMap<String, String>,
    pub optional: bool,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".into()],
            topic: Template::parse("logs.{service}").unwrap_or_default(),
            key: Template::parse("{volume}/{module}").unwrap_or_default(),
            headers: true,
            format: Format::Raw,
            compression: Compression::Lz4,
            delivery_timeout: Dur(Duration::from_secs(30)),
            max_message_bytes: ByteSize(1_000_000),
            options: BTreeMap::new(),
            optional: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Room for the key, headers and framing on top of the largest value.
const MESSAGE_HEADROOM: u64 = 64 << 10;
/// Routes cached at most (one per stream); the cache starts over beyond this.
const MAX_ROUTES: usize = 16384;
/// How often a waiting delivery serves the producer's callbacks.
const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Kafka's longest topic name.
const MAX_TOPIC: usize = 249;
/// Failed deliveries in a row before the producer is replaced, whatever the errors were: the
/// last resort when a broker refuses the producer in a way [`lost_producer_state`] does not
/// know. During a plain outage this costs one new producer per few delivery timeouts.
const FAILURES_TO_RESET: u32 = 3;

/// A producer that lost its connection, has messages in flight and no delivery report for this
/// long while the cluster answers again is stuck: a broker restarted without the producer's
/// state answers its metadata requests but takes none of its messages, and says nothing.
const STUCK_AFTER: Duration = Duration::from_secs(2);
/// How often a waiting delivery checks for that.
const STUCK_CHECK: Duration = Duration::from_secs(1);

/// Errors that say the broker no longer knows this producer's id or sequence numbers (it was
/// restarted without its state): such a producer never gets through again, so it is replaced
/// at once instead of after delivery timeouts.
fn lost_producer_state(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::InvalidProducerIdMapping
            | RDKafkaErrorCode::Fatal
    )
}

/// Checks a Kafka sink's settings, librdkafka's included, without connecting.
pub fn check(config: &KafkaSinkConfig) -> Result<(), String> {
    if config.brokers.is_empty() || config.brokers.iter().any(|b| b.trim().is_empty()) {
        return Err("brokers must name at least one host:port, and no empty ones".into());
    }
    if config.topic.0.is_empty() {
        return Err("topic must not be empty".into());
    }
    for text in config.topic.literals() {
        if let Some(c) = text.chars().find(|&c| !logtap_fusefs::is_name_char(c)) {
            return Err(format!("topic has {c:?}: Kafka topic names use ASCII letters, digits, '.', '_' and '-'"));
        }
    }
    if !(1024..=512 << 20).contains(&config.max_message_bytes.0) {
        return Err(format!("max_message_bytes must be between 1KiB and 512MiB, not {}", config.max_message_bytes));
    }
    if config.delivery_timeout.0 < Duration::from_millis(100) {
        return Err(format!("delivery_timeout must be at least 100ms, not {}", config.delivery_timeout));
    }
    client_config(config, "check").create_native_config().map(|_| ()).map_err(|e| format!("librdkafka: {e}"))
}

fn client_config(config: &KafkaSinkConfig, host: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.brokers.join(","))
        .set(
            "client.id",
            format!("logtap-{}", host.chars().filter(|&c| logtap_fusefs::is_name_char(c)).collect::<String>()),
        )
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", config.compression.as_str())
        .set("message.timeout.ms", config.delivery_timeout.0.as_millis().to_string())
        .set("message.max.bytes", (config.max_message_bytes.0 + MESSAGE_HEADROOM).to_string())
        // Above what the sink runner keeps in flight, so a full queue is an exception.
        .set("queue.buffering.max.messages", "1000000");
    for (key, value) in &config.options {
        c.set(key, value);
    }
    c.set_log_level(RDKafkaLogLevel::Warning);
    c
}

/// One batch's delivery reports.
struct Tracker {
    /// Per record: the worst outcome of its messages (an [`Outcome`] as u8).
    outcomes: Vec<AtomicU8>,
    /// Messages without a report yet, plus one while the batch is being sent.
    pending: AtomicUsize,
    first_error: Mutex<Option<String>>,
    /// The sink's count of failed deliveries in a row.
    failures: Arc<AtomicU32>,
}

impl Tracker {
    fn new(records: usize, failures: Arc<AtomicU32>) -> Self {
        Self {
            outcomes: (0..records).map(|_| AtomicU8::new(Outcome::Delivered as u8)).collect(),
            pending: AtomicUsize::new(1),
            first_error: Mutex::new(None),
            failures,
        }
    }

    fn finish(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    fn fail(&self, index: usize, outcome: Outcome, error: &KafkaError) {
        self.outcomes[index].fetch_max(outcome as u8, Ordering::AcqRel);
        lock(&self.first_error).get_or_insert_with(|| error.to_string());
        self.finish();
    }

    /// A record that cannot become a message at all.
    fn reject(&self, index: usize, error: &str) {
        self.outcomes[index].fetch_max(Outcome::Rejected as u8, Ordering::AcqRel);
        lock(&self.first_error).get_or_insert_with(|| error.to_string());
    }

    /// Serves the producer's callbacks (on this thread: no polling thread, and messages are
    /// freed where they were allocated) until every report of the batch is in. A producer the
    /// broker no longer knows fails what it holds at once (purged, offered again), so that the
    /// next delivery starts a new one instead of waiting out `delivery_timeout`.
    async fn wait(self: Arc<Self>, producer: Arc<BaseProducer<Context>>) -> Result<(), DeliveryError> {
        let mut purged = false;
        let mut checked = Instant::now();
        loop {
            producer.poll(Duration::ZERO);
            if self.pending.load(Ordering::Acquire) == 0 {
                break;
            }
            if !purged && checked.elapsed() >= STUCK_CHECK {
                checked = Instant::now();
                producer.context().check_stuck(&producer);
            }
            if !purged && producer.context().stale() {
                producer.purge(PurgeConfig::default().queue().inflight());
                purged = true;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let outcomes: Vec<Outcome> = self
            .outcomes
            .iter()
            .map(|o| match o.load(Ordering::Acquire) {
                0 => Outcome::Delivered,
                1 => Outcome::Rejected,
                _ => Outcome::Retry,
            })
            .collect();
        if outcomes.iter().all(|&o| o == Outcome::Delivered) {
            self.failures.store(0, Ordering::Relaxed);
            return Ok(());
        }
        if outcomes.contains(&Outcome::Retry) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let message = lock(&self.first_error).take().unwrap_or_default();
        Err(DeliveryError { outcomes, error: anyhow::anyhow!("kafka: {message}") })
    }
}

/// What a message carries back in its delivery report.
pub struct Report {
    tracker: Arc<Tracker>,
    index: usize,
    topic: Arc<Delivered>,
}

/// librdkafka's callbacks: delivery reports and client errors.
pub struct Context {
    counters: Arc<SinkCounters>,
    /// This producer must be replaced: the broker said it no longer knows it (see
    /// [`lost_producer_state`]), or it is stuck after an outage (see [`STUCK_AFTER`]).
    stale: AtomicBool,
    /// A connection failed since the last delivery report that got through.
    outage: AtomicBool,
    /// When the last delivery report (of any outcome) came, in milliseconds since `born`.
    last_report: AtomicU64,
    born: Instant,
}

fn kind(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "Client".into(),
    }
}

impl Context {
    fn failed(&self, error: &KafkaError, report: &Report) {
        let outcome = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord) => Outcome::Rejected,
            _ => Outcome::Retry,
        };
        self.heard(error);
        self.counters.error(&kind(error), None);
        self.reported();
        report.tracker.fail(report.index, outcome, error);
    }

    fn reported(&self) {
        self.last_report.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Notes what an error says of this producer.
    fn heard(&self, error: &KafkaError) {
        match error.rdkafka_error_code() {
            Some(code) if lost_producer_state(code) => self.stale.store(true, Ordering::Relaxed),
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown) => {
                self.outage.store(true, Ordering::Relaxed)
            }
            _ => {}
        }
    }

    /// After an outage, messages in flight and no report for [`STUCK_AFTER`]: if the cluster
    /// answers a metadata request now, the producer is stuck and must be replaced. A slow
    /// broker that never dropped a connection is left alone.
    fn check_stuck(&self, producer: &BaseProducer<Context>) {
        let quiet = self.born.elapsed().saturating_sub(Duration::from_millis(self.last_report.load(Ordering::Relaxed)));
        if !self.outage.load(Ordering::Relaxed) || quiet < STUCK_AFTER || producer.in_flight_count() == 0 {
            return;
        }
        if producer.client().fetch_metadata(None, Duration::from_millis(500)).is_ok() {
            warn!(sink = %self.counters.name, ?quiet, "kafka: the cluster answers again but the producer delivers nothing");
            self.stale.store(true, Ordering::Relaxed);
        }
    }

    /// Whether this producer must be replaced.
    fn stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let sink = &self.counters.name;
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                error!(%sink, "librdkafka {facility}: {message}")
            }
            RDKafkaLogLevel::Warning => warn!(%sink, "librdkafka {facility}: {message}"),
            _ => debug!(%sink, "librdkafka {facility}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(sink = %self.counters.name, "kafka: {error}: {reason}");
        self.heard(&error);
        self.counters.error(&kind(&error), Some(format!("{error}: {reason}")));
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Report>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Box<Report>) {
        match result {
            Ok(message) => {
                report.topic.records.fetch_add(1, Ordering::Relaxed);
                report.topic.bytes.fetch_add(message.payload_len() as u64, Ordering::Relaxed);
                self.outage.store(false, Ordering::Relaxed);
                self.reported();
                report.tracker.finish();
            }
            Err((error, _)) => self.failed(error, &report),
        }
    }
}

/// Where a stream's messages go, computed once per stream.
struct Route {
    /// Held so that the address the cache is keyed by is not reused while cached.
    _origin: Arc<Origin>,
    topic: String,
    key: Vec<u8>,
    headers: Option<OwnedHeaders>,
    delivered: Arc<Delivered>,
}

fn render(template: &Template, o: &Origin, out: &mut String) {
    for part in &template.0 {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Field(Field::Host) => out.push_str(&o.host),
            Part::Field(Field::Service) => out.push_str(&o.service),
            Part::Field(Field::Module) => out.push_str(&o.module),
            Part::Field(Field::Volume) => out.push_str(&o.volume),
            Part::Field(Field::Path) => out.push_str(&o.path),
            Part::Field(Field::Pid) => out.push_str(&o.pid.to_string()),
            Part::Field(Field::Tenant) => out.push_str(&o.tenant),
            Part::Field(Field::Container) => out.push_str(o.container.as_ref().map_or("", |c| &c.name)),
            Part::Field(Field::ContainerId) => out.push_str(o.container.as_ref().map_or("", |c| &c.id)),
            Part::Field(Field::Image) => out.push_str(o.container.as_ref().map_or("", |c| &c.image)),
        }
    }
}

/// A topic name Kafka accepts: other characters become '_', at most 249 of them.
fn topic_name(template: &Template, o: &Origin) -> String {
    let mut raw = String::new();
    render(template, o, &mut raw);
    let mut topic: String =
        raw.chars().map(|c| if logtap_fusefs::is_name_char(c) { c } else { '_' }).take(MAX_TOPIC).collect();
    if topic.is_empty() || topic == "." || topic == ".." {
        topic.push('_');
    }
    topic
}

fn headers(o: &Origin) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(10)
        .insert(Header { key: "host", value: Some(o.host.as_bytes()) })
        .insert(Header { key: "service", value: Some(o.service.as_bytes()) })
        .insert(Header { key: "module", value: Some(o.module.as_bytes()) });
    if !o.volume.is_empty() {
        h = h.insert(Header { key: "volume", value: Some(o.volume.as_bytes()) });
    }
    h = h.insert(Header { key: "path", value: Some(o.path.as_bytes()) });
    if o.pid != 0 {
        h = h.insert(Header { key: "pid", value: Some(o.pid.to_string().as_bytes()) });
    }
    if !o.tenant.is_empty() {
        h = h.insert(Header { key: "tenant", value: Some(o.tenant.as_bytes()) });
    }
    if let Some(c) = &o.container {
        h = h.insert(Header { key: "container_id", value: Some(c.id.as_bytes()) });
        for (key, value) in [("container_name", &c.name), ("image", &c.image)] {
            if !value.is_empty() {
                h = h.insert(Header { key, value: Some(value.as_bytes()) });
            }
        }
        for (key, value) in &c.labels {
            h = h.insert(Header { key: &format!("label.{key}"), value: Some(value.as_bytes()) });
        }
    }
    h
}

/// Cuts `bytes` into `n` pieces of about equal length, at UTF-8 character boundaries when the
/// bytes are UTF-8 (so JSON parts stay readable text).
fn cut(bytes: &[u8], n: usize) -> Vec<std::ops::Range<usize>> {
    let text = std::str::from_utf8(bytes).ok();
    let step = bytes.len().div_ceil(n).max(1);
    let mut ranges = Vec::with_capacity(n);
    let mut start = 0;
    while start < bytes.len() {
        let mut end = (start + step).min(bytes.len());
        if let Some(t) = text {
            while end < bytes.len() && !t.is_char_boundary(end) {
                end += 1;
            }
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

pub struct KafkaSink {
    client: ClientConfig,
    producer: Arc<BaseProducer<Context>>,
    counters: Arc<SinkCounters>,
    topic: Template,
    key: Template,
    with_headers: bool,
    format: Format,
    max_value: usize,
    routes: HashMap<usize, Arc<Route>>,
    json: Vec<u8>,
    sealed: Vec<u8>,
    failures: Arc<AtomicU32>,
}

fn producer(client: &ClientConfig, counters: &Arc<SinkCounters>) -> anyhow::Result<Arc<BaseProducer<Context>>> {
    let context = Context {
        counters: counters.clone(),
        stale: AtomicBool::new(false),
        outage: AtomicBool::new(false),
        last_report: AtomicU64::new(0),
        born: Instant::now(),
    };
    Ok(Arc::new(BaseProducer::from_config_and_context(client, context)?))
}

impl KafkaSink {
    pub fn new(config: &KafkaSinkConfig, host: &str, counters: Arc<SinkCounters>) -> anyhow::Result<Self> {
        check(config).map_err(anyhow::Error::msg)?;
        let client = client_config(config, host);
        let producer = producer(&client, &counters)?;
        Ok(Self {
            client,
            producer,
            counters,
            topic: config.topic.clone(),
            key: config.key.clone(),
            with_headers: config.headers,
            format: config.format,
            max_value: usize::try_from(config.max_message_bytes.0)?,
            routes: HashMap::new(),
            json: Vec::new(),
            sealed: Vec::new(),
            failures: Arc::default(),
        })
    }

    fn route(&mut self, origin: &Arc<Origin>) -> Arc<Route> {
        let id = Arc::as_ptr(origin) as usize;
        if let Some(route) = self.routes.get(&id) {
            return route.clone();
        }
        if self.routes.len() >= MAX_ROUTES {
            self.routes.clear();
        }
        let topic = topic_name(&self.topic, origin);
        let mut key = String::new();
        render(&self.key, origin, &mut key);
        let route = Arc::new(Route {
            _origin: origin.clone(),
            delivered: self.counters.topic(&topic),
            topic,
            key: key.into_bytes(),
            headers: self.with_headers.then(|| headers(origin)),
        });
        self.routes.insert(id, route.clone());
        route
    }

    /// Hands one message to librdkafka, with `extra` headers after the route's; a failure it
    /// reports at once counts like a failed delivery report.
    fn send(&self, tracker: &Arc<Tracker>, index: usize, route: &Route, value: &[u8], at: i64, extra: &[(&str, &str)]) {
        tracker.pending.fetch_add(1, Ordering::AcqRel);
        let opaque = Box::new(Report { tracker: tracker.clone(), index, topic: route.delivered.clone() });
        let mut message =
            BaseRecord::with_opaque_to(&route.topic, opaque).key(&route.key[..]).payload(value).timestamp(at);
        if route.headers.is_some() || !extra.is_empty() {
            let mut h = route.headers.clone().unwrap_or_default();
            for (key, value) in extra {
                h = h.insert(Header { key, value: Some(*value) });
            }
            message = message.headers(h);
        }
        loop {
            match self.producer.send(message) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // librdkafka's queue is full (options lowered it): take reports to drain it.
                    message = back;
                    self.producer.poll(Duration::from_millis(2));
                }
                Err((error, back)) => return self.producer.context().failed(&error, &back.delivery_opaque),
            }
        }
    }

    /// Sends `value` as one message, or as parts with a `part` header `i/n` when it is longer
    /// than the limit.
    fn send_parts(
        &self,
        tracker: &Arc<Tracker>,
        index: usize,
        route: &Route,
        value: &[u8],
        at: i64,
        extra: &[(&str, &str)],
    ) {
        if value.len() <= self.max_value {
            return self.send(tracker, index, route, value, at, extra);
        }
        self.counters.split_records.fetch_add(1, Ordering::Relaxed);
        let pieces = cut(value, value.len().div_ceil(self.max_value));
        for (i, range) in pieces.iter().enumerate() {
            let part = format!("{}/{}", i + 1, pieces.len());
            let headers: Vec<(&str, &str)> = extra.iter().copied().chain([("part", part.as_str())]).collect();
            self.send(tracker, index, route, &value[range.clone()], at, &headers);
        }
    }

    fn send_record(&mut self, tracker: &Arc<Tracker>, sealer: &mut Sealer, index: usize, o: &Outgoing) {
        let r = &o.record;
        let route = self.route(&r.origin);
        let at = r.captured_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        let mut json = std::mem::take(&mut self.json);
        if let Some(key) = &o.key {
            let value: &[u8] = match self.format {
                Format::Raw => &r.bytes,
                Format::Json => {
                    json.clear();
                    r.to_json(&mut json);
                    &json
                }
            };
            let mut sealed = std::mem::take(&mut self.sealed);
            sealed.clear();
            match sealer.seal(key, r, value, &mut sealed) {
                Ok(()) => {
                    let extra = [("enc", ALGORITHM), ("key_id", &*key.id)];
                    self.send_parts(tracker, index, &route, &sealed, at, &extra);
                }
                // Only a value beyond 4 GiB cannot be sealed: no retry could succeed.
                Err(e) => tracker.reject(index, &e.to_string()),
            }
            self.sealed = sealed;
            self.json = json;
            return;
        }
        match self.format {
            Format::Raw => self.send_parts(tracker, index, &route, &r.bytes, at, &[]),
            Format::Json => {
                json.clear();
                r.to_json(&mut json);
                if json.len() <= self.max_value {
                    self.send(tracker, index, &route, &json, at, &[]);
                } else {
                    self.counters.split_records.fetch_add(1, Ordering::Relaxed);
                    for piece in self.json_parts(r, json.len()) {
                        self.send(tracker, index, &route, &piece, at, &[]);
                    }
                }
            }
        }
        self.json = json;
    }

    /// JSON envelopes of the pieces of `r`, each within the limit: escaping makes the size of
    /// an envelope hard to predict, so the pieces get smaller until all of them fit.
    fn json_parts(&self, r: &Record, whole: usize) -> Vec<Vec<u8>> {
        let mut n = whole.div_ceil(self.max_value) + 1;
        loop {
            let parts: Vec<Vec<u8>> = cut(&r.bytes, n)
                .into_iter()
                .map(|range| {
                    let piece = Record { bytes: r.bytes.slice(range), split: true, ..r.clone() };
                    let mut out = Vec::new();
                    piece.to_json(&mut out);
                    out
                })
                .collect();
            // One byte per piece always fits: the limit is at least 1KiB.
            if parts.iter().all(|p| p.len() <= self.max_value) || n >= r.bytes.len() {
                return parts;
            }
            n *= 2;
        }
    }
}

impl Sink for KafkaSink {
    fn deliver(&mut self, records: &[Outgoing]) -> Delivery {
        let failures = self.failures.load(Ordering::Relaxed);
        let reset = if let Some((code, reason)) = self.producer.client().fatal_error() {
            Some(format!("fatal producer error {code:?}: {reason}"))
        } else if self.producer.context().stale() {
            Some("the broker no longer knows this producer (restarted without its state?)".into())
        } else if failures >= FAILURES_TO_RESET {
            Some(format!("{failures} deliveries in a row failed"))
        } else {
            None
        };
        if let Some(why) = reset {
            // The old producer fails what it still holds (purged; deliveries waiting on it
            // still poll it), and those records come back through their batches' retries.
            warn!(sink = %self.counters.name, "kafka: {why}; starting a new producer");
            match producer(&self.client, &self.counters) {
                Ok(p) => {
                    self.producer.purge(PurgeConfig::default().queue().inflight());
                    self.producer = p;
                    self.failures.store(0, Ordering::Relaxed);
                }
                Err(e) => error!(sink = %self.counters.name, "kafka: cannot start a new producer: {e:#}"),
            }
        }
        let tracker = Arc::new(Tracker::new(records.len(), self.failures.clone()));
        let mut sealer = Sealer::new();
        for (index, o) in records.iter().enumerate() {
            self.send_record(&tracker, &mut sealer, index, o);
        }
        tracker.finish();
        // Reports of earlier batches, and room in librdkafka's queue.
        self.producer.poll(Duration::ZERO);
        Box::pin(tracker.wait(self.producer.clone()))
    }
}

#[cfg(test)]
mod tests;
