//! The ring under bursts, floods and rates, as users meet it: the default config absorbs a
//! burst whole, a flood cannot make a quiet source lose a line, and a rate holds.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logtap_e2e::{logtap_bin, Agent, Setup, Sink};
use serde_json::Value;

/// `logtap run --service SERVICE -- PROGRAM ARGS`, to its end; its own output goes nowhere.
fn run(agent: &Agent, service: &str, program: &str, args: &[&str]) -> std::process::Child {
    Command::new(logtap_bin())
        .args(["run", "--service", service, "--socket"])
        .arg(&agent.socket)
        .arg("--")
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("logtap run")
}

fn target(agent: &Agent, service: &str) -> Value {
    let pipes = agent.stats()["pipes"].clone();
    pipes["targets"].as_array().and_then(|t| t.iter().find(|t| t["service"] == service).cloned()).unwrap_or_default()
}

/// Waits until the target of `service` has captured `n` records; returns its stats.
fn captured(agent: &Agent, service: &str, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = target(agent, service);
        if t["captured_records_total"].as_u64().unwrap_or(0) >= n || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `logtap run -- head -n 2000000 yes.txt`: two million 1-byte lines, pushed faster than a
/// sink drains them. With the default config every one arrives.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_burst_of_two_million_short_lines_arrives_whole_with_the_default_config() {
    let agent = Agent::start(Setup::default());
    let n = 2_000_000u64;
    let yes = agent.dir.path().join("yes.txt");
    std::fs::write(&yes, "y\n".repeat(n as usize + 1000)).unwrap();
    // (captured, delivered) while the burst goes through: the sink must not wait for its end.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (socket, stop) = (agent.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new(logtap_bin()).args(["stats", "--json", "--socket"]).arg(&socket).output();
                if let Some(s) = out.ok().and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok()) {
                    let pushed = s["ring"]["pushed_records_total"].as_u64().unwrap_or(0);
                    let delivered = s["sinks"][0]["delivered_records_total"].as_u64().unwrap_or(0);
                    samples.push((pushed, delivered));
                }
            }
            samples
        })
    };
    let status = run(&agent, "yes", "head", &["-n", &n.to_string(), yes.to_str().unwrap()]).wait().unwrap();
    assert!(status.success());
    let t = captured(&agent, "yes", n);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    assert!(
        samples.iter().any(|&(pushed, delivered)| delivered > 0 && pushed < n),
        "the sink delivered while the burst was still being pushed: (pushed, delivered) {:?} ... {:?}",
        &samples[..samples.len().min(5)],
        &samples[samples.len().saturating_sub(5)..]
    );
    assert_eq!(t["captured_records_total"], n, "{t}");
    let lines = agent.wait_lines("yes", "stdout", n as usize, Duration::from_secs(120));
    assert_eq!(lines.len() as u64, n, "delivered = written");
    assert!(lines.iter().all(|l| l == b"y"), "every line as written");
    let stats = agent.stats();
    assert_eq!(stats["ring"]["dropped_records_total"], 0, "{}", stats["ring"]);
    assert_eq!(t["dropped_records_total"], 0);
    assert_eq!(t["lost_bytes_total"], 0, "the BPF ring buffer kept up: {t}");
}

/// Reads the agent's stdout sink slowly while `slow` is set (a sink slower than the flood),
/// then at full speed; returns the JSON records.
fn slow_reader(out: std::process::ChildStdout, slow: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Value>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for (i, line) in BufReader::new(out).lines().map_while(Result::ok).enumerate() {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                got.push(v);
            }
            if i % 200 == 199 && slow.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        got
    })
}

