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
//! - identity: what deciding a write's stream by its pipe costs, unwatched and watched writers,
//!   with no agent, a previous build (`LOGTAP_BASELINE_BIN`, if set) and this one.
//! - stdout: container stdout with logtap (`--log-driver none`) against the runtime writing
//!   its own `k8s-file` log and against no logging: machine CPU per GB, time until delivered,
//!   disk bytes written; 1 container on fd 1, on `/dev/stdout` opened again, 20 containers.
//!
//! - ring: the bursts of issue 12 on each build's default config, throughput of short and
//!   100-byte records into 1 and 3 sinks, memory per million records held; a previous build
//!   (`LOGTAP_BASELINE_BIN`, if set) beside this one.
//!
//! - restart: a writer appending every 1 ms while the worker is killed 5 times, against no
//!   restart: write() latency, restart gaps, redelivered and lost lines; the same for a
//!   `logtap run` printer on a pipe.
//!
//! - encryption: a tenant's volume written with 100-byte and with 1 KiB lines into the files
//!   and the Kafka sinks, sealed with the tenant's key and in clear, rounds alternating: the
//!   worker's CPU per GB delivered (Kafka's sealed rounds also with compression off), and the
//!   CPU per GB of sealing alone, in the bench's own thread.
//!
//! Options: `--only volumes|pipes|kafka|containers|identity|stdout|ring|restart|encryption`, `--serving passthrough|requests|writeback`
//! (volumes: one way of serving files), `--lines N` (default 1000000), `--dd-mib N`
//! (default 256), `--rounds N` (default 3), `--containers N` (default 20), `--rate-mb N` (total
//! MB/s, default 20), `--seconds N` (default 10).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use logtap_e2e::{read_json_lines, Agent, Serving, Setup, Sink};

struct Args {
    lines: usize,
    dd_mib: usize,
    rounds: usize,
    containers: usize,
    rate_mb: usize,
    seconds: usize,
    only: Option<String>,
    /// Volumes: only this way of serving files (`passthrough`, `requests`, `writeback`).
    serving: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        lines: 1_000_000,
        dd_mib: 256,
        rounds: 3,
        containers: 20,
        rate_mb: 20,
        seconds: 10,
        only: None,
        serving: None,
    };
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
            "--serving" => a.serving = pair.get(1).cloned(),
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

/// Waits until `n` records are captured, or until no more arrive for 3 s (a build that loses
/// lines); returns how many are missing.
fn wait_captured_or_lost(agent: &Agent, n: u64) -> u64 {
    let (mut last, mut since) = (captured_records(agent), Instant::now());
    while last < n && since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(5));
        let now = captured_records(agent);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    n.saturating_sub(last)
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
    if run("identity") {
        identity(&a);
    }
    if run("stdout") {
        container_stdout(&a);
    }
    if run("ring") {
        ring(&a);
    }
    if run("restart") {
        restart();
    }
    if run("encryption") {
        encryption(&a);
    }
}

/// The worker's CPU seconds per GB delivered for `n` lines of `len` bytes into a volume of
/// tenant `bench`, with the tenant's key (`sealed`) or without encryption, into the files sink
/// or (with a broker's address) the Kafka sink with `compression`.
fn sealing_round(tmpfs: &Tmpfs, keys: &Path, sealed: bool, n: usize, len: usize, kafka: Option<(&str, &str)>) -> f64 {
    let encryption = if sealed { format!("[encryption]\nkeys = \"{}\"\n", keys.display()) } else { String::new() };
    let out = tmpfs.0.join(format!("out-{sealed}-{len}"));
    let (sink, name) = match kafka {
        Some((brokers, compression)) => {
            let settings = format!("topic = \"bench\"\ncompression = \"{compression}\"\n");
            (Sink::Kafka { brokers: brokers.into(), settings }, "kafka")
        }
        None => (Sink::Files, "files"),
    };
    let setup = Setup {
        sink,
        extra: format!("[discovery]\nenabled = false\n[pipes]\nenabled = false\n{encryption}"),
        out: Some(out.clone()),
        // All of a round fits in the volume's memory: none of it is dropped while the sink
        // catches up.
        volume_memory: "1GiB".into(),
        ..Setup::default()
    };
    let agent = Agent::start(setup);
    agent.post("/v1/volumes", &serde_json::json!({ "name": "bench", "tenant": "bench" })).expect("volume");
    let pid = agent.worker_pid();
    let cpu0 = cpu_seconds(pid);
    write_buffered(&agent.mount.join("bench/app.log"), n, len);
    let k = agent.wait_delivered(name, n as u64, Duration::from_secs(300));
    let cpu = cpu_seconds(pid) - cpu0;
    assert_eq!(k["delivered_records_total"], n as u64, "every line delivered (sealed: {sealed}, {len} bytes)");
    if sealed {
        assert_eq!(k["encryption"]["bench"]["sealed_records_total"], n as u64, "every line sealed");
    }
    drop(agent);
    std::fs::remove_dir_all(&out).ok();
    cpu / ((n * len) as f64 / 1e9)
}

