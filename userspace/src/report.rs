//! The report: what every stage counted, put together for the control socket (JSON) and
//! Prometheus. Made once, from the parts it reads; it counts nothing itself.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use crate::api::{
    ContainerSnapshot, ContainersSnapshot, DiscoverySnapshot, PipesSnapshot, ReaderSnapshot, RestartSnapshot,
    RingSnapshot, Snapshot, TargetSnapshot, TenantSnapshot, VolumeSnapshot,
};
use crate::counters::{CountersSnapshot, DeliveredSnapshot, SealingSnapshot, SinkCounters, SinkSnapshot};
use crate::discovery::Discovery;
use crate::encryption::keys::Keys;
use crate::ring::Ring;
use crate::sources::pipes::PipeSource;
use crate::sources::volume::VolumeSource;
use crate::sources::Sources;

/// The worker's place in the keeper's life.
#[derive(Debug, Clone, Default)]
pub struct Life {
    pub keeper_pid: Option<u32>,
    pub restarts: u64,
    pub last_restart: Option<RestartSnapshot>,
}

pub struct Report {
    pub host: String,
    started: Instant,
    life: Life,
    ring: Arc<Ring>,
    sinks: Vec<Arc<SinkCounters>>,
    volumes: Arc<VolumeSource>,
    pipes: Arc<PipeSource>,
    discovery: Option<Arc<Discovery>>,
    keys: Option<Arc<Keys>>,
}

impl Report {
    pub fn new(
        host: String,
        ring: Arc<Ring>,
        sinks: Vec<Arc<SinkCounters>>,
        sources: Sources,
        discovery: Option<Arc<Discovery>>,
        life: Life,
        keys: Option<Arc<Keys>>,
    ) -> Self {
        let Sources { volumes, pipes } = sources;
        Self { host, started: Instant::now(), ring, sinks, volumes, pipes, discovery, life, keys }
    }

    /// The runtime followed and its containers, with what was captured and lost of each.
    pub fn discovery(&self) -> Option<DiscoverySnapshot> {
        self.discovery.as_ref().map(|d| containers(d, &self.pipes(), &self.volumes()))
    }

    pub fn pipes(&self) -> PipesSnapshot {
        self.pipes.snapshot()
    }

    pub fn volumes(&self) -> Vec<VolumeSnapshot> {
        self.volumes.snapshot()
    }

    pub fn snapshot(&self) -> Snapshot {
        let pipes = self.pipes();
        let volumes = self.volumes();
        Snapshot {
            host: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ring: self.ring.snapshot(),
            volume_serving: self.volumes.serving(),
            discovery: self.discovery.as_ref().map(|d| containers(d, &pipes, &volumes)),
            volumes,
            pipes,
            sinks: self.sinks.iter().map(|s| s.snapshot()).collect(),
            keeper_pid: self.life.keeper_pid,
            worker_pid: std::process::id(),
            restarts: self.life.restarts,
            last_restart: self.life.last_restart.clone(),
            encryption: self.keys.as_ref().map(|k| k.snapshot()),
        }
    }
}

/// Each container with its counts: over its pipe targets (stdout/stderr) and its volumes.
fn containers(d: &Discovery, pipes: &PipesSnapshot, volumes: &[VolumeSnapshot]) -> DiscoverySnapshot {
    let (runtime, infos) = d.snapshot();
    let containers = infos
        .into_iter()
        .map(|info| {
            let mut pipe = CountersSnapshot::default();
            let (mut written, mut kernel_lost, mut truncated, mut other, mut spliced) = (0, 0, 0, 0, 0);
            for t in pipes.targets.iter().filter(|t| t.spec.container.as_deref() == Some(&info.id)) {
                pipe.add(&t.totals);
                written += t.written_bytes_total;
                kernel_lost += t.lost_bytes_total;
                truncated += t.truncated_bytes_total;
                other += t.other_pipe_bytes_total;
                spliced += t.spliced_bytes_total;
            }
            let mine = volumes.iter().filter(|v| v.container.as_ref().is_some_and(|c| c.id == info.id));
            let (mut dropped, mut throttled) = (pipe.dropped_bytes_total, pipe.throttled_bytes_total);
            for v in mine {
                dropped += v.totals.dropped_bytes_total;
                throttled += v.totals.throttled_bytes_total;
            }
            ContainerSnapshot {
                info,
                pipe,
                written_bytes_total: written,
                lost_bytes_total: kernel_lost + truncated + dropped + throttled + spliced,
                kernel_lost_bytes_total: kernel_lost,
                truncated_bytes_total: truncated,
                dropped_bytes_total: dropped,
                throttled_bytes_total: throttled,
                spliced_bytes_total: spliced,
                other_pipe_bytes_total: other,
            }
        })
        .collect();
    DiscoverySnapshot { runtime, containers }
}

