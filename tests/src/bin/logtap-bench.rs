//! Side-by-side benchmarks, printed as Markdown tables (recorded in docs/BENCHMARKS.md). Run
//! with `cargo xtask bench`.
//!
//! - volumes: the same writers into tmpfs and into a logtap volume;
//! - pipes: a pipe writer with no probe, with the eBPF programs attached but the writer not
//!   watched, and watched (captured), plus the rate at which kernel losses begin.
//! - kafka: lines written into a volume until the Kafka sink has them acknowledged by a local
//!   tansu broker, against rdkafka producing the same records straight from memory (the
//!   ceiling), and write()-to-Kafka latency at 10 MB/s.
//! - containers: podman containers logging 100-byte lines at a fixed total rate to stdout, then
//!   to their logtap volumes: the agent's CPU and memory, and delivered against written per
//!   container; the same containers without the agent as the baseline.
//!
//! Options: `--only volumes|pipes|kafka|containers`, `--lines N` (default 1000000), `--dd-mib N`
//! (default 256), `--rounds N` (default 3), `--containers N` (default 20), `--rate-mb N` (total
//! MB/s, default 20), `--seconds N` (default 10).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use logtap_e2e::{read_json_lines, Agent, Setup, Sink};

struct Args {
    lines: usize,
    dd_mib: usize,
    rounds: usize,
    containers: usize,
    rate_mb: usize,
    seconds: usize,
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args { lines: 1_000_000, dd_mib: 256, rounds: 3, containers: 20, rate_mb: 20, seconds: 10, only: None };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = |i: usize| pair.get(1).and_then(|v| v.parse().ok()).unwrap_or(i);
        match pair[0].as_str() {
            "--lines" => a.lines = value(a.lines),
            "--dd-mib" => a.dd_mib = value(a.dd_mib),
            "--rounds" => a.rounds = value(a.rounds),
            "--containers" => a.containers = value(a.containers),
            "--rate-mb" => a.rate_mb = value(a.rate_mb),
            "--seconds" => a.seconds = value(a.seconds),
            "--only" => a.only = pair.get(1).cloned(),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `p` quantile of sorted values (NaN when there are none).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
}

/// A Markdown table: the header row, its separator, the rows, a blank line.
fn table(header: &str, rows: &[String]) {
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches('|').count().saturating_sub(1)));
    for r in rows {
        println!("{r}");
    }
    println!();
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / hz
}

/// A memory figure of /proc/PID/status (VmHWM, RssFile...), in MiB.
fn status_mib(pid: i32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One write() per 100-byte line, like a line-buffered logger.
fn write_lines(path: &Path, n: usize) -> Duration {
    let mut line = vec![b'x'; 99];
    line.push(b'\n');
    let mut f = OpenOptions::new().create(true).append(true).open(path).expect("open");
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&line).expect("write");
    }
    drop(f);
    start.elapsed()
}

fn dd(src: &Path, dst: &Path, bs: &str) -> Duration {
    let start = Instant::now();
    let ok = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .arg(format!("bs={bs}"))
        .arg("status=none")
        .status()
        .expect("dd");
    assert!(ok.success());
    start.elapsed()
}

fn captured_records(agent: &Agent) -> u64 {
    agent.stats()["volumes"]
        .as_array()
        .map_or(0, |v| v.iter().map(|v| v["captured_records_total"].as_u64().unwrap_or(0)).sum())
}

