//! The report: what every stage counted, put together for the control socket (JSON) and
//! Prometheus. Made once, from the parts it reads; it counts nothing itself.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use crate::api::{ContainerSnapshot, DiscoverySnapshot, PipesSnapshot, Snapshot, VolumeSnapshot};
use crate::counters::{CountersSnapshot, DeliveredSnapshot, SinkCounters, SinkSnapshot};
use crate::discovery::Discovery;
use crate::ring::Ring;
use crate::sources::pipes::PipeSource;
use crate::sources::volume::VolumeSource;

pub struct Report {
    pub host: String,
    started: Instant,
    ring: Arc<Ring>,
    sinks: Vec<Arc<SinkCounters>>,
    volumes: Arc<VolumeSource>,
    pipes: Arc<PipeSource>,
    discovery: Option<Arc<Discovery>>,
}

impl Report {
    pub fn new(
        host: String,
        ring: Arc<Ring>,
        sinks: Vec<Arc<SinkCounters>>,
        volumes: Arc<VolumeSource>,
        pipes: Arc<PipeSource>,
        discovery: Option<Arc<Discovery>>,
    ) -> Self {
        Self { host, started: Instant::now(), ring, sinks, volumes, pipes, discovery }
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
            discovery: self.discovery.as_ref().map(|d| containers(d, &pipes, &volumes)),
            volumes,
            pipes,
            sinks: self.sinks.iter().map(|s| s.snapshot()).collect(),
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
            let (mut written, mut kernel_lost, mut truncated, mut other) = (0, 0, 0, 0);
            for t in pipes.targets.iter().filter(|t| t.spec.container.as_deref() == Some(&info.id)) {
                pipe.add(&t.totals);
                written += t.written_bytes_total;
                kernel_lost += t.lost_bytes_total;
                truncated += t.truncated_bytes_total;
                other += t.other_pipe_bytes_total;
            }
            let mine = volumes.iter().filter(|v| v.container.as_ref().is_some_and(|c| c.id == info.id));
            let dropped = pipe.dropped_bytes_total + mine.map(|v| v.totals.dropped_bytes_total).sum::<u64>();
            ContainerSnapshot {
                info,
                pipe,
                written_bytes_total: written,
                lost_bytes_total: kernel_lost + truncated + dropped,
                kernel_lost_bytes_total: kernel_lost,
                truncated_bytes_total: truncated,
                dropped_bytes_total: dropped,
                other_pipe_bytes_total: other,
            }
        })
        .collect();
    DiscoverySnapshot { runtime, containers }
}

fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text exposition (version 0.0.4) of a snapshot.
pub fn prometheus(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP logtap_{name} {help}\n# TYPE logtap_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "logtap_{name}{labels} {v}");
        }
    };
    let vol =
        |v: &VolumeSnapshot| format!("{{volume=\"{}\",service=\"{}\"}}", label_value(&v.name), label_value(&v.service));
    let file =
        |v: &VolumeSnapshot, p: &str| format!("{{volume=\"{}\",path=\"{}\"}}", label_value(&v.name), label_value(p));
    type Pick = fn(&CountersSnapshot) -> u64;
    let fields: [(&str, &str, Pick); 7] = [
        ("captured_records_total", "Records captured.", |c| c.captured_records_total),
        ("captured_bytes_total", "Bytes captured.", |c| c.captured_bytes_total),
        ("dropped_records_total", "Records dropped by the ring.", |c| c.dropped_records_total),
        ("dropped_bytes_total", "Bytes dropped by the ring.", |c| c.dropped_bytes_total),
        ("split_records_total", "Records that are pieces of over-long lines.", |c| c.split_records_total),
        ("overwritten_bytes_total", "Bytes written again below the captured high-water mark.", |c| {
            c.overwritten_bytes_total
        }),
        ("refused_bytes_total", "Bytes refused because the agent was shutting down.", |c| c.refused_bytes_total),
    ];
    for (name, help, pick) in fields {
        metric(
            &format!("volume_{name}"),
            "counter",
            help,
            s.volumes.iter().map(|v| (vol(v), pick(&v.totals) as f64)).collect(),
        );
        metric(
            &format!("file_{name}"),
            "counter",
            help,
            s.volumes.iter().flat_map(|v| v.files.iter().map(move |(p, c)| (file(v, p), pick(c) as f64))).collect(),
        );
    }
    let target = |t: &crate::api::TargetSnapshot| {
        format!("{{target=\"{}\",service=\"{}\"}}", t.id, label_value(&t.service_name))
    };
    type TPick = fn(&crate::api::TargetSnapshot) -> u64;
    let target_fields: [(&str, &str, TPick); 11] = [
        ("pipe_writes_total", "write() calls to watched pipes.", |t| t.writes_total),
        ("pipe_written_bytes_total", "Bytes written to watched pipes.", |t| t.written_bytes_total),
        ("pipe_truncated_bytes_total", "Bytes past max_write_capture.", |t| t.truncated_bytes_total),
        ("pipe_lost_events_total", "Events the BPF ring buffer had no room for.", |t| t.lost_events_total),
        ("pipe_lost_bytes_total", "Bytes the BPF ring buffer had no room for.", |t| t.lost_bytes_total),
        ("pipe_captured_records_total", "Records captured from pipes.", |t| t.totals.captured_records_total),
        ("pipe_dropped_records_total", "Pipe records dropped by the ring.", |t| t.totals.dropped_records_total),
        ("pipe_captured_bytes_total", "Bytes captured from pipes.", |t| t.totals.captured_bytes_total),
        ("pipe_dropped_bytes_total", "Pipe bytes dropped by the ring.", |t| t.totals.dropped_bytes_total),
        ("pipe_split_records_total", "Pipe records that are pieces of over-long lines.", |t| {
            t.totals.split_records_total
        }),
        ("pipe_other_pipe_bytes_total", "Bytes written to pipes that are not the target's output.", |t| {
            t.other_pipe_bytes_total
        }),
    ];
    for (name, help, pick) in target_fields {
        // Ended targets are in the JSON stats only: the series of short runs would pile up.
        let live = s.pipes.targets.iter().filter(|t| !t.ended);
        metric(name, "counter", help, live.map(|t| (target(t), pick(t) as f64)).collect());
    }
    // A series without labels.
    let one = |v: f64| vec![(String::new(), v)];
    if let Some(c) = &s.pipes.containers {
        type CPick = fn(&crate::api::ContainersSnapshot) -> u64;
        let fields: [(&str, &str, &str, CPick); 8] = [
            ("containers_unclassified_written_bytes_total", "counter", "Bytes from cgroups not yet told apart.", |c| {
                c.unclassified_written_bytes_total
            }),
            ("containers_ignored_bytes_total", "counter", "Bytes of cgroups that are no container (skipped).", |c| {
                c.ignored_bytes_total
            }),
            (
                "containers_unresolved_bytes_total",
                "counter",
                "Bytes of cgroups removed before being told apart (lost).",
                |c| c.unresolved_bytes_total,
            ),
            (
                "containers_lost_bytes_total",
                "counter",
                "Unclassified bytes the BPF ring buffer had no room for.",
                |c| c.lost_bytes_total,
            ),
            ("containers_held_records", "gauge", "Records waiting for the runtime to name their container.", |c| {
                c.held_records
            }),
            ("containers_unidentified_records_total", "counter", "Records sent with the container id only.", |c| {
                c.unidentified_records_total
            }),
            ("containers_opted_out_records_total", "counter", "Records of opted-out containers discarded.", |c| {
                c.opted_out_records_total
            }),
            ("containers_excluded_cgroups", "gauge", "cgroups the kernel skips.", |c| c.excluded_cgroups),
        ];
        for (name, kind, help, pick) in fields {
            metric(name, kind, help, one(pick(c) as f64));
        }
    }
    if let Some(d) = &s.discovery {
        let up = f64::from(u8::from(d.runtime.status == "connected"));
        metric("discovery_connected", "gauge", "Whether the container runtime's API answers.", one(up));
        let reconnects = d.runtime.reconnects_total as f64;
        metric("discovery_reconnects_total", "counter", "Connections to the runtime lost.", one(reconnects));
        let live = d.containers.iter().filter(|c| c.info.state != "removed");
        let container = |c: &crate::api::ContainerSnapshot| {
            format!("{{container=\"{}\",service=\"{}\"}}", label_value(&c.info.name), label_value(&c.info.service))
        };
        type CPick = fn(&crate::api::ContainerSnapshot) -> u64;
        let fields: [(&str, &str, CPick); 7] = [
            ("container_pipe_captured_records_total", "stdout/stderr records per container.", |c| {
                c.pipe.captured_records_total
            }),
            ("container_lost_bytes_total", "Bytes of a container's output not delivered.", |c| c.lost_bytes_total),
            ("container_other_pipe_bytes_total", "Bytes written to pipes that are not output.", |c| {
                c.other_pipe_bytes_total
            }),
            ("container_written_bytes_total", "Bytes written to a container's stdout/stderr pipes.", |c| {
                c.written_bytes_total
            }),
            ("container_kernel_lost_bytes_total", "stdout/stderr bytes the BPF ring buffer had no room for.", |c| {
                c.kernel_lost_bytes_total
            }),
            ("container_truncated_bytes_total", "stdout/stderr bytes past max_write_capture.", |c| {
                c.truncated_bytes_total
            }),
            ("container_dropped_bytes_total", "Bytes of a container's records the ring dropped.", |c| {
                c.dropped_bytes_total
            }),
        ];
        for (name, help, pick) in fields {
            metric(name, "counter", help, live.clone().map(|c| (container(c), pick(c) as f64)).collect());
        }
    }
    type RPick = fn(&crate::api::RingSnapshot) -> u64;
    let ring_fields: [(&str, &str, &str, RPick); 7] = [
        ("ring_capacity_bytes", "gauge", "Ring capacity.", |r| r.capacity_bytes),
        ("ring_used_bytes", "gauge", "Ring bytes in use.", |r| r.used_bytes),
        ("ring_records", "gauge", "Records in the ring.", |r| r.records),
        ("ring_pushed_records_total", "counter", "Records pushed into the ring.", |r| r.pushed_records_total),
        ("ring_dropped_records_total", "counter", "Records dropped by the ring.", |r| r.dropped_records_total),
        ("ring_dropped_bytes_total", "counter", "Bytes dropped by the ring.", |r| r.dropped_bytes_total),
        ("ring_blocked_pushes_total", "counter", "Pushes that waited for room (block policy).", |r| {
            r.blocked_pushes_total
        }),
    ];
    for (name, kind, help, pick) in ring_fields {
        metric(name, kind, help, one(pick(&s.ring) as f64));
    }
    let reader = |n: &str| format!("{{sink=\"{}\"}}", label_value(n));
    type RdPick = fn(&crate::api::ReaderSnapshot) -> u64;
    let reader_fields: [(&str, &str, &str, RdPick); 4] = [
        ("ring_reader_lag_records", "gauge", "Records pushed and not yet handed to the sink.", |r| r.lag_records),
        ("ring_reader_in_flight_records", "gauge", "Records handed to the sink, not acknowledged.", |r| {
            r.in_flight_records
        }),
        ("ring_reader_dropped_records_total", "counter", "Records the sink missed (dropped or skipped).", |r| {
            r.dropped_records_total
        }),
        ("ring_reader_dropped_bytes_total", "counter", "Bytes the sink missed (dropped or skipped).", |r| {
            r.dropped_bytes_total
        }),
    ];
    for (name, kind, help, pick) in reader_fields {
        metric(name, kind, help, s.ring.readers.iter().map(|r| (reader(&r.name), pick(r) as f64)).collect());
    }
    let sink = |n: &str| format!("{{sink=\"{}\"}}", label_value(n));
    type SPick = fn(&SinkSnapshot) -> u64;
    let sink_fields: [(&str, &str, &str, SPick); 8] = [
        ("sink_delivered_records_total", "counter", "Records delivered.", |k| k.delivered_records_total),
        ("sink_delivered_bytes_total", "counter", "Bytes delivered.", |k| k.delivered_bytes_total),
        ("sink_errors_total", "counter", "Failed delivery attempts (each retried).", |k| k.errors_total),
        ("sink_in_flight_records", "gauge", "Records sent and not yet acknowledged.", |k| k.in_flight_records),
        ("sink_retried_records_total", "counter", "Records offered again after a failure.", |k| {
            k.retried_records_total
        }),
        ("sink_rejected_records_total", "counter", "Records the destination refused for good (dropped).", |k| {
            k.rejected_records_total
        }),
        ("sink_rejected_bytes_total", "counter", "Bytes the destination refused for good (dropped).", |k| {
            k.rejected_bytes_total
        }),
        ("sink_split_records_total", "counter", "Records sent as several messages.", |k| k.split_records_total),
    ];
    for (name, kind, help, pick) in sink_fields {
        metric(name, kind, help, s.sinks.iter().map(|k| (sink(&k.name), pick(k) as f64)).collect());
    }
    metric(
        "sink_errors_by_kind_total",
        "counter",
        "Errors the destination reported, by kind.",
        s.sinks
            .iter()
            .flat_map(|k| {
                k.errors_by_kind.iter().map(|(kind, n)| {
                    (format!("{{sink=\"{}\",kind=\"{}\"}}", label_value(&k.name), label_value(kind)), *n as f64)
                })
            })
            .collect(),
    );
    let topic =
        |k: &SinkSnapshot, t: &str| format!("{{sink=\"{}\",topic=\"{}\"}}", label_value(&k.name), label_value(t));
    type DPick = fn(&DeliveredSnapshot) -> u64;
    let topic_fields: [(&str, &str, DPick); 2] = [
        ("sink_topic_delivered_records_total", "Records delivered per topic.", |d| d.delivered_records_total),
        ("sink_topic_delivered_bytes_total", "Bytes delivered per topic.", |d| d.delivered_bytes_total),
    ];
    for (name, help, pick) in topic_fields {
        let rows = s.sinks.iter().flat_map(|k| k.topics.iter().map(move |(t, d)| (topic(k, t), pick(d) as f64)));
        metric(name, "counter", help, rows.collect());
    }
    let mut rows = Vec::new();
    for k in &s.sinks {
        for (q, v) in [("0.5", k.latency.p50_seconds), ("0.9", k.latency.p90_seconds), ("0.99", k.latency.p99_seconds)]
        {
            rows.push((format!("{{sink=\"{}\",quantile=\"{q}\"}}", label_value(&k.name)), v));
        }
    }
    metric("sink_latency_seconds", "summary", "Capture-to-delivery latency.", rows);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use super::*;
    use crate::sources::volume::Framing;

    #[test]
    fn prometheus_text_has_labels_escaped() {
        let ring = Arc::new(Ring::new(1024, crate::ring::Policy::DropOldest, Duration::from_secs(1)));
        let framing = Framing { host: "h".into(), max_record_bytes: 100, partial_flush: Duration::from_secs(1) };
        let volumes = VolumeSource::new(framing.clone(), ring.clone(), None);
        let pipes = PipeSource::new(framing, ring.clone(), 100, "disabled", None);
        let sink = Arc::new(SinkCounters::new("out\"x", "stdout"));
        sink.delivered_records.fetch_add(3, Relaxed);
        let report = Report::new("h".into(), ring, vec![sink], volumes, pipes, None);
        let text = prometheus(&report.snapshot());
        assert!(text.contains("logtap_sink_delivered_records_total{sink=\"out\\\"x\"} 3"), "{text}");
        assert!(text.contains("# TYPE logtap_ring_capacity_bytes gauge"));
    }

    /// Every counter the JSON stats show has its Prometheus series: the tables cannot drift
    /// from the documents.
    #[test]
    fn every_json_counter_has_a_series() {
        let ring = Arc::new(Ring::new(1024, crate::ring::Policy::DropOldest, Duration::from_secs(1)));
        let framing = Framing { host: "h".into(), max_record_bytes: 100, partial_flush: Duration::from_secs(1) };
        let volumes = VolumeSource::new(framing.clone(), ring.clone(), None);
        let pipes = PipeSource::new(framing, ring.clone(), 100, "disabled", None);
        let sink = Arc::new(SinkCounters::new("s", "stdout"));
        ring.add_reader("s", false);
        let report = Report::new("h".into(), ring, vec![sink.clone()], volumes, pipes, None);
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
