//! The Kafka sink against librdkafka's in-process mock cluster: what reaches the broker, and
//! what the sink makes of each kind of failure.

use std::time::Instant;

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::*;
use crate::counters::StreamCounters;
use crate::record::tests::origin;
use crate::values::{ByteSize, Dur};

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn cluster(topic: &str, partitions: i32) -> Cluster {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(topic, partitions, 1).unwrap();
    cluster
}

fn config(cluster: &Cluster) -> KafkaSinkConfig {
    KafkaSinkConfig {
        brokers: vec![cluster.bootstrap_servers()],
        delivery_timeout: Dur(Duration::from_secs(2)),
        ..KafkaSinkConfig::default()
    }
}

fn sink(config: &KafkaSinkConfig) -> (KafkaSink, Arc<SinkCounters>) {
    let counters = Arc::new(SinkCounters::new("kafka", "kafka"));
    (KafkaSink::new(config, "h", counters.clone()).unwrap(), counters)
}

fn records(origin: &Arc<Origin>, lines: &[&[u8]]) -> Vec<Record> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| Record {
            captured_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + i as u64),
            origin: origin.clone(),
            seq: i as u64,
            bytes: Bytes::copy_from_slice(l),
            split: false,
            unterminated: false,
        })
        .collect()
}

fn deliver(sink: &mut KafkaSink, records: &[Record]) -> Result<(), DeliveryError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let outgoing: Vec<Outgoing> = records.iter().cloned().map(Outgoing::clear).collect();
        tokio::time::timeout(Duration::from_secs(30), sink.deliver(&outgoing)).await.expect("delivery never resolved")
    })
}

/// Every message of `topic` from the beginning, in order within each partition.
fn consume(cluster: &Cluster, topic: &str, expected: usize) -> Vec<(Vec<u8>, Vec<u8>, i32)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = Instant::now();
    // Until `expected` arrived, or nothing more for a second (to see extra messages too).
    while got.len() < expected
        && Instant::now() < deadline
        && (got.is_empty() || last.elapsed() < Duration::from_secs(1))
    {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            last = Instant::now();
            let m: BorrowedMessage = m.unwrap();
            got.push((m.key().unwrap_or_default().to_vec(), m.payload().unwrap_or_default().to_vec(), m.partition()));
        }
    }
    got
}

fn header(m: &BorrowedMessage, key: &str) -> Option<String> {
    header_value(m.headers()?, key)
}

fn header_value(h: &impl Headers, key: &str) -> Option<String> {
    h.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

#[test]
fn delivers_in_order_with_topic_key_and_headers() {
    let cluster = cluster("logs.svc", 3);
    let (mut sink, counters) = sink(&config(&cluster));
    let a = origin("a.log");
    let lines: Vec<Vec<u8>> = (0..100).map(|i| format!("line {i}").into_bytes()).collect();
    let mut batch = records(&a, &lines.iter().map(Vec::as_slice).collect::<Vec<_>>());
    batch.push(records(&a, &[&[0xff, 0x00, b'x']])[0].clone());
    deliver(&mut sink, &batch).unwrap();

    let got = consume(&cluster, "logs.svc", 101);
    assert_eq!(got.len(), 101);
    // One key, so one partition, in order; raw values, binary bytes unchanged.
    assert!(got.iter().all(|(k, _, p)| k == b"v/app" && *p == got[0].2));
    let values: Vec<&[u8]> = got.iter().map(|(_, v, _)| v.as_slice()).collect();
    assert_eq!(&values[..100], lines.iter().map(Vec::as_slice).collect::<Vec<_>>().as_slice());
    assert_eq!(values[100], [0xff, 0x00, b'x']);
    let topics = counters.snapshot().topics;
    assert_eq!(topics["logs.svc"].delivered_records_total, 101);

    // Headers and the timestamp.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "h")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("logs.svc", got[0].2, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let m = loop {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            break m.unwrap();
        }
    };
    assert_eq!(header(&m, "service").as_deref(), Some("svc"));
    assert_eq!(header(&m, "module").as_deref(), Some("app"));
    assert_eq!(header(&m, "volume").as_deref(), Some("v"));
    assert_eq!(header(&m, "path").as_deref(), Some("a.log"));
    assert_eq!(header(&m, "host").as_deref(), Some("h"));
    assert_eq!(m.timestamp().to_millis(), Some(1_700_000_000_000));
}