fn wait_captured(agent: &Agent, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while captured_records(agent) < n {
        assert!(Instant::now() < deadline, "capture did not complete: {} of {n} records", captured_records(agent));
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        assert!(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2g", "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount")
            .success());
        Tmpfs(dir.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn main() {
    logtap_e2e::require_root_and_fuse();
    let a = args();
    let run = |part: &str| a.only.as_deref().is_none_or(|o| o == part);
    if run("volumes") {
        volumes(&a);
    }
    if run("pipes") {
        pipes(&a);
    }
    if run("kafka") {
        kafka(&a);
    }
    if run("containers") {
        containers(&a);
    }
}

/// Sets the nice value of every thread of a process (setpriority on a pid changes one thread).
fn renice(pid: i32, nice: i32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for tid in tasks.flatten().filter_map(|t| t.file_name().to_string_lossy().parse::<u32>().ok()) {
        // SAFETY: setpriority with a thread id; failure leaves the thread as it was.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    }
}

/// Lines in the files sink for `service`, over its files whose name starts with `module.`.
fn sink_line_count(out: &Path, service: &str, module: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(out.join(service)) else { return 0 };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{module}.")))
        .map(|e| std::fs::read(e.path()).map_or(0, |d| d.iter().filter(|&&b| b == b'\n').count()))
        .sum()
}

/// One run of `a.containers` containers writing `n` 100-byte lines each at `rate` bytes/s from a
/// common start, to stdout or (with `volumes`) to a file in the directory `volumes(i)`. Returns
/// the time from the start until the last container exited.
fn container_run(
    podman: &logtap_e2e::podman::Podman,
    a: &Args,
    n: usize,
    rate: usize,
    volumes: Option<&dyn Fn(usize) -> PathBuf>,
) -> Duration {
    // The writer is this workspace's pipe-writer, run with the host's C library.
    let writer = format!("{}:/writer:ro", writer().display());
    let start_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as usize
        + 3000
        + 600 * a.containers;
    let names: Vec<String> = (0..a.containers).map(|i| format!("bench-{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        let mount = volumes.map(|v| format!("{}:/var/log/app", v(i).display()));
        let mut args = vec!["-d", "--rm", "--log-driver=none", "--name", name, "-v", &writer];
        args.extend(["-v", "/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:ro", "-v", "/lib64:/lib64:ro"]);
        if let Some(m) = &mount {
            args.extend(["-v", m.as_str()]);
        }
        let (n, rate, start) = (n.to_string(), rate.to_string(), start_ms.to_string());
        args.extend([logtap_e2e::podman::IMAGE, "/writer", "paced", &n, "100", &rate, &start]);
        if mount.is_some() {
            args.push("/var/log/app/app.log");
        }
        podman.run(&args);
    }
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(start_ms as u64);
    assert!(SystemTime::now() < start, "the containers took too long to start");
    // One wait for all: one podman call per container would add its own start-up time.
    let mut wait = vec!["wait"];
    wait.extend(names.iter().map(String::as_str));
    let _ = podman.output(&wait);
    SystemTime::now().duration_since(start).unwrap_or_default()
}

fn containers(a: &Args) {
    let podman = logtap_e2e::podman::Podman::start(None);
    let rate = a.rate_mb * 1_000_000 / a.containers;
    let n = rate * a.seconds / 100;
    let written = (n * 100 * a.containers) as f64;
    let mut rows = Vec::new();
    for (label, module, files) in [("stdout", "stdout", false), ("volume files", "app", true)] {
        let base_dir = tempfile::tempdir().expect("tempdir");
        let tmpfs = Tmpfs::new(&base_dir.path().join("tmpfs"));
        let on_tmpfs = |i: usize| {
            let d = tmpfs.0.join(format!("v{i:02}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            d
        };
        let base = container_run(&podman, a, n, rate, files.then_some(&on_tmpfs as &dyn Fn(usize) -> PathBuf));
        for nice in [0, -10] {
            let setup = Setup {
                extra: format!("[discovery]\ndocker_socket = \"{}\"\n", podman.socket.display()),
                ..Setup::default()
            };
            let agent = Agent::start(setup);
            renice(agent.pid(), nice);
            let in_volume = |i: usize| agent.volume(&format!("bench-{i:02}"));
            let cpu0 = cpu_seconds(agent.pid());
            let took = container_run(&podman, a, n, rate, files.then_some(&in_volume as &dyn Fn(usize) -> PathBuf));
            let deadline = Instant::now() + Duration::from_secs(120);
            let counts = loop {
                let counts: Vec<usize> =
                    (0..a.containers).map(|i| sink_line_count(&agent.out, &format!("bench-{i:02}"), module)).collect();
                if counts.iter().all(|&c| c >= n) || Instant::now() > deadline {
                    break counts;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            agent.wait_idle(Duration::from_secs(60));
            let cpu = cpu_seconds(agent.pid()) - cpu0;
            let pid = agent.pid();
            let s = agent.stats();
            let lost: u64 = s["discovery"]["containers"]
                .as_array()
                .map_or(0, |c| c.iter().map(|c| c["lost_bytes_total"].as_u64().unwrap_or(0)).sum());
            let complete = counts.iter().filter(|&&c| c == n).count();
            let worst = counts.iter().map(|&c| c as f64 / n as f64).fold(f64::INFINITY, f64::min);
            rows.push(format!(
            "| {label}, agent at nice {nice} | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s ({:.0} %) | {:.2} s ({:.0} % of a core) | {:.1} MiB ({:.1} MiB anon) | {complete} of {} | {:.2} % | {} B, ring dropped {} |",
            a.rate_mb as f64,
            written / base.as_secs_f64() / 1e6,
            written / took.as_secs_f64() / 1e6,
            100.0 * base.as_secs_f64() / took.as_secs_f64(),
            cpu,
            100.0 * cpu / took.as_secs_f64(),
            status_mib(pid, "VmHWM"),
            status_mib(pid, "RssAnon"),
            a.containers,
            100.0 * worst,
            lost,
            s["ring"]["dropped_records_total"]
        ));
        }
    }
    table(
        &format!(
            "| {} containers, {} x 100-byte lines each, paced | target | achieved, no agent | achieved, with the agent | agent CPU | agent peak RSS | containers with delivered = written | least delivered/written | lost in the kernel, dropped |",
            a.containers, n
        ),
        &rows,
    );
}

/// The sink's producer settings, for the direct producer too.
fn producer_config(broker: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", broker)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000");
    c
}

/// rdkafka producing `n` records of `len` bytes from memory: the messages the sink makes (key,
/// headers, timestamp), one key. Records/s.
fn direct_producer(broker: &str, topic: &str, n: usize, len: usize) -> f64 {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
    // Polled on the producing thread, as the sink does (no cross-thread frees in malloc).
    let producer: BaseProducer<DefaultProducerContext> = producer_config(broker).create().expect("producer");
    let lines: Vec<Vec<u8>> = (0..n).map(|i| format!("{i:08} {}", "x".repeat(len - 10)).into_bytes()).collect();
    let mut headers = OwnedHeaders::new_with_capacity(5);
    for (key, value) in
        [("host", "bench"), ("service", "bench"), ("module", "app"), ("volume", "bench"), ("path", "app.log")]
    {
        headers = headers.insert(Header { key, value: Some(value) });
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    // Connected, with its producer id, before the clock starts (the agent's producer is too).
    producer.send(BaseRecord::to(topic).key("warm-up").payload("warm-up")).expect("warm-up");
    producer.flush(Duration::from_secs(30)).expect("warm-up acknowledged");
    let start = Instant::now();
    for (i, l) in lines.iter().enumerate() {
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
            // A window like the sink's (about 16 MiB): a deeper queue only slows librdkafka.
            while producer.in_flight_count() as usize * len > 16 << 20 {
                producer.poll(Duration::from_millis(1));
            }
        }
        let mut record =
            BaseRecord::to(topic).key("bench/app").payload(l.as_slice()).timestamp(now).headers(headers.clone());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("every record acknowledged");
    n as f64 / start.elapsed().as_secs_f64()
}

/// `n` lines of `len` bytes (newline included) through 64 KiB writes.
fn write_buffered(path: &Path, n: usize, len: usize) {
    let f = OpenOptions::new().create(true).append(true).open(path).expect("open");
    let mut w = std::io::BufWriter::with_capacity(64 << 10, f);
    let pad = "x".repeat(len - 10);
    for i in 0..n {
        writeln!(w, "{i:08} {pad}").expect("write");
    }
    w.flush().expect("flush");
}

fn delivered(agent: &Agent) -> u64 {
    agent.sink_stats("kafka")["delivered_records_total"].as_u64().unwrap_or(0)
}

fn kafka(a: &Args) {
    use logtap_e2e::broker::{tail, Broker};
    let broker = Broker::start();
    let mut rows = Vec::new();
    let mut cpu_rows = Vec::new();
    for (len, n) in [(100, a.lines), (1024, a.lines / 5)] {
        let agent = Agent::start(Setup {
            sink: Sink::Kafka { brokers: broker.address(), settings: "topic = \"bench.{module}\"\n".into() },
            policy: "block".into(),
            block_timeout: "120s".into(),
            ..Setup::default()
        });
        let vol = agent.volume("bench");
        let pid = agent.pid();
        let (mut direct, mut ours) = (Vec::new(), Vec::new());
        let (cpu0, mut bytes) = (cpu_seconds(pid), 0u64);
        for round in 0..a.rounds {
            let topic = format!("bench.d{len}x{round}");
            broker.create_topic(&topic, 1);
            direct.push(direct_producer(&broker.address(), &topic, n, len));
            let module = format!("l{len}x{round}");
            broker.create_topic(&format!("bench.{module}"), 1);
            let before = delivered(&agent);
            let start = Instant::now();
            write_buffered(&vol.join(format!("{module}.log")), n, len);
            let deadline = Instant::now() + Duration::from_secs(300);
            while delivered(&agent) < before + n as u64 {
                assert!(Instant::now() < deadline, "not delivered: {}", agent.sink_stats("kafka"));
                std::thread::sleep(Duration::from_millis(5));
            }
            ours.push(n as f64 / start.elapsed().as_secs_f64());
            bytes += (n * len) as u64;
        }
        let cpu = cpu_seconds(pid) - cpu0;
        let (d, o) = (median(direct), median(ours));
        let mb = |r: f64| r * len as f64 / 1e6;
        rows.push(format!(
            "| {len}-byte lines ({n} per run) | {d:.0} rec/s, {:.0} MB/s | {o:.0} rec/s, {:.0} MB/s | {:.0} % |",
            mb(d),
            mb(o),
            100.0 * o / d
        ));
        cpu_rows
            .push(format!("| agent CPU per GB delivered, {len}-byte lines | {:.2} s/GB |", cpu / (bytes as f64 / 1e9)));
        let k = agent.sink_stats("kafka");
        assert_eq!(k["rejected_records_total"], 0);
    }

    // write()-to-Kafka latency at 10 MB/s: 100-byte lines stamped with their write time, read
    // back by a consumer as they arrive.
    let mut latency_rows = Vec::new();
    for flush_interval in ["200ms", "20ms"] {
        let agent = Agent::start(Setup {
            sink: Sink::Kafka { brokers: broker.address(), settings: "topic = \"lat.{module}\"\n".into() },
            flush_interval: flush_interval.into(),
            ..Setup::default()
        });
        let topic = format!("lat.f{}", flush_interval.trim_end_matches("ms"));
        broker.create_topic(&topic, 1);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let consumer = tail(broker.address(), topic.clone(), stop.clone());
        // The consumer is connected and polling before the first line.
        std::thread::sleep(Duration::from_secs(1));
        let vol = agent.volume("lat");
        let path = vol.join(format!("f{}.log", flush_interval.trim_end_matches("ms")));
        let mut f = OpenOptions::new().create(true).append(true).open(&path).expect("open");
        let seconds = 5;
        let start = Instant::now();
        // 1000 lines every 10 ms: 100 000 lines/s of 100 bytes.
        logtap_e2e::every_10ms(seconds * 100, |tick| {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
            let mut buf = Vec::with_capacity(100 * 1000);
            for i in 0..1000 {
                let mut line = format!("{now} {tick}-{i} ");
                line.extend(std::iter::repeat_n('x', 99 - line.len()));
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
            }
            f.write_all(&buf).expect("write");
        });
        let rate = (seconds * 100 * 1000 * 100) as f64 / start.elapsed().as_secs_f64() / 1e6;
        drop(f);
        agent.wait_idle(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let got = consumer.join().unwrap_or_default();
        let k = agent.sink_stats("kafka");
        // The consumer's clock at receipt: an upper bound of the acknowledgement time.
        let mut lat: Vec<f64> = got
            .iter()
            .filter_map(|c| {
                let written: f64 = std::str::from_utf8(&c.value).ok()?.split(' ').next()?.parse().ok()?;
                let at = c.received_at.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_nanos() as f64;
                Some((at - written) / 1e9)
            })
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| quantile(&lat, p);
        latency_rows.push(format!(
            "| {rate:.1} MB/s, volumes.flush_interval {flush_interval}, {} lines | write() to consumer: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | capture to ack: p50 {:.0} ms, p99 {:.0} ms |",
            got.len(),
            q(0.5) * 1e3,
            q(0.99) * 1e3,
            lat.last().copied().unwrap_or(f64::NAN) * 1e3,
            k["latency"]["p50_seconds"].as_f64().unwrap_or(f64::NAN) * 1e3,
            k["latency"]["p99_seconds"].as_f64().unwrap_or(f64::NAN) * 1e3,
        ));
    }

    table(
        "| workload (volume to a local tansu broker, acks=all, idempotent, lz4) | rdkafka from memory (ceiling) | logtap | logtap / ceiling |",
        &rows,
    );
    table("| agent figure | value |", &cpu_rows);
    table("| latency run | end to end | in the agent |", &latency_rows);
}

/// Pins a process (0: the calling thread) to CPU 0.
fn pin_to_cpu0(pid: i32) {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed by pointer with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `pipe-writer`, built beside this binary.
fn writer() -> std::path::PathBuf {
    std::env::current_exe().expect("current exe").with_file_name("pipe-writer")
}

/// Runs `pipe-writer flood N LEN RATE` into a pipe drained by a thread; with `watch`, the
/// agent captures it. Returns the writer's time and, when watched, its target's stats.
fn pipe_run(
    agent: Option<&Agent>,
    watch: bool,
    n: usize,
    len: usize,
    rate: usize,
) -> (Duration, Option<serde_json::Value>) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(writer())
        .args(["flood", &n.to_string(), &len.to_string(), &rate.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("pipe-writer");
    let mut target = None;
    if watch {
        let agent = agent.expect("an agent to watch with");
        let body = serde_json::json!({"pid": child.id(), "service": "bench"});
        let answer: serde_json::Value =
            serde_json::from_slice(&agent.post("/v1/watch", &body).expect("watch")).expect("json");
        target = answer["target"].as_str().map(str::to_string);
    }
    // The writer and its reader share CPU 0 in every mode: left to the scheduler, the no-probe
    // baseline flips between two speeds depending on whether they share a core.
    pin_to_cpu0(child.id() as i32);
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        pin_to_cpu0(0);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            total += k;
        }
        total
    });
    let start = Instant::now();
    child.stdin.take().expect("stdin").write_all(b"g").expect("go");
    assert!(child.wait().expect("wait").success());
    let elapsed = start.elapsed();
    assert_eq!(reader.join().expect("reader"), n * len);
    let stats = target.map(|id| {
        let agent = agent.expect("agent");
        agent.wait_idle(Duration::from_secs(120));
        let body = serde_json::json!({ "target": id });
        agent.post("/v1/unwatch", &body).expect("unwatch");
        std::thread::sleep(Duration::from_millis(300));
        agent.stats()["pipes"]["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["id"] == id && t["ended"] == true).cloned())
            .expect("ended target")
    });
    (elapsed, stats)
}

fn pipes(a: &Args) {
    let mut rows = Vec::new();
    for (label, n, len) in
        [("100-byte lines", a.lines, 100usize), ("64 KiB writes", (a.dd_mib << 20) / 65536 * 4, 65536)]
    {
        let unit = |d: Duration| {
            if len == 100 {
                n as f64 / d.as_secs_f64()
            } else {
                (n * len) as f64 / d.as_secs_f64() / (1 << 20) as f64
            }
        };
        let (mut none, mut unwatched, mut watched) = (Vec::new(), Vec::new(), Vec::new());
        let mut lost = (0u64, 0u64);
        let mut captured = 0u64;
        let mut agent_cpu = Vec::new();
        for _ in 0..a.rounds {
            none.push(unit(pipe_run(None, false, n, len, 0).0));
            let agent = Agent::start(Setup::default());
            unwatched.push(unit(pipe_run(Some(&agent), false, n, len, 0).0));
            let cpu0 = cpu_seconds(agent.pid());
            let (d, t) = pipe_run(Some(&agent), true, n, len, 0);
            agent_cpu.push((cpu_seconds(agent.pid()) - cpu0) / n as f64 * 1e6);
            watched.push(unit(d));
            let t = t.unwrap_or_default();
            lost.0 += t["lost_events_total"].as_u64().unwrap_or(0);
            lost.1 += t["lost_bytes_total"].as_u64().unwrap_or(0);
            captured += t["captured_bytes_total"].as_u64().unwrap_or(0);
        }
        let (b, u, w) = (median(none), median(unwatched), median(watched));
        let unit_name = if len == 100 { "lines/s" } else { "MiB/s" };
        rows.push(format!(
            "| {label} ({n} writes) | {b:.0} {unit_name} | {u:.0} {unit_name} ({:.0} %) | {w:.0} {unit_name} ({:.0} %) | {:.2} us | {} events, {} bytes lost; {:.1} MiB captured |",
            100.0 * u / b,
            100.0 * w / b,
            median(agent_cpu),
            lost.0,
            lost.1,
            captured as f64 / (1 << 20) as f64
        ));
    }
    table(&format!("| pipe writer and reader on CPU 0, {} rounds (median) | no probe | probe attached, writer unwatched | watched and captured | agent CPU per captured write (user space, files sink included) | kernel-counted losses (all rounds) |", a.rounds), &rows);

    // Where losses begin: 64 KiB writes paced at rising rates.
    println!("| 64 KiB writes, paced | achieved | captured | lost in the kernel |");
    println!("|---|---|---|---|");
    let agent = Agent::start(Setup::default());
    for rate_mib in [64usize, 128, 256, 512, 1024, 0] {
        let n = 4096;
        let (d, t) = pipe_run(Some(&agent), true, n, 65536, rate_mib << 20);
        let t = t.unwrap_or_default();
        let label = if rate_mib == 0 { "unpaced".to_string() } else { format!("{rate_mib} MiB/s") };
        println!(
            "| {label} | {:.0} MiB/s | {:.1} MiB | {} events ({:.1} MiB) |",
            (n * 65536) as f64 / d.as_secs_f64() / (1 << 20) as f64,
            t["captured_bytes_total"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            t["lost_events_total"].as_u64().unwrap_or(0),
            t["lost_bytes_total"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
}

fn volumes(a: &Args) {
    let work = tempfile::Builder::new().prefix("logtap-bench-").tempdir().expect("tempdir");
    let tmpfs = Tmpfs::new(&work.path().join("tmpfs"));
    let agent = Agent::start(Setup::default());
    let vol = agent.volume("bench");
    let pid = agent.pid();
    let mut rows: Vec<String> = Vec::new();
    let cpu0 = cpu_seconds(pid);

    // 1. 100-byte lines, one write() each.
    let (mut base, mut ours, mut ours_captured) = (Vec::new(), Vec::new(), Vec::new());
    let mut expected = captured_records(&agent);
    for round in 0..a.rounds {
        let t = write_lines(&tmpfs.0.join(format!("lines{round}.log")), a.lines);
        base.push(a.lines as f64 / t.as_secs_f64());
        std::fs::remove_file(tmpfs.0.join(format!("lines{round}.log"))).ok();
        let start = Instant::now();
        let t = write_lines(&vol.join(format!("lines{round}.log")), a.lines);
        ours.push(a.lines as f64 / t.as_secs_f64());
        expected += a.lines as u64;
        wait_captured(&agent, expected);
        ours_captured.push(a.lines as f64 / start.elapsed().as_secs_f64());
        std::fs::remove_file(vol.join(format!("lines{round}.log"))).ok();
    }
    let (b, o, c) = (median(base), median(ours), median(ours_captured));
    rows.push(format!(
        "| 100-byte lines, 1 write() each ({} lines) | {:.0} lines/s | {:.0} lines/s ({:.0} captured/s) | {:.0} % |",
        a.lines,
        b,
        o,
        c,
        100.0 * o / b
    ));

    // 2. dd with 4 KiB, 64 KiB and 1 MiB blocks, from a source in memory.
    let src = tmpfs.0.join("src.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("src"));
        let line = [b'y'; 99];
        for _ in 0..(a.dd_mib << 20) / 100 {
            f.write_all(&line).and_then(|()| f.write_all(b"\n")).expect("src write");
        }
    }
    let src_lines = ((a.dd_mib << 20) / 100) as u64;
    let mib = (src_lines * 100) as f64 / (1 << 20) as f64;
    for bs in ["4k", "64k", "1M"] {
        let (mut base, mut ours) = (Vec::new(), Vec::new());
        for round in 0..a.rounds {
            let dst = tmpfs.0.join(format!("dd{round}"));
            base.push(mib / dd(&src, &dst, bs).as_secs_f64());
            std::fs::remove_file(dst).ok();
            let dst = vol.join(format!("dd{bs}{round}.log"));
            let start = Instant::now();
            dd(&src, &dst, bs);
            expected += src_lines;
            wait_captured(&agent, expected);
            ours.push(mib / start.elapsed().as_secs_f64());
            std::fs::remove_file(dst).ok();
        }
        let (b, o) = (median(base), median(ours));
        rows.push(format!(
            "| dd bs={bs} ({mib:.0} MiB), until captured | {b:.0} MiB/s | {o:.0} MiB/s | {:.0} % |",
            100.0 * o / b
        ));
    }

    let cpu = cpu_seconds(pid) - cpu0;
    agent.wait_idle(Duration::from_secs(120));
    let stats = agent.stats();
    let bytes: u64 = stats["volumes"]
        .as_array()
        .map_or(0, |v| v.iter().map(|v| v["captured_bytes_total"].as_u64().unwrap_or(0)).sum());
    let dropped = stats["ring"]["dropped_records_total"].as_u64().unwrap_or(0);
    let rss = status_mib(pid, "VmHWM");
    // File-backed pages: the binary and the BPF ring buffer, which the kernel maps twice and
    // counts as resident from the start.
    let rss_file = status_mib(pid, "RssFile");
    let capacity_mib = stats["ring"]["capacity_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    drop(agent);

    // 3. The block policy: writers wait for the files sink, nothing is dropped.
    let block = Agent::start(Setup { policy: "block".into(), ..Setup::default() });
    let bvol = block.volume("block");
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    let mut delivered_before = 0;
    for round in 0..a.rounds {
        let t = write_lines(&tmpfs.0.join(format!("lines{round}.log")), a.lines);
        base.push(a.lines as f64 / t.as_secs_f64());
        std::fs::remove_file(tmpfs.0.join(format!("lines{round}.log"))).ok();
        let start = Instant::now();
        write_lines(&bvol.join(format!("lines{round}.log")), a.lines);
        block.wait_idle(Duration::from_secs(300));
        let delivered_at = |b: &Agent| b.stats()["sinks"][0]["delivered_records_total"].as_u64().unwrap_or(0);
        let mut delivered = delivered_at(&block);
        if delivered - delivered_before < a.lines as u64 {
            // Records that arrive after close() returned and the ring went idle are late, not
            // lost: say so and by how much, and fail only if they never come.
            let idle = Instant::now();
            while delivered - delivered_before < a.lines as u64 && idle.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
                delivered = delivered_at(&block);
            }
            eprintln!(
                "logtap-bench: {} records arrived {:?} after close() returned and the ring was idle",
                a.lines as u64 - (delivered_at(&block).min(delivered) - delivered_before).min(a.lines as u64),
                idle.elapsed()
            );
        }
        assert_eq!(
            delivered - delivered_before,
            a.lines as u64,
            "block policy lost records: {}",
            block.stats()["ring"]
        );
        delivered_before = delivered;
        ours.push(a.lines as f64 / start.elapsed().as_secs_f64());
        std::fs::remove_file(bvol.join(format!("lines{round}.log"))).ok();
    }
    let block_dropped = block.stats()["ring"]["dropped_records_total"].as_u64().unwrap_or(0);
    drop(block);
    let (b, o) = (median(base), median(ours));
    rows.push(format!(
        "| 100-byte lines, policy block, until delivered to the files sink | {b:.0} lines/s | {o:.0} lines/s, {block_dropped} dropped | {:.0} % |",
        100.0 * o / b
    ));

    // 4. write()-to-capture latency, one line every 10 ms into a file that stays open.
    let mut lat_agent = Agent::start(Setup { sink: Sink::Stdout, ..Setup::default() });
    let out = read_json_lines(lat_agent.take_stdout());
    let lvol = lat_agent.volume("lat");
    let mut f = OpenOptions::new().create(true).append(true).open(lvol.join("app.log")).expect("open");
    for i in 0..500 {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        writeln!(f, "{i} {now}").expect("write");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    lat_agent.stop();
    drop(f);
    let mut lat: Vec<f64> = out
        .join()
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let written: f64 = r["message"].as_str()?.split(' ').nth(1)?.parse::<f64>().ok()? / 1e9;
            let captured: chrono::DateTime<chrono::Utc> = r["timestamp"].as_str()?.parse().ok()?;
            let captured = SystemTime::from(captured).duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64();
            Some(captured - written)
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| quantile(&lat, p);

    table("| workload | tmpfs | logtap volume | logtap / tmpfs |", &rows);
    println!("| agent figure | value |");
    println!("|---|---|");
    println!(
        "| CPU per GB captured (user+sys, whole run, files sink included) | {:.2} s/GB |",
        cpu / (bytes as f64 / 1e9)
    );
    println!("| bytes captured in the run | {:.2} GB |", bytes as f64 / 1e9);
    println!("| records dropped by the ring (drop_oldest: capture outran the files sink on 2 cores) | {dropped} |");
    println!(
        "| peak RSS (VmHWM) | {rss:.1} MiB in all; {rss_file:.1} MiB of it file-backed (the binary, and the 16 MiB BPF ring buffer that the kernel maps twice); {:.1} MiB the rest, against ring capacity {capacity_mib:.0} MiB + 32 MiB = {:.0} MiB |",
        rss - rss_file,
        capacity_mib + 32.0
    );
    println!(
        "| write()-to-capture latency, 1 line / 10 ms, {} lines | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms |",
        lat.len(),
        q(0.5) * 1e3,
        q(0.99) * 1e3,
        lat.last().copied().unwrap_or(f64::NAN) * 1e3
    );
}
