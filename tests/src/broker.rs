//! A real Kafka-protocol broker for the tests: tansu on 127.0.0.1, started and stopped here,
//! and an independent consumer (rdkafka) that reads back what the agent delivered.
//!
//! `$LOGTAP_TANSU`, else `tansu` in cargo's bin directory or on the PATH (`cargo xtask setup`
//! installs it). A missing broker fails the test and says so; it is never skipped.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOGTAP_TANSU") {
        return p.into();
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(p) = cargo_home.map(|h| h.join("bin/tansu")).filter(|p| p.exists()) {
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("tansu")).find(|p| p.exists()));
    on_path.unwrap_or_else(|| {
        panic!(
            "the Kafka-protocol broker tansu is missing: `cargo xtask setup` installs it \
             (cargo install tansu --version 0.6.0 --locked --features dynostore), or set LOGTAP_TANSU"
        )
    })
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A tansu broker with memory storage: a restart starts empty (topics included). Its SQLite
/// storage would survive one, but tansu 0.6 panics in it on the first produce after a restart
/// (tansu-storage lite.rs, "more or less than one row").
pub struct Broker {
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Broker {
        let mut b = Broker { port: free_port(), child: None };
        b.launch();
        b
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let mut cmd = Command::new(tansu_bin());
        // The broker's errors go to $LOGTAP_TANSU_LOG when set (append), else nowhere.
        let log = std::env::var_os("LOGTAP_TANSU_LOG")
            .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok())
            .map_or_else(Stdio::null, Stdio::from);
        let child = cmd
            .args(["broker", "--listener-url", &self.url(), "--advertised-listener-url", &self.url()])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tansu_bin().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("tansu exited at start with {status}");
            }
            assert!(Instant::now() < deadline, "tansu did not listen on {} within 20 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu_bin())
            .args(["topic", "create", "--broker", &self.url(), "--partitions", &partitions.to_string(), name])
            .env("RUST_LOG", "error")
            .output()
            .expect("run tansu topic create");
        assert!(out.status.success(), "tansu topic create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// SIGKILL: the broker dies mid-request, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port (empty).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// SIGSTOP / SIGCONT: a broker that hangs without closing its connections.
    pub fn pause(&self, paused: bool) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, if paused { libc::SIGSTOP } else { libc::SIGCONT }) };
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
    }
}

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// When the consumer had it.
    pub received_at: SystemTime,
}

/// Reads `topic` from the beginning on its own (no consumer group) until `expected` messages
/// arrived or none came for `idle`.
pub fn consume(broker: &str, topic: &str, expected: usize, idle: Duration) -> Vec<Consumed> {
    let mut last = Instant::now();
    read(broker, topic, |got, new| {
        if new {
            last = Instant::now();
        }
        got.len() < expected && last.elapsed() < idle
    })
}

/// Reads `topic` from the beginning until `stop` is set, on a thread.
pub fn tail(broker: String, topic: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Consumed>> {
    std::thread::spawn(move || read(&broker, &topic, |_, _| !stop.load(Ordering::Relaxed)))
}

/// Polls `topic` from the beginning while `more(messages so far, a message just came)`.
fn read(broker: &str, topic: &str, mut more: impl FnMut(&[Consumed], bool) -> bool) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", "logtap-e2e")
        .set("enable.auto.commit", "false")
        // tansu waits half of this per fetch.
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let mut new = false;
    while more(&got, new) {
        new = false;
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                new = true;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                got.push(Consumed {
                    partition: m.partition(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    received_at: SystemTime::now(),
                });
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    got
}
