//! The Kafka sink end to end: the real agent, a real Kafka-protocol broker (tansu) on
//! 127.0.0.1, and an independent consumer reading back what arrived.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logtap_e2e::broker::{consume, tail, Broker, Consumed};
use logtap_e2e::{as_strings, every_10ms, numbered, Agent, Setup, Sink};

fn kafka(broker: &Broker, settings: &str) -> Sink {
    Sink::Kafka { brokers: broker.address(), settings: format!("topic = \"logs.{{module}}\"\n{settings}") }
}

fn write_lines(path: &Path, lines: &[String]) {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open volume file");
    let mut w = std::io::BufWriter::with_capacity(64 << 10, f);
    for l in lines {
        writeln!(w, "{l}").expect("write");
    }
    w.flush().expect("flush");
}

/// Writes `lines` at about `per_second`, in chunks, through one open file.
fn write_paced(path: &Path, lines: &[String], per_second: usize) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open volume file");
    let chunks: Vec<&[String]> = lines.chunks((per_second / 100).max(1)).collect();
    every_10ms(chunks.len(), |i| {
        let mut buf = Vec::new();
        for l in chunks[i] {
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        f.write_all(&buf).expect("write");
    });
}

fn values(got: &[Consumed]) -> Vec<String> {
    as_strings(&got.iter().map(|m| m.value.clone()).collect::<Vec<_>>())
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// What the consumer saw against what was written: (missing, duplicates).
fn compare(written: &[String], got: &[String]) -> (usize, usize) {
    let seen: HashSet<&String> = got.iter().collect();
    let missing = written.iter().filter(|l| !seen.contains(l)).count();
    (missing, got.len() - seen.len())
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_million_lines_arrive_counted_and_in_order_per_key() {
    let broker = Broker::start();
    let modules = ["m0", "m1", "m2", "m3"];
    for m in modules {
        broker.create_topic(&format!("logs.{m}"), 3);
    }
    let agent = Agent::start(Setup {
        sink: kafka(&broker, ""),
        policy: "block".into(),
        block_timeout: "120s".into(),
        ..Setup::default()
    });
    let vol = agent.volume("big");
    let per = 250_000;
    let written: BTreeMap<&str, Vec<String>> =
        modules.iter().map(|m| (*m, numbered(&format!("{m}-"), per, 40))).collect();
    std::thread::scope(|s| {
        for (m, lines) in &written {
            let path = vol.join(format!("{m}.log"));
            s.spawn(move || write_lines(&path, lines));
        }
    });
    let k = agent.wait_delivered("kafka", 4 * per as u64, Duration::from_secs(240));
    assert_eq!(u(&k["delivered_records_total"]), 4 * per as u64, "{k}");

    for (m, lines) in &written {
        let got = consume(&broker.address(), &format!("logs.{m}"), per, Duration::from_secs(10));
        // One key per file, so one partition, in write order: exactly what was written.
        let keys: HashSet<&[u8]> = got.iter().map(|c| c.key.as_slice()).collect();
        assert_eq!(keys, HashSet::from([format!("big/{m}").as_bytes()]));
        assert_eq!(got.iter().map(|c| c.partition).collect::<HashSet<_>>().len(), 1);
        assert_eq!(got[0].headers.get("path").map(String::as_str), Some(format!("{m}.log").as_str()));
        let got = values(&got);
        assert_eq!(got.len(), lines.len(), "{m}: count");
        assert!(got == *lines, "{m}: content and order");
    }
    let s = agent.stats();
    assert_eq!(u(&s["ring"]["dropped_records_total"]), 0);
    let topics = &agent.sink_stats("kafka")["topics"];
    assert_eq!(u(&topics["logs.m0"]["delivered_records_total"]), per as u64, "{topics}");
}

/// What a broker crash did, line by line.
struct Crash {
    written: Vec<String>,
    /// Everything the consumers saw, before the kill and after the restart.
    got: Vec<String>,
    /// Lines [consumed, acked) were acknowledged by the broker but not yet read when it was
    /// killed: its memory storage lost them with it, whatever the agent did.
    consumed: usize,
    acked: usize,
    /// From the broker answering again (its topic made anew) to the first delivery after.
    resumed_after: Duration,
    agent: Agent,
}

impl Crash {
    /// Lines missing outside the broker's own loss window: what the agent lost.
    fn missing_outside_window(&self) -> usize {
        let seen: HashSet<&String> = self.got.iter().collect();
        self.written
            .iter()
            .enumerate()
            .filter(|(i, l)| !(self.consumed..self.acked).contains(i) && !seen.contains(l))
            .count()
    }
}

/// Writes one stream while the broker is killed (SIGKILL) and restarted empty; a consumer
/// reads all along until the kill, another one everything after the restart. `settings` are
/// more lines of the Kafka sink's table.
fn through_a_broker_crash(policy: &str, ring: &str, lines: usize, settings: &str) -> Crash {
    let mut broker = Broker::start();
    broker.create_topic("logs.app", 1);
    let agent = Agent::start(Setup {
        sink: kafka(&broker, settings),
        policy: policy.into(),
        ring_capacity: ring.into(),
        max_record_bytes: "4KiB".into(),
        block_timeout: "120s".into(),
        ..Setup::default()
    });
    let vol = agent.volume("crash");
    let written = numbered("c-", lines, 100);
    let stop = Arc::new(AtomicBool::new(false));
    let before = tail(broker.address(), "logs.app".into(), stop.clone());
    let (consumed, resumed_after) = std::thread::scope(|s| {
        let path = vol.join("app.log");
        let w = &written;
        let writer = s.spawn(move || write_paced(&path, w, lines / 6));
        std::thread::sleep(Duration::from_secs(2));
        broker.kill();
        stop.store(true, Ordering::Relaxed);
        let before = before.join().expect("consumer");
        std::thread::sleep(Duration::from_millis(3300));
        broker.restart();
        broker.create_topic("logs.app", 1);
        let back = Instant::now();
        let delivered = || u(&agent.sink_stats("kafka")["delivered_records_total"]);
        let at_restart = delivered();
        while delivered() == at_restart && back.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let resumed_after = back.elapsed();
        writer.join().expect("writer");
        (values(&before), resumed_after)
    });
    std::fs::File::open(vol.join("app.log")).and_then(|f| f.sync_all()).expect("fsync");
    agent.wait_idle(Duration::from_secs(120));
    let after = values(&consume(&broker.address(), "logs.app", usize::MAX, Duration::from_secs(5)));
    // What the broker acknowledged before it died: every delivery the sink counted, less what
    // the restarted broker holds. A counter read right after the kill would miss records
    // acknowledged in a batch whose other messages were still failing (a batch is counted when
    // all its reports are in, up to delivery_timeout later): such a line was lost by the
    // broker, not by the agent. One partition, in order: the acknowledged lines are a prefix.
    let acked = (u(&agent.sink_stats("kafka")["delivered_records_total"]) as usize).saturating_sub(after.len());
    let first_gap = consumed.iter().zip(&written).position(|(c, w)| c != w);
    assert_eq!(first_gap, None, "before the kill the consumer saw a prefix of what was written, in order");
    let n = consumed.len();
    Crash { written, got: consumed.into_iter().chain(after).collect(), consumed: n, acked, resumed_after, agent }
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn with_block_a_broker_crash_loses_no_line() {
    let c = through_a_broker_crash("block", "64MiB", 120_000, "delivery_timeout = \"3s\"\n");
    let (missing, duplicates) = compare(&c.written, &c.got);
    let k = c.agent.sink_stats("kafka");
    eprintln!(
        "broker crash, block: {} written, {} consumed, {missing} missing, of which {} acknowledged by the broker \
         before it died (its memory storage lost them), {duplicates} duplicates (at-least-once); \
         sink retried {} records, errors {}",
        c.written.len(),
        c.got.len(),
        missing - c.missing_outside_window(),
        k["retried_records_total"],
        k["errors_by_kind"]
    );
    assert_eq!(c.missing_outside_window(), 0, "nothing the broker did not acknowledge is lost");
    assert!(u(&k["errors_total"]) > 0, "the outage was seen: {k}");
    assert_eq!(u(&c.agent.stats()["ring"]["dropped_records_total"]), 0);
}

/// `drop_oldest` with a ring too small for the outage: a volume's lines wait in their file (its
/// memory budget holds the outage), so the ring drops nothing and nothing the broker did not
/// acknowledge is lost. (Ring drops are counted exactly: `agent::drop_oldest_counts_...`.)
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn with_drop_oldest_a_volume_rides_out_the_outage_in_its_file() {
    let c = through_a_broker_crash("drop_oldest", "2MiB", 120_000, "delivery_timeout = \"3s\"\n");
    let (missing, duplicates) = compare(&c.written, &c.got);
    let dropped = u(&c.agent.reader_stats("kafka")["dropped_records_total"]);
    let volume_dropped = u(&c.agent.volume_stats("crash")["dropped_bytes_total"]);
    eprintln!(
        "broker crash, drop_oldest: {} written, {} consumed, {missing} missing ({} lost with the broker's \
         memory), {duplicates} duplicates; stats: {dropped} dropped",
        c.written.len(),
        c.got.len(),
        missing - c.missing_outside_window(),
    );
    assert_eq!((dropped, volume_dropped), (0, 0), "the ring and the volume dropped nothing");
    assert_eq!(c.missing_outside_window(), 0, "nothing the broker did not acknowledge is lost");
}

/// A broker restarted without its state no longer knows the producer's id and sequence
/// numbers: the sink must start a new producer at once, not after delivery timeouts (three
/// of the default 30 s, before the fix).
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn after_a_broker_restart_that_lost_the_producers_state_delivery_resumes_at_once() {
    let c = through_a_broker_crash("block", "64MiB", 60_000, "");
    let (missing, _) = compare(&c.written, &c.got);
    let k = c.agent.sink_stats("kafka");
    eprintln!(
        "resumed {:?} after the broker came back; {missing} missing ({} lost with the broker's memory); errors {}",
        c.resumed_after,
        missing - c.missing_outside_window(),
        k["errors_by_kind"]
    );
    assert!(
        c.resumed_after < Duration::from_secs(5),
        "delivery resumed {:?} after the broker came back",
        c.resumed_after
    );
    assert_eq!(c.missing_outside_window(), 0, "nothing the broker did not acknowledge is lost");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn kafka_and_files_sinks_both_get_everything() {
    let broker = Broker::start();
    broker.create_topic("logs.app", 2);
    let agent = Agent::start(Setup {
        extra: format!(
            "[sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"logs.{{module}}\"\nformat = \"json\"\n",
            broker.address()
        ),
        ..Setup::default()
    });
    let vol = agent.volume("both");
    let written = numbered("b-", 20_000, 80);
    write_lines(&vol.join("app.log"), &written);
    assert_eq!(as_strings(&agent.wait_lines("both", "app", written.len(), Duration::from_secs(30))), written);
    agent.wait_delivered("kafka", written.len() as u64, Duration::from_secs(30));
    let got = consume(&broker.address(), "logs.app", written.len(), Duration::from_secs(5));
    let messages: Vec<String> = got
        .iter()
        .map(|c| {
            let v: serde_json::Value = serde_json::from_slice(&c.value).expect("json value");
            assert_eq!(v["volume"], "both");
            v["message"].as_str().expect("message").to_string()
        })
        .collect();
    assert_eq!(messages, written);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn an_optional_kafka_sink_on_a_hung_broker_holds_nobody_back_and_counts_what_it_skipped() {
    let broker = Broker::start();
    broker.create_topic("logs.app", 1);
    let agent = Agent::start(Setup {
        ring_capacity: "256KiB".into(),
        max_record_bytes: "4KiB".into(),
        policy: "block".into(),
        block_timeout: "60s".into(),
        extra: format!(
            "[sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"logs.app\"\noptional = true\n",
            broker.address()
        ),
        ..Setup::default()
    });
    let vol = agent.volume("opt");
    // Delivered before the broker hangs: the sink is connected.
    write_lines(&vol.join("app.log"), &numbered("warm-", 10, 50));
    agent.wait_delivered("kafka", 10, Duration::from_secs(30));
    broker.pause(true);
    let written = numbered("o-", 20_000, 100); // 2 MB through a 256 KiB ring
    let started = Instant::now();
    write_lines(&vol.join("app.log"), &written);
    let files = agent.wait_lines("opt", "app", 10 + written.len(), Duration::from_secs(30));
    assert_eq!(files.len(), 10 + written.len(), "the files sink got everything");
    assert!(started.elapsed() < Duration::from_secs(30), "writers were not held by the hung broker");
    let skipped = u(&agent.reader_stats("kafka")["dropped_records_total"]);
    assert!(skipped > 0);
    assert_eq!(u(&agent.stats()["ring"]["dropped_records_total"]), 0, "nothing lost to the pipeline");

    broker.pause(false);
    agent.wait_idle(Duration::from_secs(120));
    let got = values(&consume(&broker.address(), "logs.app", usize::MAX, Duration::from_secs(5)));
    let got: Vec<&String> = got.iter().filter(|l| l.starts_with("o-")).collect();
    let (_, duplicates) = compare(&written, &got.iter().map(|s| (*s).clone()).collect::<Vec<_>>());
    assert_eq!(duplicates, 0);
    assert_eq!(got.len() as u64 + skipped, written.len() as u64, "delivered + skipped = written, exactly");
    // What it got is in order.
    let mut last = None;
    for l in got {
        assert!(last.is_none_or(|p: &String| p < l), "out of order: {l}");
        last = Some(l);
    }
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_stalled_required_files_sink_holds_the_ring_and_kafka_waits_with_it_then_both_catch_up() {
    let broker = Broker::start();
    broker.create_topic("logs.app", 1);
    let mut agent = Agent::start(Setup {
        ring_capacity: "256KiB".into(),
        max_record_bytes: "4KiB".into(),
        policy: "block".into(),
        block_timeout: "60s".into(),
        extra: format!("[sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"logs.app\"\n", broker.address()),
        // The stall must not end a line held half-written behind it as a partial record.
        partial_flush: "30s".into(),
        ..Setup::default()
    });
    // The files sink cannot create its service directory: a file is in the way.
    std::fs::create_dir_all(&agent.out).expect("out dir");
    let blocker = agent.out.join("stall");
    std::fs::write(&blocker, b"").expect("blocker");
    let vol = agent.volume("stall");
    let written = numbered("s-", 10_000, 100); // 1 MB through a 256 KiB ring
    let writer = {
        let path = vol.join("app.log");
        let w = written.clone();
        std::thread::spawn(move || write_lines(&path, &w))
    };
    std::thread::sleep(Duration::from_secs(3));
    assert!(writer.is_finished(), "the writer does not wait for the stalled sink");
    let v = agent.volume_stats("stall");
    assert!(u(&v["memory_bytes"]) > 0, "its lines wait in the file: {v}");
    let kafka_so_far = u(&agent.sink_stats("kafka")["delivered_records_total"]);
    assert!(kafka_so_far < written.len() as u64, "kafka cannot run ahead of the ring");
    assert!(u(&agent.sink_stats("files")["errors_total"]) > 0);

    std::fs::remove_file(&blocker).expect("unblock");
    writer.join().expect("writer");
    agent.wait_idle(Duration::from_secs(60));
    // The ring going idle is not the end: lines may still wait in the volume's file.
    let got = agent.wait_lines("stall", "app", written.len(), Duration::from_secs(60));
    logtap_e2e::assert_lines(&as_strings(&got), &written, "files sink");
    let got = values(&consume(&broker.address(), "logs.app", written.len(), Duration::from_secs(5)));
    assert_eq!(got, written);
    assert_eq!(u(&agent.stats()["ring"]["dropped_records_total"]), 0);
    assert!(agent.stop().success());
}