fn encryption(a: &Args) {
    use logtap_e2e::broker::Broker;
    let tmpfs = Tmpfs::new(&std::env::temp_dir().join("logtap-bench-sealing"));
    let keys = tmpfs.0.join("keys");
    let made = Command::new(logtap_e2e::logtap_bin())
        .args(["keys", "new", "bench", "--keys"])
        .arg(&keys)
        .output()
        .expect("logtap keys new");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let broker = Broker::start();
    broker.create_topic("bench", 1);
    let address = broker.address();
    let mut rows = Vec::new();
    // Sealed values do not compress, so the sealed rounds also run with compression off (what
    // lz4 costs on them), against the same clear rounds (lz4, the default).
    let sinks = [("files", None, None), ("kafka", Some("lz4"), Some("none"))];
    for (sink, compression, sealed_compression) in sinks {
        let on = |c: Option<&'static str>| c.map(|c| (address.as_str(), c));
        // About 200 MB a round.
        for (len, n) in [(100, a.lines * 2), (1024, a.lines / 5)] {
            let (mut clear, mut sealed, mut uncompressed) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..a.rounds {
                clear.push(sealing_round(&tmpfs, &keys, false, n, len, on(compression)));
                sealed.push(sealing_round(&tmpfs, &keys, true, n, len, on(compression)));
                if sealed_compression.is_some() {
                    uncompressed.push(sealing_round(&tmpfs, &keys, true, n, len, on(sealed_compression)));
                }
            }
            let (c, s) = (median(clear), median(sealed));
            let alone = sealing_alone(&keys, n, len);
            let change = |x: f64| format!("{:+.0} %", 100.0 * (x / c - 1.0));
            let off = if uncompressed.is_empty() {
                "-".to_string()
            } else {
                let u = median(uncompressed);
                format!("{u:.2} s/GB ({})", change(u))
            };
            rows.push(format!(
                "| {sink} | {len}-byte lines ({n}, {:.2} GB) | {c:.2} s/GB | {s:.2} s/GB | {} | {off} | {alone:.2} s/GB ({:.0} % of clear) |",
                (n * len) as f64 / 1e9,
                change(s),
                100.0 * alone / c,
            ));
        }
    }
    table(
        "| sink | lines into a tenant's volume | in clear | sealed | sealed vs clear | sealed, compression off | sealing alone |",
        &rows,
    );
}

/// CPU seconds per GB that `Sealer::seal` alone takes on this thread for `n` records of `len`
/// bytes of one stream, a new sealer per sink batch (`BATCH_RECORDS`) as in the agent: the
/// floor that any per-record sealing adds, before encoding and writing the larger output.
fn sealing_alone(keys: &Path, n: usize, len: usize) -> f64 {
    use logtap::encryption::{keys::KeySet, sealed::Sealer};
    use logtap::record::{Origin, Record};
    let set = KeySet::load(keys).expect("the bench's keys");
    let key = set.sealing("bench").expect("the bench's key").clone();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let origin = std::sync::Arc::new(Origin {
        host: host.trim().into(),
        pid: 0,
        volume: "bench".into(),
        service: "bench".into(),
        module: "app".into(),
        path: "app.log".into(),
        tenant: "bench".into(),
        container: None,
        counters: logtap::counters::StreamCounters::detached(),
    });
    let mut record = Record {
        captured_at: std::time::SystemTime::now(),
        origin,
        seq: 0,
        bytes: vec![b'x'; len].into(),
        split: false,
        unterminated: false,
    };
    let mut out = Vec::new();
    let started = thread_cpu_seconds();
    let batch_records = logtap::sinks::BATCH_RECORDS;
    for batch in 0..n.div_ceil(batch_records) {
        let mut sealer = Sealer::new();
        for seq in batch * batch_records..n.min((batch + 1) * batch_records) {
            record.seq = seq as u64;
            out.clear();
            sealer.seal(&key, &record, &record.bytes, &mut out).expect("seal");
        }
    }
    (thread_cpu_seconds() - started) / ((n * len) as f64 / 1e9)
}

fn thread_cpu_seconds() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// The line-writer binary, beside this one.
fn line_writer() -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name("line-writer")
}

/// `p50_us A p99_us B max_us C` as printed by `line-writer paced`.
fn latencies(out: &str) -> (u64, u64, u64) {
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1)?.parse().ok()).unwrap_or(0);
    (at("p50_us"), at("p99_us"), at("max_us"))
}

/// `kill -9` of the worker `kills` times, 1 s apart: the restart gaps (p50 / max, ms) and the
/// records delivered again.
fn kill_workers(agent: &Agent, kills: usize) -> (String, u64) {
    let (mut gaps, mut again) = (Vec::new(), 0);
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(1000));
        let s = agent.kill_worker();
        gaps.push(s["last_restart"]["gap_ms"].as_f64().unwrap_or(0.0));
        again += s["last_restart"]["redelivered_records"].as_u64().unwrap_or(0);
    }
    gaps.sort_by(f64::total_cmp);
    let gap = match gaps.last() {
        None => "-".to_string(),
        Some(max) => format!("{:.1} / {max:.1}", gaps[gaps.len() / 2]),
    };
    (gap, again)
}

