//! Sinks: where records go. A sink is one type implementing [`Sink`]; [`start`] gives each
//! configured sink its own reader of the ring and its own thread, so a slow or blocking
//! destination holds back only itself.

pub mod files;
pub mod stdout;

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tracing::{info, warn};

use crate::config::SinkConfig;
use crate::record::Record;
use crate::ring::{ReaderId, Ring};
use crate::stats::{SinkCounters, Stats};

/// Records per batch handed to a sink.
const BATCH_RECORDS: usize = 4096;
/// About how many bytes per batch.
const BATCH_BYTES: usize = 4 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A delivery that failed after the first `delivered` records of the batch got through.
#[derive(Debug)]
pub struct DeliveryError {
    pub delivered: usize,
    pub error: anyhow::Error,
}

pub trait Sink: Send + 'static {
    /// Delivers records in order. Returning Ok means all of them are at the destination;
    /// an error says how many leading records were, and the rest are offered again.
    fn deliver(&mut self, records: &[Record]) -> impl Future<Output = Result<(), DeliveryError>> + Send;
}

/// Starts every configured sink, each reading the ring from now on. Returns the threads of
/// the required sinks, which shutdown waits for; optional ones may be stalled for good.
pub fn start(
    sinks: &std::collections::BTreeMap<String, SinkConfig>,
    ring: &Arc<Ring>,
    stats: &Stats,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (name, config) in sinks {
        let reader = ring.add_reader(name, config.optional());
        let counters = stats.sink(name, config.kind());
        let thread = match config {
            SinkConfig::Files(c) => {
                spawn(name, files::FilesSink::new(c).with_context(|| format!("sink {name}"))?, ring, reader, counters)
            }
            SinkConfig::Stdout(_) => spawn(name, stdout::StdoutSink::new(), ring, reader, counters),
        }
        .with_context(|| format!("cannot start sink {name}"))?;
        info!(sink = %name, kind = config.kind(), optional = config.optional(), "sink started");
        if !config.optional() {
            threads.push(thread);
        }
    }
    Ok(threads)
}

fn spawn<S: Sink>(
    name: &str,
    sink: S,
    ring: &Arc<Ring>,
    reader: ReaderId,
    counters: Arc<SinkCounters>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let ring = ring.clone();
    std::thread::Builder::new().name(format!("sink-{name}")).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(sink = %counters.name, "cannot start the sink's runtime: {e}");
                return;
            }
        };
        rt.block_on(run(sink, ring, reader, counters));
    })
}

fn delivered(counters: &SinkCounters, records: &[Record]) {
    let now = SystemTime::now();
    let mut bytes = 0;
    // Records of one capture batch share their time: one histogram update per run.
    let mut run: Option<(SystemTime, u64)> = None;
    for r in records {
        bytes += r.bytes.len() as u64;
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
    counters.delivered_records.fetch_add(records.len() as u64, Relaxed);
    counters.delivered_bytes.fetch_add(bytes, Relaxed);
}

/// Reads, delivers, acknowledges; retries failures with backoff until the ring closes and
/// everything is delivered.
async fn run<S: Sink>(mut sink: S, ring: Arc<Ring>, reader: ReaderId, counters: Arc<SinkCounters>) {
    while let Some(batch) = ring.read(reader, BATCH_RECORDS, BATCH_BYTES).await {
        let mut from = 0;
        let mut backoff = Duration::from_millis(50);
        while from < batch.records.len() {
            match sink.deliver(&batch.records[from..]).await {
                Ok(()) => {
                    delivered(&counters, &batch.records[from..]);
                    from = batch.records.len();
                }
                Err(DeliveryError { delivered: n, error }) => {
                    let n = n.min(batch.records.len() - from);
                    delivered(&counters, &batch.records[from..from + n]);
                    from += n;
                    ring.ack(reader, batch.first + from as u64);
                    counters.errors.fetch_add(1, Relaxed);
                    let message = format!("{error:#}");
                    warn!(sink = %counters.name, retry_in = ?backoff, "delivery failed: {message}");
                    *counters.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        ring.ack(reader, batch.end());
    }
}
