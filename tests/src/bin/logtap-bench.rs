//! Side-by-side benchmarks, printed as Markdown tables (recorded in docs/BENCHMARKS.md). Run
//! with `cargo xtask bench`.
//!
//! - volumes: the same writers into tmpfs and into a logtap volume;
//! - pipes: a pipe writer with no probe, with the eBPF programs attached but the writer not
//!   watched, and watched (captured), plus the rate at which kernel losses begin.
//!
//! Options: `--only volumes|pipes`, `--lines N` (default 1000000), `--dd-mib N` (default 256),
//! `--rounds N` (default 3).

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
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args { lines: 1_000_000, dd_mib: 256, rounds: 3, only: None };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = |i: usize| pair.get(1).and_then(|v| v.parse().ok()).unwrap_or(i);
        match pair[0].as_str() {
            "--lines" => a.lines = value(a.lines),
            "--dd-mib" => a.dd_mib = value(a.dd_mib),
            "--rounds" => a.rounds = value(a.rounds),
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
    if a.only.as_deref() != Some("pipes") {
        volumes(&a);
    }
    if a.only.as_deref() != Some("volumes") {
        pipes(&a);
    }
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
        target = answer["target"].as_u64();
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
    println!("| pipe writer and reader on CPU 0, {} rounds (median) | no probe | probe attached, writer unwatched | watched and captured | agent CPU per captured write (user space, files sink included) | kernel-counted losses (all rounds) |", a.rounds);
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();

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
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
    };

    println!("| workload | tmpfs | logtap volume | logtap / tmpfs |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
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