#[test]
fn json_values_are_lossless_and_long_records_are_split_to_fit() {
    let cluster = cluster("logs.svc", 1);
    let mut c = config(&cluster);
    c.format = Format::Json;
    c.max_message_bytes = ByteSize(1024);
    let (mut sink, counters) = sink(&c);
    let long: String = "é\"\t".repeat(900); // escaping makes the envelope much longer than the line
    let binary: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    deliver(&mut sink, &records(&origin("a.log"), &[b"short", long.as_bytes(), &binary])).unwrap();

    let got = consume(&cluster, "logs.svc", usize::MAX);
    assert!(got.iter().all(|(_, v, _)| v.len() <= 1024), "every message within the limit");
    let envelopes: Vec<serde_json::Value> = got.iter().map(|(_, v, _)| serde_json::from_slice(v).unwrap()).collect();
    assert_eq!(envelopes[0]["message"], "short");
    let mut text = String::new();
    let mut raw = Vec::new();
    for e in &envelopes[1..] {
        assert_eq!(e["split"], true);
        match (e["seq"].as_u64(), e.get("message")) {
            (Some(1), Some(m)) => text.push_str(m.as_str().unwrap()),
            (Some(2), None) => {
                use base64::Engine;
                raw.extend(
                    base64::engine::general_purpose::STANDARD.decode(e["message_base64"].as_str().unwrap()).unwrap(),
                )
            }
            other => panic!("unexpected part {other:?}"),
        }
    }
    assert_eq!(text, long, "UTF-8 is cut at character boundaries and reassembles");
    assert_eq!(raw, binary);
    assert_eq!(counters.split_records.load(Ordering::Relaxed), 2);
}

#[test]
fn raw_parts_carry_their_number() {
    let cluster = cluster("logs.svc", 1);
    let mut c = config(&cluster);
    c.max_message_bytes = ByteSize(1024);
    let (mut sink, _) = sink(&c);
    let line = vec![b'x'; 2500];
    deliver(&mut sink, &records(&origin("a.log"), &[&line])).unwrap();
    let got = consume(&cluster, "logs.svc", 3);
    assert_eq!(got.iter().map(|(_, v, _)| v.len()).collect::<Vec<_>>(), vec![834, 834, 832]);
}

#[test]
fn a_broker_that_is_down_leaves_records_to_retry_until_it_is_back() {
    let cluster = cluster("logs.svc", 1);
    let (mut sink, counters) = sink(&config(&cluster));
    cluster.broker_down(1).unwrap();
    let batch = records(&origin("a.log"), &[b"one", b"two"]);
    let started = Instant::now();
    let e = deliver(&mut sink, &batch).unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(1), "librdkafka tried until delivery_timeout");
    assert_eq!(e.outcomes, vec![Outcome::Retry, Outcome::Retry]);
    assert!(counters.snapshot().errors_by_kind.contains_key("MessageTimedOut"), "{:?}", counters.snapshot());
    cluster.broker_up(1).unwrap();
    deliver(&mut sink, &batch).unwrap();
    assert_eq!(consume(&cluster, "logs.svc", 2).len(), 2);
}

#[test]
fn an_unknown_topic_is_retried_not_dropped() {
    let cluster = cluster("logs.svc", 1);
    let mut c = config(&cluster);
    c.topic = Template::parse("logs.{module}").unwrap();
    // A broker that does not create topics on demand.
    c.options.insert("allow.auto.create.topics".into(), "false".into());
    let (mut sink, counters) = sink(&c);
    cluster.topic_error("logs.app", RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART).unwrap();
    let batch = records(&origin("a.log"), &[b"one"]);
    let e = deliver(&mut sink, &batch).unwrap_err();
    assert_eq!(e.outcomes, vec![Outcome::Retry]);
    let kinds = counters.snapshot().errors_by_kind;
    assert!(kinds.keys().any(|k| k.contains("Unknown") || k.contains("TimedOut")), "{kinds:?}");
    // The topic appears: the retry goes through.
    cluster.topic_error("logs.app", RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    deliver(&mut sink, &batch).unwrap();
    assert_eq!(consume(&cluster, "logs.app", 1).len(), 1);
}

#[test]
fn a_message_the_broker_finds_too_large_is_rejected_not_retried() {
    let cluster = cluster("logs.svc", 1);
    let (mut sink, counters) = sink(&config(&cluster));
    cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
    let e = deliver(&mut sink, &records(&origin("a.log"), &[b"too big for this broker"])).unwrap_err();
    assert_eq!(e.outcomes, vec![Outcome::Rejected]);
    assert_eq!(counters.snapshot().errors_by_kind.get("MessageSizeTooLarge"), Some(&1));
    // The next record is not held up.
    deliver(&mut sink, &records(&origin("a.log"), &[b"fits"])).unwrap();
    let got = consume(&cluster, "logs.svc", 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"fits");
}

#[test]
fn retriable_broker_errors_are_retried_inside_the_producer_without_duplicates() {
    let cluster = cluster("logs.svc", 1);
    let (mut sink, _) = sink(&config(&cluster));
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let lines: Vec<Vec<u8>> = (0..50).map(|i| format!("{i}").into_bytes()).collect();
    deliver(&mut sink, &records(&origin("a.log"), &lines.iter().map(Vec::as_slice).collect::<Vec<_>>())).unwrap();
    let got = consume(&cluster, "logs.svc", usize::MAX);
    assert_eq!(got.into_iter().map(|(_, v, _)| v).collect::<Vec<_>>(), lines, "each once, in order");
}

#[test]
fn a_fatal_producer_error_gets_a_new_producer() {
    let cluster = cluster("logs.svc", 1);
    let (mut sink, counters) = sink(&config(&cluster));
    deliver(&mut sink, &records(&origin("a.log"), &[b"before"])).unwrap();
    let reason = std::ffi::CString::new("test").unwrap();
    // SAFETY: a live producer handle and a valid C string.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            sink.producer.client().native_ptr(),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
    assert!(sink.producer.client().fatal_error().is_some());
    // The error callback runs when the producer is polled.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters.snapshot().errors_by_kind.is_empty() && Instant::now() < deadline {
        sink.producer.poll(Duration::from_millis(10));
    }
    assert!(counters.snapshot().errors_by_kind.contains_key("OutOfOrderSequenceNumber"));
    deliver(&mut sink, &records(&origin("a.log"), &[b"after"])).unwrap();
    let got = consume(&cluster, "logs.svc", 2);
    assert_eq!(got.into_iter().map(|(_, v, _)| v).collect::<Vec<_>>(), vec![b"before".to_vec(), b"after".to_vec()]);
}