/// A small ring, a sink slower than one source that writes as fast as it can, and a quiet
/// source writing 100 lines/s: the quiet one loses nothing; every loss is the flood's, and
/// counted against it.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_flood_cannot_make_a_quiet_source_lose_a_line() {
    let mut agent = Agent::start(Setup {
        sink: Sink::Stdout,
        ring_capacity: "1MiB".into(),
        max_record_bytes: "4KiB".into(),
        ..Setup::default()
    });
    let slow = Arc::new(AtomicBool::new(true));
    let reader = slow_reader(agent.take_stdout(), slow.clone());
    let writer = env!("CARGO_BIN_EXE_pipe-writer");
    let (flood_n, quiet_n) = (400_000u64, 300u64);
    let mut flood = run(&agent, "flood", writer, &["paced", &flood_n.to_string(), "100", "0", "0"]);
    // 300 lines of 50 bytes at 5000 bytes/s: 100 lines/s for 3 s.
    let mut quiet = run(&agent, "quiet", writer, &["paced", &quiet_n.to_string(), "50", "5000", "0"]);
    assert!(quiet.wait().unwrap().success());
    assert!(flood.wait().unwrap().success());
    let f = captured(&agent, "flood", flood_n);
    let q = captured(&agent, "quiet", quiet_n);
    assert_eq!(
        (f["captured_records_total"].as_u64(), q["captured_records_total"].as_u64()),
        (Some(flood_n), Some(quiet_n))
    );
    slow.store(false, Ordering::Relaxed);
    agent.wait_idle(Duration::from_secs(60));
    let stats = agent.stats();
    assert_eq!(agent.stop().code(), Some(0));
    let got = reader.join().unwrap();

    let lines = |service: &str| -> Vec<String> {
        got.iter()
            .filter(|r| r["service"] == service)
            .map(|r| r["message"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let quiet_lines = lines("quiet");
    let want: Vec<String> = (0..quiet_n).map(|i| format!("{i:08}{}", "x".repeat(41))).collect();
    let missing: Vec<&String> = want.iter().filter(|l| !quiet_lines.contains(l)).collect();
    assert!(
        missing.is_empty(),
        "the quiet source lost {} lines: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(quiet_lines, want, "the quiet source's lines once each, in order");
    let f = target_in(&stats, "flood");
    let q = target_in(&stats, "quiet");
    let flood_dropped = f["dropped_records_total"].as_u64().unwrap();
    assert!(flood_dropped > 0, "the flood overflowed the ring: {f}");
    assert_eq!(q["dropped_records_total"], 0, "{q}");
    assert_eq!(stats["ring"]["dropped_records_total"], flood_dropped, "every loss is the flood's: {}", stats["ring"]);
    let delivered = lines("flood").len() as u64;
    assert_eq!(delivered + flood_dropped, flood_n, "every flood line delivered or counted as dropped");
}

fn target_in(stats: &Value, service: &str) -> Value {
    stats["pipes"]["targets"].as_array().and_then(|t| t.iter().find(|t| t["service"] == service).cloned()).unwrap()
}

/// `ring.source_rate = "1MB"` and a source writing 10 MB/s for 4 s: about 1 MB/s gets
/// through (within 10 %), the rest is counted as throttled, byte for byte.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_source_beyond_its_rate_is_throttled_and_counted() {
    let agent = Agent::start(Setup { ring: "source_rate = \"1MB\"\n".into(), ..Setup::default() });
    let writer = env!("CARGO_BIN_EXE_pipe-writer");
    let (n, len) = (400_000u64, 100u64);
    let start = Instant::now();
    let status =
        run(&agent, "rated", writer, &["paced", &n.to_string(), &len.to_string(), "10000000", "0"]).wait().unwrap();
    let seconds = start.elapsed().as_secs_f64();
    assert!(status.success());
    let t = captured(&agent, "rated", n);
    assert_eq!(t["captured_records_total"], n, "{t}");
    agent.wait_idle(Duration::from_secs(30));
    let delivered = agent.sink_bytes("rated", "stdout");
    let delivered_records = delivered.iter().filter(|&&b| b == b'\n').count() as u64;
    // Record bytes: the files sink adds a newline to each.
    let delivered_bytes = delivered.len() as u64 - delivered_records;
    let throttled = t["throttled_bytes_total"].as_u64().unwrap();
    assert_eq!(delivered_bytes + throttled, t["captured_bytes_total"].as_u64().unwrap(), "{t}");
    assert_eq!(delivered_records + t["throttled_records_total"].as_u64().unwrap(), n, "{t}");
    assert_eq!(t["dropped_records_total"], 0, "nothing dropped for room: {t}");
    let rate = delivered_bytes as f64 / seconds;
    assert!((900_000.0..=1_100_000.0).contains(&rate), "{rate:.0} B/s got through over {seconds:.1} s");
    let metrics = String::from_utf8_lossy(&agent.get("/metrics").unwrap()).into_owned();
    assert!(metrics.contains(&format!("logtap_ring_throttled_bytes_total {throttled}")), "{metrics}");
}