/// A writer appending a 100-byte line every 1 ms to a volume file, with no restart and with the
/// worker killed (kill -9) 5 times, side by side: write() latency as the writer sees it, the
/// gap from each kill to the new worker serving, records delivered again, lines lost.
fn restart() {
    let mut rows = Vec::new();
    for serving in [Serving::Passthrough, Serving::Requests] {
        for kills in [0usize, 5] {
            let agent = Agent::start(Setup { serving, ..Setup::default() });
            let vol = agent.volume("r");
            let n = 6000u64;
            let w = Command::new(line_writer())
                .args(["paced", vol.join("app.log").to_str().expect("path"), &n.to_string(), "100", "1"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("line-writer");
            let (gap, again) = kill_workers(&agent, kills);
            let out = w.wait_with_output().expect("writer");
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            let ok = out.starts_with(&format!("ok {n}\n"));
            let got = agent.wait_lines("r", "app", n as usize, Duration::from_secs(60));
            let distinct: std::collections::HashSet<&Vec<u8>> = got.iter().collect();
            let (p50, p99, max) = latencies(&out);
            rows.push(format!(
                "| {} | {kills} | {} | {p50} / {p99} / {max} | {gap} | {again} | {} | {} |",
                serving.name(),
                if ok { "none" } else { "yes" },
                n as usize - distinct.len(),
                got.len() - distinct.len(),
            ));
        }
    }
    table(
        "| serving | kill -9 of the worker | write errors | write() p50 / p99 / max (us) | restart gap p50 / max (ms) | redelivered records | lines lost | lines twice |",
        &rows,
    );
    restart_pipes();
}

/// `logtap run` of a printer writing a 100-byte line to its stdout pipe every 1 ms, with no
/// restart and with the worker killed 5 times: lines lost and twice, and whether the run ever
/// said its capture stopped.
fn restart_pipes() {
    let mut rows = Vec::new();
    let pipe_writer = std::env::current_exe().expect("own path").with_file_name("pipe-writer");
    for kills in [0usize, 5] {
        let agent = Agent::start(Setup::default());
        let n = 6000u64;
        let run = Command::new(logtap_e2e::logtap_bin())
            .args(["run", "--service", "printer", "--socket"])
            .arg(&agent.socket)
            .arg("--")
            .arg(&pipe_writer)
            .args(["paced", &n.to_string(), "100", "100000", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("logtap run");
        std::thread::sleep(Duration::from_millis(200));
        let (gap, again) = kill_workers(&agent, kills);
        let out = run.wait_with_output().expect("logtap run");
        let stopped = String::from_utf8_lossy(&out.stderr).contains("NOT captured");
        let got = agent.wait_lines("printer", "stdout", n as usize, Duration::from_secs(60));
        let distinct: std::collections::HashSet<&Vec<u8>> = got.iter().collect();
        rows.push(format!(
            "| logtap run, 1 line/ms | {kills} | {} | {gap} | {again} | {} | {} |",
            if stopped { "yes" } else { "no" },
            n as usize - distinct.len(),
            got.len() - distinct.len(),
        ));
    }
    table(
        "| pipe | kill -9 of the worker | run said NOT captured | restart gap p50 / max (ms) | redelivered records | lines lost | lines twice |",
        &rows,
    );
}

/// Sets the nice value of every thread of a process (setpriority on a pid changes one thread).
fn renice(pid: i32, nice: i32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for tid in tasks.flatten().filter_map(|t| t.file_name().to_string_lossy().parse::<u32>().ok()) {
        // SAFETY: setpriority with a thread id; failure leaves the thread as it was.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    }
}

/// The files sink's files for `service` whose name starts with `module.`.
fn sink_files(out: &Path, service: &str, module: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(out.join(service)) else { return Vec::new() };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{module}.")))
        .map(|e| e.path())
        .collect()
}

/// Lines in the files sink for `service`/`module`.
fn sink_line_count(out: &Path, service: &str, module: &str) -> usize {
    let lines = |p: &PathBuf| std::fs::read(p).map_or(0, |d| d.iter().filter(|&&b| b == b'\n').count());
    sink_files(out, service, module).iter().map(lines).sum()
}

/// Bytes in the files sink for `service`/`module`.
fn sink_bytes(out: &Path, service: &str, module: &str) -> u64 {
    sink_files(out, service, module).iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum()
}

/// How the containers of a run write and are logged.
#[derive(Clone, Copy)]
struct Logging<'a> {
    /// Their log directory is `volumes(i)`, and they write `app.log` in it instead of stdout.
    volumes: Option<&'a dyn Fn(usize) -> PathBuf>,
    /// They open this path (`/dev/stdout`) and write to it instead of fd 1.
    reopen: Option<&'a str>,
    /// The runtime writes each container's log to `{dir}/bench-NN.log` (the `k8s-file`
    /// driver, what a tailing agent reads) instead of discarding it (`none`).
    k8s_file: Option<&'a Path>,
}

const TO_STDOUT: Logging<'static> = Logging { volumes: None, reopen: None, k8s_file: None };

/// One run of `count` containers writing `n` 100-byte lines each at `rate` bytes/s (0: as fast
/// as they can) from a common start, when `at_start` is called. Returns the start and the time
/// from it until the last container exited.
fn container_run(
    podman: &logtap_e2e::podman::Podman,
    count: usize,
    n: usize,
    rate: usize,
    logging: Logging,
    at_start: &mut dyn FnMut(),
) -> (SystemTime, Duration) {
    // The writer is this workspace's pipe-writer, run with the host's C library.
    let writer = format!("{}:/writer:ro", writer().display());
    let start_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as usize
        + 3000
        + 600 * count;
    let names: Vec<String> = (0..count).map(|i| format!("bench-{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        let mount = logging.volumes.map(|v| format!("{}:/var/log/app", v(i).display()));
        let driver = match logging.k8s_file {
            Some(dir) => format!("--log-driver=k8s-file --log-opt=path={}/{name}.log", dir.display()),
            None => "--log-driver=none".to_string(),
        };
        let mut args = vec!["-d", "--rm", "--name", name, "-v", &writer];
        args.extend(driver.split(' '));
        args.extend(["-v", "/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:ro", "-v", "/lib64:/lib64:ro"]);
        if let Some(m) = &mount {
            args.extend(["-v", m.as_str()]);
        }
        let (n, rate, start) = (n.to_string(), rate.to_string(), start_ms.to_string());
        args.extend([logtap_e2e::podman::IMAGE, "/writer", "paced", &n, "100", &rate, &start]);
        if mount.is_some() {
            args.push("/var/log/app/app.log");
        }
        if let Some(path) = logging.reopen {
            args.push(path);
        }
        podman.run(&args);
    }
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(start_ms as u64);
    let Ok(wait) = start.duration_since(SystemTime::now()) else { panic!("the containers took too long to start") };
    std::thread::sleep(wait);
    at_start();
    // One wait for all: one podman call per container would add its own start-up time.
    let mut wait = vec!["wait"];
    wait.extend(names.iter().map(String::as_str));
    let _ = podman.output(&wait);
    (start, SystemTime::now().duration_since(start).unwrap_or_default())
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
        let base_logging = Logging { volumes: files.then_some(&on_tmpfs as &dyn Fn(usize) -> PathBuf), ..TO_STDOUT };
        let base = container_run(&podman, a.containers, n, rate, base_logging, &mut || {}).1;
        for nice in [0, -10] {
            let setup = Setup {
                extra: format!("[discovery]\ndocker_socket = \"{}\"\n", podman.socket.display()),
                ..Setup::default()
            };
            let agent = Agent::start(setup);
            renice(agent.worker_pid(), nice);
            let in_volume = |i: usize| agent.volume(&format!("bench-{i:02}"));
            let cpu0 = cpu_seconds(agent.worker_pid());
            let logging = Logging { volumes: files.then_some(&in_volume as &dyn Fn(usize) -> PathBuf), ..TO_STDOUT };
            let took = container_run(&podman, a.containers, n, rate, logging, &mut || {}).1;
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
            let cpu = cpu_seconds(agent.worker_pid()) - cpu0;
            let pid = agent.worker_pid();
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
        let pid = agent.worker_pid();
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

/// Runs `pipe-writer flood N LEN RATE [OUT]` with its stdout a pipe drained by a thread; with
/// `watch`, the agent captures it. `out`: a path the writer opens and writes to instead of fd 1
/// (`/dev/stdout` again, or `/dev/null`: no pipe). Returns the writer's time and, when
/// watched, its target's stats.
fn pipe_run(
    agent: Option<&Agent>,
    watch: bool,
    n: usize,
    len: usize,
    rate: usize,
    out: Option<&str>,
) -> (Duration, Option<serde_json::Value>) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(writer())
        .args(["flood", &n.to_string(), &len.to_string(), &rate.to_string()])
        .args(out)
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
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        pin_to_cpu0(0);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        while let Ok(k) = stdout.read(&mut buf) {
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
    let to_pipe = out.is_none_or(|o| o == "/dev/stdout");
    assert_eq!(reader.join().expect("reader"), if to_pipe { n * len } else { 0 });
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
            none.push(unit(pipe_run(None, false, n, len, 0, None).0));
            let agent = Agent::start(Setup::default());
            unwatched.push(unit(pipe_run(Some(&agent), false, n, len, 0, None).0));
            let cpu0 = cpu_seconds(agent.worker_pid());
            let (d, t) = pipe_run(Some(&agent), true, n, len, 0, None);
            agent_cpu.push((cpu_seconds(agent.worker_pid()) - cpu0) / n as f64 * 1e6);
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
        let (d, t) = pipe_run(Some(&agent), true, n, 65536, rate_mib << 20, None);
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

/// One way of serving volume files, measured against tmpfs: the writers' speed, the time until
/// captured, the agent's CPU per GB and memory, write()-to-capture latency.
fn volume_mode(a: &Args, tmpfs: &Tmpfs, name: &str, setup: Setup, rows: &mut Vec<String>, figures: &mut Vec<String>) {
    let agent = Agent::start(setup.clone());
    let vol = agent.volume("bench");
    let pid = agent.worker_pid();
    let cpu0 = cpu_seconds(pid);
    let mut expected = captured_records(&agent);
    let mut lost = 0;

    // 100-byte lines, one write() each; tmpfs and the volume alternate.
    let (mut base, mut ours, mut captured) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let t = write_lines(&tmpfs.0.join(format!("lines{round}.log")), a.lines);
        base.push(a.lines as f64 / t.as_secs_f64());
        std::fs::remove_file(tmpfs.0.join(format!("lines{round}.log"))).ok();
        let start = Instant::now();
        let t = write_lines(&vol.join(format!("lines{round}.log")), a.lines);
        ours.push(a.lines as f64 / t.as_secs_f64());
        let missing = wait_captured_or_lost(&agent, expected + a.lines as u64);
        expected += a.lines as u64 - missing;
        lost += missing;
        captured.push(a.lines as f64 / start.elapsed().as_secs_f64());
        std::fs::remove_file(vol.join(format!("lines{round}.log"))).ok();
    }
    let (b, o, c) = (median(base), median(ours), median(captured));
    rows.push(format!(
        "| {name} | 100-byte lines, 1 write() each ({}) | {b:.0} lines/s | {o:.0} lines/s ({:.0} %) | {c:.0} lines/s ({:.0} %) |",
        a.lines,
        100.0 * o / b,
        100.0 * c / b
    ));

    // dd with 4 KiB, 64 KiB and 1 MiB blocks from a source in memory.
    let src = tmpfs.0.join("src.txt");
    if !src.exists() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("src"));
        let line = [b'y'; 99];
        for _ in 0..(a.dd_mib << 20) / 100 {
            f.write_all(&line).and_then(|()| f.write_all(b"\n")).expect("src write");
        }
    }
    let src_lines = ((a.dd_mib << 20) / 100) as u64;
    let mib = (src_lines * 100) as f64 / (1 << 20) as f64;
    for bs in ["4k", "64k", "1M"] {
        let (mut base, mut ours, mut captured) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..a.rounds {
            let dst = tmpfs.0.join(format!("dd{round}"));
            base.push(mib / dd(&src, &dst, bs).as_secs_f64());
            std::fs::remove_file(dst).ok();
            let dst = vol.join(format!("dd{bs}{round}.log"));
            let start = Instant::now();
            ours.push(mib / dd(&src, &dst, bs).as_secs_f64());
            let missing = wait_captured_or_lost(&agent, expected + src_lines);
            expected += src_lines - missing;
            lost += missing;
            captured.push(mib / start.elapsed().as_secs_f64());
            std::fs::remove_file(dst).ok();
        }
        let (b, o, c) = (median(base), median(ours), median(captured));
        rows.push(format!(
            "| {name} | dd bs={bs} ({mib:.0} MiB) | {b:.0} MiB/s | {o:.0} MiB/s ({:.0} %) | {c:.0} MiB/s ({:.0} %) |",
            100.0 * o / b,
            100.0 * c / b
        ));
    }
    let cpu = cpu_seconds(pid) - cpu0;
    agent.wait_idle(Duration::from_secs(120));
    let stats = agent.stats();
    let bytes: u64 = stats["volumes"]
        .as_array()
        .map_or(0, |v| v.iter().map(|v| v["captured_bytes_total"].as_u64().unwrap_or(0)).sum());
    let dropped: u64 = stats["volumes"]
        .as_array()
        .map_or(0, |v| v.iter().map(|v| v["dropped_bytes_total"].as_u64().unwrap_or(0)).sum());
    let rss = status_mib(pid, "VmHWM");
    let rss_file = status_mib(pid, "RssFile");
    let capacity_mib = stats["ring"]["capacity_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    drop(agent);
    let lat = latency(&Setup { sink: Sink::Stdout, ..setup });
    figures.push(format!(
        "| {name} | {:.2} s/GB ({:.2} GB) | {lost} lines never captured, {dropped} bytes dropped | {:.0} MiB (ring {capacity_mib:.0} MiB) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        cpu / (bytes as f64 / 1e9),
        bytes as f64 / 1e9,
        rss - rss_file,
        lat.0 * 1e3,
        lat.1 * 1e3,
        lat.2 * 1e3
    ));
}

/// write()-to-capture latency, one line every 10 ms into a file that stays open: p50, p99, max.
fn latency(setup: &Setup) -> (f64, f64, f64) {
    let mut agent = Agent::start(setup.clone());
    let out = read_json_lines(agent.take_stdout());
    let vol = agent.volume("lat");
    let mut f = OpenOptions::new().create(true).append(true).open(vol.join("app.log")).expect("open");
    for i in 0..500 {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        writeln!(f, "{i} {now}").expect("write");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
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
    assert_eq!(lat.len(), 500, "every latency line captured");
    lat.sort_by(|a, b| a.total_cmp(b));
    (quantile(&lat, 0.5), quantile(&lat, 0.99), lat.last().copied().unwrap_or(f64::NAN))
}

/// Volumes against tmpfs, for each way of serving files, and a previous build (on its
/// default) when `LOGTAP_BASELINE_BIN` is set.
fn volumes(a: &Args) {
    let work = tempfile::Builder::new().prefix("logtap-bench-").tempdir().expect("tempdir");
    let tmpfs = Tmpfs::new(&work.path().join("tmpfs"));
    let (mut rows, mut figures) = (Vec::new(), Vec::new());
    let mut modes: Vec<(String, Setup)> = [Serving::Passthrough, Serving::Requests, Serving::Writeback]
        .into_iter()
        .filter(|s| a.serving.as_deref().is_none_or(|only| only == s.name()))
        .map(|serving| (format!("{} (this build)", serving.name()), Setup { serving, ..Setup::default() }))
        .collect();
    if let Some(bin) = std::env::var_os("LOGTAP_BASELINE_BIN").filter(|_| a.serving.is_none()) {
        let setup = Setup { bin: Some(bin.into()), ..Setup::default() };
        modes.insert(0, ("previous build (its default)".into(), setup));
    }
    for (name, setup) in modes {
        volume_mode(a, &tmpfs, &name, setup, &mut rows, &mut figures);
    }
    table("| agent | workload | tmpfs | writer into the volume | until captured |", &rows);
    table("| agent | CPU per GB captured (user+sys, files sink included) | lost | peak RSS, anonymous | write()-to-capture, 1 line / 10 ms |", &figures);
}

/// CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal).
fn system_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| ticks.get(i)).sum::<f64>() / hz
}

/// Bytes written to the machine's disks so far, after a sync (written-back page cache counts).
fn disk_written_bytes() -> u64 {
    let _ = Command::new("sync").status();
    let Ok(blocks) = std::fs::read_dir("/sys/block") else { return 0 };
    blocks
        .flatten()
        .filter(|b| !["loop", "ram", "zram"].iter().any(|p| b.file_name().to_string_lossy().starts_with(p)))
        .filter_map(|b| std::fs::read_to_string(b.path().join("stat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(6)?.parse::<u64>().ok())
        .sum::<u64>()
        * 512
}

/// The agents the identity benchmark compares: a previous build (`LOGTAP_BASELINE_BIN`), if
/// named, and this one.
fn builds() -> Vec<(&'static str, Option<PathBuf>)> {
    let mut builds = vec![("this build", None)];
    if let Some(bin) = std::env::var_os("LOGTAP_BASELINE_BIN") {
        builds.insert(0, ("previous build", Some(PathBuf::from(bin))));
    }
    builds
}

/// What deciding by pipe identity costs: writers not watched (what every process on the host
/// pays for the attached programs) and watched, with no agent, a previous build and this one,
/// alternating per round.
fn identity(a: &Args) {
    let n = a.lines;
    // (label, watched, OUT of `pipe-writer flood`, or `dd` for the shell pipeline).
    let works: [(&str, bool, Option<&str>); 6] = [
        ("unwatched, fd 1 (a pipe), pinned", false, None),
        ("unwatched, fd 3 (/dev/null, no pipe), pinned", false, Some("/dev/null")),
        ("unwatched, dd bs=100 piped into cat, unpinned", false, Some("dd")),
        ("watched, fd 1 (its stdout pipe), pinned", true, None),
        ("watched, fd 3 (/dev/null, no pipe), pinned", true, Some("/dev/null")),
        ("watched, /dev/stdout opened again (fd 3), pinned", true, Some("/dev/stdout")),
    ];
    let builds = builds();
    // rates[work][0]: no agent; then one column per build. captured[work][build]: records.
    let mut rates = vec![vec![Vec::new(); builds.len() + 1]; works.len()];
    let mut captured = vec![vec![0u64; builds.len()]; works.len()];
    let once = |agent: Option<&Agent>, watch: bool, out: Option<&str>| match out {
        Some("dd") => {
            let start = Instant::now();
            let script = format!("dd if=/dev/zero bs=100 count={n} status=none | cat > /dev/null");
            assert!(Command::new("sh").args(["-c", &script]).status().expect("sh").success());
            (n as f64 / start.elapsed().as_secs_f64(), None)
        }
        _ => {
            let (d, t) = pipe_run(agent, watch, n, 100, 0, out);
            (n as f64 / d.as_secs_f64(), t)
        }
    };
    for _ in 0..a.rounds {
        for (w, (_, _, out)) in works.iter().enumerate() {
            rates[w][0].push(once(None, false, *out).0);
        }
        for (b, (_, bin)) in builds.iter().enumerate() {
            let agent = Agent::start(Setup { bin: bin.clone(), ..Setup::default() });
            for (w, (_, watch, out)) in works.iter().enumerate() {
                let (rate, t) = once(Some(&agent), *watch, *out);
                rates[w][b + 1].push(rate);
                captured[w][b] += t.map_or(0, |t| t["captured_records_total"].as_u64().unwrap_or(0));
            }
        }
    }
    let mut rows = Vec::new();
    for (w, (label, watch, _)) in works.iter().enumerate() {
        let m: Vec<f64> = rates[w].iter().map(|r| median(r.clone())).collect();
        let mut row = format!("| {label} | {:.0} lines/s |", m[0]);
        for b in 0..builds.len() {
            let got = if *watch { format!(", {} of {} captured", captured[w][b], n * a.rounds) } else { String::new() };
            row += &format!(" {:.0} lines/s ({:.0} %{got}) |", m[b + 1], 100.0 * m[b + 1] / m[0]);
        }
        if builds.len() == 2 {
            row += &format!(" {:.0} % |", 100.0 * m[2] / m[1]);
        }
        rows.push(row);
    }
    let mut header = format!("| 100-byte writes ({n} per run, {} rounds, median) | no agent |", a.rounds);
    for (name, _) in &builds {
        header += &format!(" {name} |");
    }
    if builds.len() == 2 {
        header += " this / previous |";
    }
    table(&header, &rows);
}

/// Container stdout against the runtime's own logging: the same containers with
/// `--log-driver none` and no agent (the baseline), with the runtime writing a `k8s-file` log
/// (what a tailing agent then reads; no tailer runs here), and with `--log-driver none` and
/// logtap capturing their pipes (at nice -10 as the systemd unit runs it, files sink on a
/// tmpfs, as a network sink would leave the disk alone). The whole machine's CPU time from the
/// start to delivery, above the baseline's.
fn container_stdout(a: &Args) {
    let podman = logtap_e2e::podman::Podman::start(None);
    let work = tempfile::Builder::new().prefix("logtap-bench-").tempdir().expect("tempdir");
    let sink = Tmpfs::new(&work.path().join("sink"));
    let logs = work.path().join("k8s-file");
    let many = format!("{} containers, fd 1", a.containers);
    let cases: [(&str, usize, Option<&str>); 3] = [
        ("1 container, fd 1", 1, None),
        ("1 container, /dev/stdout opened again", 1, Some("/dev/stdout")),
        (&many, a.containers, None),
    ];
    let modes = ["no logging", "k8s-file", "logtap"];
    let mut rows = Vec::new();
    for (label, count, reopen) in cases {
        let n = a.lines / count;
        let gb = (n * count * 100) as f64 / 1e9;
        // Per mode, per round: CPU seconds, seconds until delivered, disk bytes, lines delivered.
        let mut runs: Vec<Vec<(f64, f64, u64, usize)>> = vec![Vec::new(); modes.len()];
        for round in 0..a.rounds {
            for (m, mode) in modes.iter().enumerate() {
                std::fs::create_dir_all(&logs).expect("mkdir");
                let agent = (*mode == "logtap").then(|| {
                    Agent::start(Setup {
                        out: Some(sink.0.join(format!("{round}-{count}-{}", reopen.is_some()))),
                        extra: format!("[discovery]\ndocker_socket = \"{}\"\n", podman.socket.display()),
                        ..Setup::default()
                    })
                });
                if let Some(agent) = &agent {
                    // As deploy/systemd/logtap.service runs it.
                    renice(agent.worker_pid(), -10);
                }
                let k8s_file = (*mode == "k8s-file").then_some(logs.as_path());
                let logging = Logging { reopen, k8s_file, ..TO_STDOUT };
                let (disk0, cpu0) = (disk_written_bytes(), std::cell::Cell::new(0.0));
                let (start, _) = container_run(&podman, count, n, 0, logging, &mut || cpu0.set(system_cpu_seconds()));
                let names: Vec<String> = (0..count).map(|i| format!("bench-{i:02}")).collect();
                let delivered = |name: &str| match &agent {
                    Some(agent) => sink_line_count(&agent.out, name, "stdout"),
                    // Whole lines ("F"); conmon writes a line split across reads as parts ("P").
                    None if k8s_file.is_some() => std::fs::read_to_string(logs.join(format!("{name}.log")))
                        .map_or(0, |d| d.lines().filter(|l| l.split(' ').nth(2) == Some("F")).count()),
                    None => n,
                };
                // Cheap checks first: reading every file, or asking the agent for its stats, at
                // each poll takes CPU from the agent (20 writers leave it little: its BPF ring
                // buffer then overflows) and counts in the machine's CPU time.
                let done = || match &agent {
                    Some(agent) => names.iter().all(|c| sink_bytes(&agent.out, c, "stdout") >= (n * 100) as u64),
                    None if k8s_file.is_some() => names.iter().all(|c| {
                        let full = std::fs::metadata(logs.join(format!("{c}.log"))).map_or(0, |m| m.len());
                        // Each whole line: its 100 bytes after a prefix of at least 40 (time, stream, tag).
                        full >= (n * 140) as u64 && delivered(c) >= n
                    }),
                    None => true,
                };
                let deadline = Instant::now() + Duration::from_secs(120);
                while !done() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let took = SystemTime::now().duration_since(start).unwrap_or_default().as_secs_f64();
                let cpu = system_cpu_seconds() - cpu0.get();
                let lines: usize = names.iter().map(|c| delivered(c)).sum();
                if let (Some(agent), true) = (&agent, lines < n * count) {
                    eprintln!("{label}, round {round}: {lines} of {} delivered: {}", n * count, agent.stats()["pipes"]);
                }
                runs[m].push((cpu, took, disk_written_bytes() - disk0, lines));
                drop(agent);
                let _ = std::fs::remove_dir_all(&logs);
            }
        }
        let med = |m: usize, f: fn(&(f64, f64, u64, usize)) -> f64| median(runs[m].iter().map(f).collect());
        let base_cpu = med(0, |r| r.0);
        for (m, mode) in modes.iter().enumerate() {
            let worst = runs[m].iter().map(|r| r.3).min().unwrap_or(0);
            let above =
                if m == 0 { "baseline".to_string() } else { format!("{:.1} s/GB", (med(m, |r| r.0) - base_cpu) / gb) };
            rows.push(format!(
                "| {label} | {mode} | {:.2} s | {above} | {:.2} s | {:.0} MB | {worst} of {} |",
                med(m, |r| r.0),
                med(m, |r| r.1),
                med(m, |r| r.2 as f64) / 1e6,
                n * count
            ));
        }
    }
    table(
        &format!(
            "| {} x 100-byte lines in all, as fast as they go, {} rounds (median) | logging | machine CPU, start to delivered | CPU per GB above no logging | until delivered | disk written | lines delivered (worst round) |",
            a.lines, a.rounds
        ),
        &rows,
    );
}

/// Waits until the files sink's line count for `service`/`module` reaches `n` or stops
/// growing for 3 s (a build that dropped lines); returns the count.
fn wait_sink_lines(out: &Path, service: &str, module: &str, n: usize) -> usize {
    let (mut last, mut since) = (sink_line_count(out, service, module), Instant::now());
    while last < n && since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
        let now = sink_line_count(out, service, module);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// The ring alone, in this process: one thread pushes batches of 4096 records (as a source
/// does), 1 or 3 threads read and acknowledge them (as sinks do); records/s and CPU per record.
fn ring_in_process(rows: &mut Vec<String>) {
    for (len, n) in [(2usize, 8_000_000usize), (100, 4_000_000)] {
        for readers in [1usize, 3] {
            let (rate, cpu) = ring_alone::run(len, n, readers);
            rows.push(format!(
                "| {len}-byte records x {n} | {readers} | {rate:.0} records/s ({:.0} MB/s of lines) | {cpu:.3} us |",
                rate * len as f64 / 1e6
            ));
        }
    }
}

/// The ring and records of the logtap library, driven as the agent's sources and sinks do.
mod ring_alone {
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime};

    use logtap::counters::StreamCounters;
    use logtap::record::{Origin, Record};
    use logtap::ring::{Policy, Rates, Ring};

    fn process_cpu() -> f64 {
        // SAFETY: getrusage into a zeroed struct.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    }

    /// Pushes `n` records of `len` bytes through a 64 MiB ring read by `readers`; returns
    /// records/s and CPU microseconds per record (pusher and readers together).
    pub fn run(len: usize, n: usize, readers: usize) -> (f64, f64) {
        let ring =
            Arc::new(Ring::new(64 << 20, Policy::Block, Duration::from_secs(60), Rates::default()).expect("ring"));
        let ids: Vec<_> = (0..readers).map(|i| ring.add_reader(&format!("r{i}"), false)).collect();
        let origin = Arc::new(Origin {
            host: "h".into(),
            pid: 1,
            volume: "".into(),
            service: "bench".into(),
            module: "stdout".into(),
            path: "stdout".into(),
            tenant: "".into(),
            container: None,
            counters: StreamCounters::detached(),
        });
        let block = Record {
            captured_at: SystemTime::now(),
            origin,
            seq: 0,
            bytes: vec![b'x'; len * 4096].into(),
            split: false,
            unterminated: false,
        };
        let cpu0 = process_cpu();
        let start = Instant::now();
        let sinks: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut got = 0;
                    while got < n {
                        match ring.try_read(id, 4096, 4 << 20) {
                            Some(batch) => {
                                got += batch.records.len();
                                ring.ack(id, batch.end);
                            }
                            None => std::thread::yield_now(),
                        }
                    }
                })
            })
            .collect();
        let mut seq = 0u64;
        while (seq as usize) < n {
            let batch: Vec<Record> = (0..4096.min(n - seq as usize))
                .map(|i| {
                    seq += 1;
                    Record { seq, bytes: block.bytes.slice(i * len..(i + 1) * len), ..block.clone() }
                })
                .collect();
            ring.push(batch);
        }
        for s in sinks {
            s.join().expect("reader");
        }
        let took = start.elapsed().as_secs_f64();
        (n as f64 / took, (process_cpu() - cpu0) / n as f64 * 1e6)
    }
}

/// `logtap run --service SERVICE -- PROGRAM ARGS` with the build's own CLI, to its end.
fn run_captured(agent: &Agent, bin: &Option<PathBuf>, service: &str, program: &str, args: &[&str]) {
    let cli = bin.clone().unwrap_or_else(logtap_e2e::logtap_bin);
    let ok = Command::new(cli)
        .args(["run", "--service", service, "--socket"])
        .arg(&agent.socket)
        .arg("--")
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("logtap run");
    assert!(ok.success());
}

/// A row of the burst table: delivered of written (and `more` about it), the ring's drops,
/// the time since `start`, the agent's CPU since `cpu0` and its peak RSS.
fn burst_row(
    build: &str,
    what: &str,
    agent: &Agent,
    (got, written, more): (usize, usize, String),
    start: Instant,
    cpu0: f64,
) -> String {
    let took = start.elapsed().as_secs_f64();
    let ring = agent.stats()["ring"].clone();
    format!(
        "| {build} | {what} | {got} / {written} ({:.2} %){more} | {} | {took:.1} s | {:.2} s | {:.0} MiB |",
        100.0 * got as f64 / written as f64,
        ring["dropped_records_total"],
        cpu_seconds(agent.worker_pid()) - cpu0,
        status_mib(agent.worker_pid(), "VmHWM")
    )
}

/// The ring, this build against a previous one (`LOGTAP_BASELINE_BIN`) in one run: the two
/// bursts of the issue on each build's default config; throughput of 2-byte and 100-byte
/// records through `logtap run` into 1 and 3 files sinks (one ring capacity for both builds,
/// `block`, so nothing is dropped and the time is the pipeline's); memory per million
/// 100-byte records held (a sink that does not read).
fn ring(a: &Args) {
    let mut rows = Vec::new();
    ring_in_process(&mut rows);
    table(
        "| the ring in one process: push 4096 at a time, read and acknowledge 4096 at a time | readers | throughput | CPU per record (all threads) |",
        &rows,
    );
    let builds = builds();
    let mut rows = Vec::new();
    let podman = logtap_e2e::podman::Podman::start(None);
    for (name, bin) in &builds {
        // `logtap run -- head -n 2000000 yes.txt`.
        let agent = Agent::start(Setup { bin: bin.clone(), ..Setup::default() });
        let n = 2_000_000usize;
        let yes = agent.dir.path().join("yes.txt");
        std::fs::write(&yes, "y\n".repeat(n)).expect("yes.txt");
        let cpu0 = cpu_seconds(agent.worker_pid());
        let start = Instant::now();
        run_captured(&agent, bin, "yes", "head", &["-n", &n.to_string(), yes.to_str().expect("path")]);
        let got = wait_sink_lines(&agent.out, "yes", "stdout", n);
        let what = "`logtap run -- head -n 2000000` (2-byte lines)";
        rows.push(burst_row(name, what, &agent, (got, n, String::new()), start, cpu0));
        drop(agent);

        // 20 containers, 50,000 short lines to stdout and 1,000 to stderr each, at once.
        let setup = Setup {
            bin: bin.clone(),
            extra: format!("[discovery]\ndocker_socket = \"{}\"\n", podman.socket.display()),
            ..Setup::default()
        };
        let agent = Agent::start(setup);
        let gate = tempfile::tempdir().expect("tempdir");
        let (count, out, err) = (20usize, 50_000usize, 1_000usize);
        let names: Vec<String> = (0..count).map(|i| format!("burst-{i:02}")).collect();
        for name in &names {
            let body = format!("while [ ! -e /gate/go ]; do sleep 0.01; done; seq {out}; seq {err} >&2");
            let mount = format!("{}:/gate", gate.path().display());
            podman.run(&["-d", "--rm", "--name", name, "-v", &mount, logtap_e2e::podman::IMAGE, "sh", "-c", &body]);
        }
        std::thread::sleep(Duration::from_secs(2));
        let cpu0 = cpu_seconds(agent.worker_pid());
        let start = Instant::now();
        std::fs::write(gate.path().join("go"), "").expect("gate");
        let mut wait = vec!["wait"];
        wait.extend(names.iter().map(String::as_str));
        let _ = podman.output(&wait);
        let mut got = 0;
        let mut short = 0;
        for name in &names {
            let c = wait_sink_lines(&agent.out, name, "stdout", out) + wait_sink_lines(&agent.out, name, "stderr", err);
            got += c;
            short += usize::from(c < out + err);
        }
        let what = "20 containers: `seq 50000; seq 1000 >&2` at once";
        let short = format!(", {short} containers short");
        rows.push(burst_row(name, what, &agent, (got, count * (out + err), short), start, cpu0));
    }
    drop(podman);
    table(
        "| build | burst (default config) | delivered / written | dropped by the ring | until delivered | agent CPU | agent peak RSS |",
        &rows,
    );

    let mut rows = Vec::new();
    for (len, n) in [(2usize, 2_000_000usize), (100, 1_000_000)] {
        for sinks in [1usize, 3] {
            let mut cells = Vec::new();
            for (name, bin) in &builds {
                let mut per_record = Vec::new();
                let mut rate = Vec::new();
                for _ in 0..a.rounds {
                    let extra: String = (1..sinks)
                        .map(|i| format!("[sinks.more{i}]\ntype = \"files\"\ndir = \"/tmp/logtap-bench-more{i}\"\n"))
                        .collect();
                    let agent = Agent::start(Setup {
                        bin: bin.clone(),
                        ring_capacity: "256MiB".into(),
                        policy: "block".into(),
                        block_timeout: "60s".into(),
                        extra,
                        ..Setup::default()
                    });
                    let file = agent.dir.path().join("lines.txt");
                    let mut line = vec![b'x'; len - 1];
                    line.push(b'\n');
                    std::fs::write(&file, line.repeat(n)).expect("lines");
                    let cpu0 = cpu_seconds(agent.worker_pid());
                    let start = Instant::now();
                    run_captured(&agent, bin, "tp", "head", &["-n", &n.to_string(), file.to_str().expect("path")]);
                    let got = wait_sink_lines(&agent.out, "tp", "stdout", n);
                    agent.wait_idle(Duration::from_secs(120));
                    let took = start.elapsed().as_secs_f64();
                    assert_eq!(got, n, "{name}: every record through");
                    per_record.push((cpu_seconds(agent.worker_pid()) - cpu0) / n as f64 * 1e6);
                    rate.push(n as f64 / took);
                    drop(agent);
                    for i in 1..sinks {
                        let _ = std::fs::remove_dir_all(format!("/tmp/logtap-bench-more{i}"));
                    }
                }
                cells.push((name, median(rate), median(per_record)));
            }
            let ratio = match (cells.first(), cells.last()) {
                (Some(b), Some(t)) if cells.len() == 2 => format!("{:.2}x", t.1 / b.1),
                _ => "-".into(),
            };
            let cells: Vec<String> =
                cells.iter().map(|(name, r, c)| format!("{name}: {r:.0} records/s, {c:.2} us CPU/record")).collect();
            rows.push(format!("| {len}-byte records x {n} | {sinks} | {} | {ratio} |", cells.join("; ")));
        }
    }
    table(
        &format!(
            "| `logtap run -- head -n N FILE` into files sinks, {} rounds (median) | sinks | records/s until delivered and agent CPU per record | this / previous (records/s) |",
            a.rounds
        ),
        &rows,
    );

    // Memory per million 100-byte records held: a stdout sink that is never read holds them.
    let mut rows = Vec::new();
    for (name, bin) in &builds {
        let mut agent = Agent::start(Setup {
            bin: bin.clone(),
            sink: Sink::Stdout,
            ring_capacity: "1GiB".into(),
            policy: "block".into(),
            block_timeout: "600s".into(),
            ..Setup::default()
        });
        let _held = agent.take_stdout();
        let n = 1_000_000usize;
        let file = agent.dir.path().join("lines.txt");
        let mut line = vec![b'x'; 99];
        line.push(b'\n');
        std::fs::write(&file, line.repeat(n)).expect("lines");
        let before = status_mib(agent.worker_pid(), "VmRSS");
        run_captured(&agent, bin, "mem", "head", &["-n", &n.to_string(), file.to_str().expect("path")]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.stats()["ring"]["pushed_records_total"].as_u64().unwrap_or(0) < n as u64
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let ring = agent.stats()["ring"].clone();
        let held = ring["records"].as_u64().unwrap_or(0);
        let rss = status_mib(agent.worker_pid(), "VmRSS") - before;
        rows.push(format!(
            "| {name} | {held} | {rss:.0} MiB | {:.0} B | {:.0} MiB |",
            rss * (1 << 20) as f64 / held.max(1) as f64 - 99.0,
            ring["used_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        ));
    }
    table(
        "| build | 100-byte records held | agent RSS growth | beyond the bytes, per record | the ring's own count of bytes used |",
        &rows,
    );
}