#[test]
fn templates_render_and_topics_are_sanitised() {
    let o = Origin {
        host: "node-1".into(),
        pid: 42,
        volume: "".into(),
        service: "web shop/ü".into(),
        module: "stdout".into(),
        path: "stdout".into(),
        tenant: "".into(),
        container: None,
        counters: StreamCounters::detached(),
    };
    assert_eq!(topic_name(&Template::parse("logs.{service}").unwrap(), &o), "logs.web_shop__");
    assert_eq!(topic_name(&Template::parse("{volume}").unwrap(), &o), "_");
    assert_eq!(
        topic_name(&Template::parse("x{service}").unwrap(), &Origin { service: "y".repeat(400).into(), ..o }).len(),
        249
    );
    let o = Origin {
        host: "h".into(),
        pid: 42,
        volume: "".into(),
        service: "s".into(),
        module: "m".into(),
        path: "stdout".into(),
        tenant: "".into(),
        container: None,
        counters: StreamCounters::detached(),
    };
    let mut key = String::new();
    render(&Template::parse("{host}:{pid}/{path} {{x}}").unwrap(), &o, &mut key);
    assert_eq!(key, "h:42/stdout {x}");
    assert!(Template::parse("{nope}").unwrap_err().contains("unknown field {nope}"));
    assert!(Template::parse("a}b").is_err());
}

#[test]
fn bad_settings_are_refused_before_connecting() {
    let bad = |f: fn(&mut KafkaSinkConfig)| {
        let mut c = KafkaSinkConfig::default();
        f(&mut c);
        check(&c).unwrap_err()
    };
    assert!(bad(|c| c.brokers.clear()).contains("brokers"));
    assert!(bad(|c| c.topic = Template::parse("logs/{service}").unwrap()).contains("topic"));
    assert!(bad(|c| c.max_message_bytes = ByteSize(10)).contains("max_message_bytes"));
    let e = bad(|c| {
        c.options.insert("no.such.property".into(), "1".into());
    });
    assert!(e.contains("no.such.property"), "{e}");
    check(&KafkaSinkConfig::default()).unwrap();
}

/// The README's header list: `volume` on volume records, `pid` on pipe records, never a
/// made-up value (a volume's writer is not known: writeback sends its pages from the kernel).
#[test]
fn headers_name_what_each_kind_of_record_has() {
    let keys = |o: &Origin| headers(o).iter().map(|h| h.key.to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&origin("a.log")), ["host", "service", "module", "volume", "path"]);
    let v = origin("x");
    let pipe = Origin {
        host: v.host.clone(),
        pid: 42,
        volume: "".into(),
        service: v.service.clone(),
        module: "stdout".into(),
        path: "stdout".into(),
        tenant: "".into(),
        container: None,
        counters: StreamCounters::detached(),
    };
    assert_eq!(keys(&pipe), ["host", "service", "module", "path", "pid"]);
    assert_eq!(header_value(&headers(&pipe), "pid").as_deref(), Some("42"));
}