/// A series family per field of a document: name (after its table's prefix), type, help, value.
type Field<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// Prometheus text being written.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str, rows: impl IntoIterator<Item = (String, f64)>) {
        let _ = writeln!(self.0, "# HELP logtap_{name} {help}\n# TYPE logtap_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(self.0, "logtap_{name}{labels} {v}");
        }
    }

    /// A family per field, named `{prefix}{field}`, with a series per row (labels, document).
    fn table<T>(&mut self, prefix: &str, fields: &[Field<T>], rows: &[(String, &T)]) {
        for (name, kind, help, pick) in fields {
            self.family(&format!("{prefix}{name}"), kind, help, rows.iter().map(|(l, t)| (l.clone(), pick(t) as f64)));
        }
    }
}

/// Labels `{k="v",...}`, values escaped as the text format wants.
fn labels(pairs: &[(&str, &str)]) -> String {
    let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

/// Prometheus text exposition (version 0.0.4) of a snapshot.
pub fn prometheus(s: &Snapshot) -> String {
    let mut out = Exposition(String::new());
    out.family(
        "worker_restarts_total",
        "counter",
        "Workers the keeper started after the first.",
        [(String::new(), s.restarts as f64)],
    );
    if let Some(r) = &s.last_restart {
        out.family(
            "last_restart_gap_seconds",
            "gauge",
            "From the last worker's exit to the next serving.",
            [(String::new(), r.gap_ms / 1e3)],
        );
        out.family(
            "last_restart_redelivered_records",
            "gauge",
            "Records the last restart delivered again (handed to a sink before, not acknowledged).",
            [(String::new(), r.redelivered_records as f64)],
        );
        out.family(
            "last_restart_unread_pipe_bytes",
            "gauge",
            "Pipe output captured during the last restart's gap and not read (other eBPF programs loaded).",
            [(String::new(), r.unread_pipe_bytes as f64)],
        );
    }
    let counters: [Field<CountersSnapshot>; 11] = [
        ("captured_records_total", "counter", "Records captured.", |c| c.captured_records_total),
        ("captured_bytes_total", "counter", "Bytes captured.", |c| c.captured_bytes_total),
        ("dropped_records_total", "counter", "Records dropped by the ring.", |c| c.dropped_records_total),
        ("dropped_bytes_total", "counter", "Bytes dropped by the ring.", |c| c.dropped_bytes_total),
        ("throttled_records_total", "counter", "Records beyond the source's or tenant's rate.", |c| {
            c.throttled_records_total
        }),
        ("throttled_bytes_total", "counter", "Bytes beyond the source's or tenant's rate.", |c| {
            c.throttled_bytes_total
        }),
        ("split_records_total", "counter", "Records that are pieces of over-long lines.", |c| c.split_records_total),
        (
            "copied_bytes_total",
            "counter",
            "Bytes of copies of captured files (copytruncate, cp), not captured again.",
            |c| c.copied_bytes_total,
        ),
        (
            "overwritten_bytes_total",
            "counter",
            "Bytes written again below what was captured (not captured again).",
            |c| c.overwritten_bytes_total,
        ),
        ("refused_bytes_total", "counter", "Bytes refused because the agent was shutting down.", |c| {
            c.refused_bytes_total
        }),
        ("memory_bytes", "gauge", "Memory the files' contents hold (captured tails and what waits).", |c| {
            c.memory_bytes
        }),
    ];
    let volumes: Vec<(String, &CountersSnapshot)> =
        s.volumes.iter().map(|v| (labels(&[("volume", &v.name), ("service", &v.service)]), &v.totals)).collect();
    out.table("volume_", &counters, &volumes);
    let files: Vec<(String, &CountersSnapshot)> = s
        .volumes
        .iter()
        .flat_map(|v| v.files.iter().map(move |(p, c)| (labels(&[("volume", &v.name), ("path", p)]), c)))
        .collect();
    out.table("file_", &counters, &files);

    let target_fields: [Field<TargetSnapshot>; 14] = [
        ("writes_total", "counter", "write() calls to watched pipes.", |t| t.writes_total),
        ("written_bytes_total", "counter", "Bytes written to watched pipes.", |t| t.written_bytes_total),
        ("truncated_bytes_total", "counter", "Bytes past max_write_capture.", |t| t.truncated_bytes_total),
        ("lost_events_total", "counter", "Events the BPF ring buffer had no room for.", |t| t.lost_events_total),
        ("lost_bytes_total", "counter", "Bytes the BPF ring buffer had no room for.", |t| t.lost_bytes_total),
        ("captured_records_total", "counter", "Records captured from pipes.", |t| t.totals.captured_records_total),
        ("dropped_records_total", "counter", "Pipe records dropped by the ring.", |t| t.totals.dropped_records_total),
        ("captured_bytes_total", "counter", "Bytes captured from pipes.", |t| t.totals.captured_bytes_total),
        ("dropped_bytes_total", "counter", "Pipe bytes dropped by the ring.", |t| t.totals.dropped_bytes_total),
        ("throttled_records_total", "counter", "Pipe records beyond the source's or tenant's rate.", |t| {
            t.totals.throttled_records_total
        }),
        ("throttled_bytes_total", "counter", "Pipe bytes beyond the source's or tenant's rate.", |t| {
            t.totals.throttled_bytes_total
        }),
        ("split_records_total", "counter", "Pipe records that are pieces of over-long lines.", |t| {
            t.totals.split_records_total
        }),
        ("other_pipe_bytes_total", "counter", "Bytes written to pipes that are not the target's output.", |t| {
            t.other_pipe_bytes_total
        }),
        ("spliced_bytes_total", "counter", "Output bytes moved by splice/tee/sendfile, not copied (lost).", |t| {
            t.spliced_bytes_total
        }),
    ];
    // Ended targets are in the JSON stats only: the series of short runs would pile up.
    let targets: Vec<(String, &TargetSnapshot)> = s
        .pipes
        .targets
        .iter()
        .filter(|t| !t.ended)
        .map(|t| (labels(&[("target", &t.id), ("service", &t.service_name)]), t))
        .collect();
    out.table("pipe_", &target_fields, &targets);

    if let Some(c) = &s.pipes.containers {
        let fields: [Field<ContainersSnapshot>; 8] = [
            ("unclassified_written_bytes_total", "counter", "Bytes from cgroups not yet told apart.", |c| {
                c.unclassified_written_bytes_total
            }),
            ("ignored_bytes_total", "counter", "Bytes of cgroups that are no container (skipped).", |c| {
                c.ignored_bytes_total
            }),
            ("unresolved_bytes_total", "counter", "Bytes of cgroups removed before being told apart (lost).", |c| {
                c.unresolved_bytes_total
            }),
            ("lost_bytes_total", "counter", "Unclassified bytes the BPF ring buffer had no room for.", |c| {
                c.lost_bytes_total
            }),
            ("held_records", "gauge", "Records waiting for the runtime to name their container.", |c| c.held_records),
            ("unidentified_records_total", "counter", "Records sent with the container id only.", |c| {
                c.unidentified_records_total
            }),
            ("opted_out_records_total", "counter", "Records of opted-out containers discarded.", |c| {
                c.opted_out_records_total
            }),
            ("excluded_cgroups", "gauge", "cgroups the kernel skips.", |c| c.excluded_cgroups),
        ];
        out.table("containers_", &fields, &[(String::new(), c)]);
    }
    if let Some(d) = &s.discovery {
        let runtime: [Field<DiscoverySnapshot>; 2] = [
            ("connected", "gauge", "Whether the container runtime's API answers.", |d| {
                u64::from(d.runtime.status == "connected")
            }),
            ("reconnects_total", "counter", "Connections to the runtime lost.", |d| d.runtime.reconnects_total),
        ];
        out.table("discovery_", &runtime, &[(String::new(), d)]);
        let fields: [Field<ContainerSnapshot>; 9] = [
            ("pipe_captured_records_total", "counter", "stdout/stderr records per container.", |c| {
                c.pipe.captured_records_total
            }),
            ("lost_bytes_total", "counter", "Bytes of a container's output not delivered.", |c| c.lost_bytes_total),
            ("other_pipe_bytes_total", "counter", "Bytes written to pipes that are not output.", |c| {
                c.other_pipe_bytes_total
            }),
            ("written_bytes_total", "counter", "Bytes written to a container's stdout/stderr pipes.", |c| {
                c.written_bytes_total
            }),
            ("kernel_lost_bytes_total", "counter", "stdout/stderr bytes the BPF ring buffer had no room for.", |c| {
                c.kernel_lost_bytes_total
            }),
            ("truncated_bytes_total", "counter", "stdout/stderr bytes past max_write_capture.", |c| {
                c.truncated_bytes_total
            }),
            ("dropped_bytes_total", "counter", "Bytes of a container's records the ring dropped.", |c| {
                c.dropped_bytes_total
            }),
            ("throttled_bytes_total", "counter", "Bytes of a container's records beyond a rate.", |c| {
                c.throttled_bytes_total
            }),
            ("spliced_bytes_total", "counter", "stdout/stderr bytes moved by splice/tee/sendfile (lost).", |c| {
                c.spliced_bytes_total
            }),
        ];
        let live: Vec<(String, &ContainerSnapshot)> = d
            .containers
            .iter()
            .filter(|c| c.info.state != "removed")
            .map(|c| (labels(&[("container", &c.info.name), ("service", &c.info.service)]), c))
            .collect();
        out.table("container_", &fields, &live);
    }

    let ring: [Field<RingSnapshot>; 10] = [
        ("capacity_bytes", "gauge", "Ring capacity.", |r| r.capacity_bytes),
        ("used_bytes", "gauge", "Ring bytes in use (records and their headers).", |r| r.used_bytes),
        ("memory_bytes", "gauge", "Memory the ring holds (pages touched and not given back).", |r| r.memory_bytes),
        ("records", "gauge", "Records in the ring.", |r| r.records),
        ("pushed_records_total", "counter", "Records pushed into the ring.", |r| r.pushed_records_total),
        ("dropped_records_total", "counter", "Records dropped by the ring.", |r| r.dropped_records_total),
        ("dropped_bytes_total", "counter", "Bytes dropped by the ring.", |r| r.dropped_bytes_total),
        ("throttled_records_total", "counter", "Records beyond a source's or tenant's rate.", |r| {
            r.throttled_records_total
        }),
        ("throttled_bytes_total", "counter", "Bytes beyond a source's or tenant's rate.", |r| r.throttled_bytes_total),
        ("blocked_pushes_total", "counter", "Pushes that waited for room (block policy).", |r| r.blocked_pushes_total),
    ];
    out.table("ring_", &ring, &[(String::new(), &s.ring)]);
    let readers: [Field<ReaderSnapshot>; 4] = [
        ("lag_records", "gauge", "Records pushed and not yet handed to the sink.", |r| r.lag_records),
        ("in_flight_records", "gauge", "Records handed to the sink, not acknowledged.", |r| r.in_flight_records),
        ("dropped_records_total", "counter", "Records the sink missed (dropped or skipped).", |r| {
            r.dropped_records_total
        }),
        ("dropped_bytes_total", "counter", "Bytes the sink missed (dropped or skipped).", |r| r.dropped_bytes_total),
    ];
    let rows: Vec<(String, &ReaderSnapshot)> =
        s.ring.readers.iter().map(|r| (labels(&[("sink", &r.name)]), r)).collect();
    out.table("ring_reader_", &readers, &rows);
    let tenants: [Field<TenantSnapshot>; 5] = [
        ("held_bytes", "gauge", "Ring bytes the tenant's records take.", |t| t.held_bytes),
        ("dropped_records_total", "counter", "The tenant's records dropped by the ring.", |t| t.dropped_records_total),
        ("dropped_bytes_total", "counter", "The tenant's bytes dropped by the ring.", |t| t.dropped_bytes_total),
        ("throttled_records_total", "counter", "The tenant's records beyond a rate.", |t| t.throttled_records_total),
        ("throttled_bytes_total", "counter", "The tenant's bytes beyond a rate.", |t| t.throttled_bytes_total),
    ];
    let rows: Vec<(String, &TenantSnapshot)> =
        s.ring.tenants.iter().map(|t| (labels(&[("tenant", &t.tenant)]), t)).collect();
    out.table("tenant_", &tenants, &rows);

    let sinks: [Field<SinkSnapshot>; 8] = [
        ("delivered_records_total", "counter", "Records delivered.", |k| k.delivered_records_total),
        ("delivered_bytes_total", "counter", "Bytes delivered.", |k| k.delivered_bytes_total),
        ("errors_total", "counter", "Failed delivery attempts (each retried).", |k| k.errors_total),
        ("in_flight_records", "gauge", "Records sent and not yet acknowledged.", |k| k.in_flight_records),
        ("retried_records_total", "counter", "Records offered again after a failure.", |k| k.retried_records_total),
        ("rejected_records_total", "counter", "Records the destination refused for good (dropped).", |k| {
            k.rejected_records_total
        }),
        ("rejected_bytes_total", "counter", "Bytes the destination refused for good (dropped).", |k| {
            k.rejected_bytes_total
        }),
        ("split_records_total", "counter", "Records sent as several messages.", |k| k.split_records_total),
    ];
    let rows: Vec<(String, &SinkSnapshot)> = s.sinks.iter().map(|k| (labels(&[("sink", &k.name)]), k)).collect();
    out.table("sink_", &sinks, &rows);
    let by_kind = s.sinks.iter().flat_map(|k| {
        k.errors_by_kind.iter().map(|(kind, n)| (labels(&[("sink", &k.name), ("kind", kind)]), *n as f64))
    });
    out.family("sink_errors_by_kind_total", "counter", "Errors the destination reported, by kind.", by_kind);
    let topics: [Field<DeliveredSnapshot>; 2] = [
        ("delivered_records_total", "counter", "Records delivered per topic.", |d| d.delivered_records_total),
        ("delivered_bytes_total", "counter", "Bytes delivered per topic.", |d| d.delivered_bytes_total),
    ];
    let rows: Vec<(String, &DeliveredSnapshot)> = s
        .sinks
        .iter()
        .flat_map(|k| k.topics.iter().map(move |(t, d)| (labels(&[("sink", &k.name), ("topic", t)]), d)))
        .collect();
    out.table("sink_topic_", &topics, &rows);
    let latency = s.sinks.iter().flat_map(|k| {
        [("0.5", k.latency.p50_seconds), ("0.9", k.latency.p90_seconds), ("0.99", k.latency.p99_seconds)]
            .map(|(q, v)| (labels(&[("sink", &k.name), ("quantile", q)]), v))
    });
    out.family("sink_latency_seconds", "summary", "Capture-to-delivery latency.", latency);
    let sealing: [Field<SealingSnapshot>; 7] = [
        ("sealed_records_total", "counter", "Records delivered sealed with the tenant's key.", |t| {
            t.sealed_records_total
        }),
        ("sealed_bytes_total", "counter", "Bytes (before sealing) delivered sealed.", |t| t.sealed_bytes_total),
        ("plaintext_records_total", "counter", "Records delivered in clear: the tenant has no key.", |t| {
            t.plaintext_records_total
        }),
        ("plaintext_bytes_total", "counter", "Bytes delivered in clear: the tenant has no key.", |t| {
            t.plaintext_bytes_total
        }),
        ("dropped_records_total", "counter", "Records not sent: no usable key and the policy drops.", |t| {
            t.dropped_records_total
        }),
        ("dropped_bytes_total", "counter", "Bytes not sent: no usable key and the policy drops.", |t| {
            t.dropped_bytes_total
        }),
        ("waiting_records", "gauge", "Records held until the tenant's key is there.", |t| t.waiting_records),
    ];
    let rows: Vec<(String, &SealingSnapshot)> = s
        .sinks
        .iter()
        .flat_map(|k| k.encryption.iter().map(move |(t, d)| (labels(&[("sink", &k.name), ("tenant", t)]), d)))
        .collect();
    out.table("sink_tenant_", &sealing, &rows);
    if let Some(e) = &s.encryption {
        let keys = e.tenants.iter().map(|t| (labels(&[("tenant", &t.tenant)]), t.key_ids.len() as f64));
        out.family("tenant_keys", "gauge", "Usable keys of each tenant in the key directory.", keys);
        let refused = [(String::new(), e.refused.len() as f64)];
        out.family("refused_key_files", "gauge", "Files of the key directory that are not usable keys.", refused);
        let reloads = [(String::new(), e.reloads_total as f64)];
        out.family("key_reloads_total", "counter", "Times the key directory changed and was read again.", reloads);
    }
    out.0
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use super::*;
    use crate::sources::volume::Framing;

    #[test]
    fn prometheus_text_has_labels_escaped() {
        let ring = Arc::new(
            Ring::new(1024, crate::ring::Policy::DropOldest, Duration::from_secs(1), Default::default()).unwrap(),
        );
        let framing = Framing { host: "h".into(), max_record_bytes: 100, partial_flush: Duration::from_secs(1) };
        let volumes = VolumeSource::new(framing.clone(), ring.clone(), None);
        let pipes = PipeSource::new(framing, ring.clone(), 100, "disabled", None);
        let sink = Arc::new(SinkCounters::new("out\"x", "stdout"));
        sink.delivered_records.fetch_add(3, Relaxed);
        let report = Report::new("h".into(), ring, vec![sink], Sources { volumes, pipes }, None, Life::default(), None);
        let text = prometheus(&report.snapshot());
        assert!(text.contains("logtap_sink_delivered_records_total{sink=\"out\\\"x\"} 3"), "{text}");
        assert!(text.contains("# TYPE logtap_ring_capacity_bytes gauge"));
    }

    /// Every counter the JSON stats show has its Prometheus series: the tables cannot drift
    /// from the documents.
    #[test]
    fn every_json_counter_has_a_series() {
        let ring = Arc::new(
            Ring::new(1024, crate::ring::Policy::DropOldest, Duration::from_secs(1), Default::default()).unwrap(),
        );
        let framing = Framing { host: "h".into(), max_record_bytes: 100, partial_flush: Duration::from_secs(1) };
        let volumes = VolumeSource::new(framing.clone(), ring.clone(), None);
        let pipes = PipeSource::new(framing, ring.clone(), 100, "disabled", None);
        let sink = Arc::new(SinkCounters::new("s", "stdout"));
        ring.add_reader("s", false);
        let report =
            Report::new("h".into(), ring, vec![sink.clone()], Sources { volumes, pipes }, None, Life::default(), None);
        let text = prometheus(&report.snapshot());
        for k in counters_of(&CountersSnapshot::default()) {
            for family in ["volume", "file"] {
                assert!(text.contains(&format!("# TYPE logtap_{family}_{k} ")), "no logtap_{family}_{k}");
            }
        }
        for k in counters_of(&sink.snapshot()) {
            assert!(text.contains(&format!("# TYPE logtap_sink_{k} ")), "no logtap_sink_{k}");
        }
        let ring = report.snapshot().ring;
        for k in counters_of(&ring).into_iter().filter(|k| k.ends_with("_total")) {
            assert!(text.contains(&format!("# TYPE logtap_ring_{k} ")), "no logtap_ring_{k}");
        }
        for k in counters_of(&ring.readers[0]) {
            assert!(text.contains(&format!("# TYPE logtap_ring_reader_{k} ")), "no logtap_ring_reader_{k}");
        }
    }

    /// The names of a document's integer fields.
    fn counters_of<T: serde::Serialize>(doc: &T) -> Vec<String> {
        let v = serde_json::to_value(doc).expect("JSON");
        v.as_object()
            .map(|o| o.iter().filter(|(_, v)| v.is_u64()).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default()
    }
}
