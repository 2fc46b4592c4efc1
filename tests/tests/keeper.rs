//! The agent's own life: its worker killed (kill -9) or upgraded under load, while the keeper
//! holds the mount, the volume files and the ring. Writers must never see an error, and every
//! line must arrive (a line twice only from a batch in flight to a sink, and counted).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use logtap_e2e::{log_line, log_lines, Agent, Serving, Setup, Sink};
use serde_json::Value;

const LINE_WRITER: &str = env!("CARGO_BIN_EXE_line-writer");
const PIPE_WRITER: &str = env!("CARGO_BIN_EXE_pipe-writer");
const KILLS: usize = 5;
/// Each 1 MiB writer's file.
const BIG: usize = 8 << 20;
/// A worker killed while it captures a file may capture again what it read last (one read, up
/// to 64 KiB) and had not yet kept the position of: at least once.
const AGAIN_PER_KILL: usize = 64 << 10;

fn paced(path: &std::path::Path, n: u64, len: usize, ms: u64) -> Child {
    Command::new(LINE_WRITER)
        .args(["paced", path.to_str().unwrap(), &n.to_string(), &len.to_string(), &ms.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("line-writer")
}

/// What a paced writer printed; panics unless every write succeeded.
fn finished(w: Child, n: u64) -> String {
    let out = w.wait_with_output().expect("writer");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.starts_with(&format!("ok {n}\n")), "the writer saw an error: {out}");
    out
}

/// Lines delivered against lines written: each written line must be there, in order of first
/// arrival; returns how many records were extra copies.
fn duplicates(got: &[Vec<u8>], want: &[u8]) -> usize {
    let want: Vec<&[u8]> = want.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let mut seen = HashSet::new();
    let firsts: Vec<&[u8]> = got.iter().map(Vec::as_slice).filter(|l| seen.insert(*l)).collect();
    if firsts != want {
        let missing = want.iter().filter(|l| !seen.contains(*l)).count();
        let at = firsts.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(firsts.len().min(want.len()));
        let show = |l: Option<&&[u8]>| l.map(|l| String::from_utf8_lossy(&l[..l.len().min(60)]).into_owned());
        let lens: Vec<usize> =
            firsts[at.saturating_sub(2)..(at + 3).min(firsts.len())].iter().map(|l| l.len()).collect();
        panic!(
            "{} distinct lines delivered of {} written: {missing} missing; at line {at}: {:?} delivered, {:?} \
             written; lengths around it {lens:?}",
            firsts.len(),
            want.len(),
            show(firsts.get(at)),
            show(want.get(at))
        );
    }
    got.len() - firsts.len()
}

/// Bytes of lines delivered twice: at most the records the agent counted as redelivered (of up
/// to `len` bytes) and one read for each of `reads` files being captured when a worker died.
fn at_most_twice(dups: usize, redelivered: u64, len: usize, reads: usize) {
    let bound = redelivered as usize * len + reads * AGAIN_PER_KILL;
    assert!(dups <= bound, "{dups} bytes of lines twice; at most {bound} expected ({redelivered} redelivered)");
}

fn redelivered(stats: &Value) -> u64 {
    stats["last_restart"]["redelivered_records"].as_u64().unwrap_or(0)
}

/// A writer appending a line every 1 ms, and another writing 1 MiB write() calls into one file
/// after another, while the worker is killed five times: no write fails, the volume and its files
/// are there after each restart, and every line arrives.
fn a_killed_worker_costs_the_writers_nothing(serving: Serving) {
    let agent = Agent::start(Setup { serving, ..Setup::default() });
    let vol = agent.volume("kept");
    let n = 8_000;
    let slow = paced(&vol.join("paced.log"), n, 100, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let big = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut files = 0;
            while !stop.load(Ordering::Relaxed) {
                let path = vol.join(format!("mb{files}.log"));
                let out = Command::new(LINE_WRITER)
                    .args(["blocks", path.to_str().unwrap(), &BIG.to_string(), &(1 << 20).to_string(), "1000"])
                    .output()
                    .expect("line-writer");
                assert!(out.status.success(), "a 1 MiB writer failed: {}", String::from_utf8_lossy(&out.stderr));
                files += 1;
                // Paced to what the debug-built agent under test captures: this is about
                // restarts, not about a volume's budget (a writer far faster than capture
                // runs into it with or without restarts, counted as dropped).
                std::thread::sleep(Duration::from_millis(100));
            }
            files
        })
    };
    let mut again = 0;
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(700));
        let stats = agent.kill_worker();
        assert_eq!(stats["restarts"], kill as u64 + 1);
        assert_eq!(stats["last_restart"]["exit"], "killed by signal 9");
        again += redelivered(&stats);
        assert!(vol.join("paced.log").exists(), "the file is there after restart {kill}");
    }
    let out = finished(slow, n);
    stop.store(true, Ordering::Relaxed);
    let files = big.join().expect("the 1 MiB writer");
    assert!(files > 0);

    let got = agent.wait_lines("kept", "paced", n as usize, Duration::from_secs(60));
    let mut dups = duplicates(&got, &log_lines(0, n, 100)) * 100;
    let mut want = log_lines(0, BIG as u64 / 1000 + 1, 1000);
    want.truncate(BIG);
    want.push(b'\n');
    for f in 0..files {
        let module = format!("mb{f}");
        let got = agent.wait_sink_bytes("kept", &module, want.len() as u64, Duration::from_secs(120));
        let got: Vec<Vec<u8>> = got.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
        dups += duplicates(&got, &want) * 1000;
    }
    at_most_twice(dups, again, 1000, KILLS * 2);
    let v = agent.volume_stats("kept");
    assert_eq!(v["dropped_bytes_total"], 0);
    eprintln!("across {KILLS} kills: paced writer {}; {dups} bytes twice", out.lines().nth(1).unwrap_or(""));
}

/// `logtap upgrade --binary BINARY [--keeper]`; returns the pid of the new worker once it serves.
fn upgrade(agent: &Agent, binary: &std::path::Path, keeper: bool) -> i32 {
    let before = agent.worker_pid();
    let mut cmd = Command::new(logtap_e2e::logtap_bin());
    cmd.args(["upgrade", "--binary", binary.to_str().unwrap(), "--socket"]).arg(&agent.socket);
    if keeper {
        cmd.arg("--keeper");
    }
    let out = cmd.output().expect("logtap upgrade");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..500 {
        if let Ok(body) = agent.get("/v1/stats") {
            let s: Value = serde_json::from_slice(&body).unwrap();
            let pid = s["worker_pid"].as_i64().unwrap_or(0) as i32;
            if pid != before && pid != 0 {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no new worker serves after the upgrade to {}", binary.display());
}

/// `logtap upgrade` to another binary, then `logtap upgrade --keeper` to a third, while a
/// writer appends every 1 ms and `logtap run` prints a line every 1 ms: the new worker runs that
/// binary, the keeper re-executes itself under its pid, the writer sees no error, the run's
/// target stays, and every line arrives.
fn an_upgrade_swaps_the_worker_under_a_writer(serving: Serving) {
    let agent = Agent::start(Setup { serving, ..Setup::default() });
    // "New builds": copies of the binary under other names.
    let next = agent.dir.path().join("logtap-next");
    let last = agent.dir.path().join("logtap-last");
    for b in [&next, &last] {
        std::fs::copy(logtap_e2e::logtap_bin(), b).expect("copy the binary");
    }
    let vol = agent.volume("up");
    let n = 4_000;
    let w = paced(&vol.join("app.log"), n, 80, 1);
    let printer = Printer::start(&agent, "up-printer", 4_000);
    std::thread::sleep(Duration::from_millis(800));
    let pid = upgrade(&agent, &next, false);
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe(pid), next, "the new worker runs the new binary");
    assert_eq!(exe(agent.pid()), logtap_e2e::logtap_bin(), "the keeper stays");
    let again = redelivered(&agent.stats());
    std::thread::sleep(Duration::from_millis(500));
    let pid = upgrade(&agent, &last, true);
    assert_eq!(exe(pid), last, "the new worker runs the last binary");
    assert_eq!(exe(agent.pid()), last, "the keeper re-executed itself into it");
    let stats = agent.stats();
    assert_eq!(stats["keeper_pid"], agent.pid(), "under its own pid");
    assert_eq!(stats["restarts"], 2);
    finished(w, n);
    let got = agent.wait_lines("up", "app", n as usize, Duration::from_secs(60));
    let dups = duplicates(&got, &log_lines(0, n, 80)) * 80;
    let stats = agent.stats();
    let again = again + redelivered(&stats);
    at_most_twice(dups, again, 80, 2);
    printer.still_watched(&stats);
    printer.finished(&agent, again);
    // A binary that is not there is refused before the worker is touched.
    let out = Command::new(logtap_e2e::logtap_bin())
        .args(["upgrade", "--binary", "/nonexistent/logtap", "--socket"])
        .arg(agent.dir.path().join("logtap.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(agent.worker_pid(), pid);
    // The re-executed keeper stops as the first one would: SIGTERM, drain, unmount, status 0.
    let mut agent = agent;
    assert_eq!(agent.stop().code(), Some(0));
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(agent.mount.to_str().unwrap()));
}

/// A sink that cannot write (its pipe is not read) holds records in the ring; the worker is
/// killed; once the sink can write again, the new worker delivers everything the ring held.
#[test]
#[ignore = "privileged: mounts FUSE as root (cargo xtask test runs it)"]
fn a_stalled_sink_and_a_killed_worker_lose_nothing_the_ring_held() {
    let mut agent = Agent::start(Setup { sink: Sink::Stdout, ..Setup::default() });
    let stdout = agent.take_stdout();
    let vol = agent.volume("stalled");
    let n = 20_000u64;
    let out = Command::new(LINE_WRITER)
        .args(["lines", vol.join("app.log").to_str().unwrap(), &n.to_string(), "100"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Wait until the ring holds what the stalled sink could not take.
    let mut held = 0;
    for _ in 0..200 {
        held = agent.stats()["ring"]["records"].as_u64().unwrap_or(0);
        if held > 1000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(held > 1000, "the ring holds records for the stalled sink: {held}");
    let stats = agent.kill_worker();
    assert!(stats["last_restart"]["carried_records"].as_u64().unwrap() >= held, "{}", stats["last_restart"]);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                got.push(v["message"].as_str().unwrap_or("").as_bytes().to_vec());
            }
        }
        got
    });
    agent.wait_idle(Duration::from_secs(60));
    assert_eq!(agent.stop().code(), Some(0));
    let got = reader.join().unwrap();
    let mut want = Vec::new();
    for i in 0..n {
        log_line(i, 100, &mut want);
    }
    let dups = duplicates(&got, &want) * 100;
    at_most_twice(dups, redelivered(&stats), 100, 1);
}

/// `logtap run --service SERVICE` of a printer: `n` lines of 100 bytes, one every 1 ms.
struct Printer {
    run: Child,
    service: &'static str,
    n: u64,
    /// Its target's id.
    id: Value,
}

impl Printer {
    fn start(agent: &Agent, service: &'static str, n: u64) -> Printer {
        let mut run = Command::new(logtap_e2e::logtap_bin())
            .args(["run", "--service", service, "--socket"])
            .arg(&agent.socket)
            // 100-byte lines at 100 kB/s.
            .args(["--", PIPE_WRITER, "paced", &n.to_string(), "100", "100000", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("logtap run");
        for _ in 0..500 {
            if let Some(t) = Self::live(&agent.stats(), service) {
                return Printer { run, service, n, id: t["id"].clone() };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = run.kill();
        let _ = run.wait();
        panic!("no target for logtap run --service {service}");
    }

    fn live(stats: &Value, service: &str) -> Option<Value> {
        let targets = stats["pipes"]["targets"].as_array()?;
        targets.iter().find(|t| t["service"] == service && t["ended"] == false).cloned()
    }

    /// The target is there, under the same id, in the stats of a new worker.
    fn still_watched(&self, stats: &Value) {
        assert_eq!(stats["pipes"]["status"], "running", "{}", stats["pipes"]);
        let t = Self::live(stats, self.service).unwrap_or_else(|| panic!("no target {}: {}", self.id, stats["pipes"]));
        assert_eq!(t["id"], self.id, "the target keeps its id");
    }

    /// Waits for the run to end: it never said the capture stopped, passed every line through,
    /// and unwatched its target; every line arrived, at most `twice` of them twice.
    fn finished(self, agent: &Agent, twice: u64) {
        let out = self.run.wait_with_output().expect("logtap run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "logtap run failed: {stderr}");
        assert!(!stderr.contains("NOT captured"), "logtap run says the capture stopped: {stderr}");
        let want: Vec<u8> = (0..self.n).flat_map(|i| format!("{i:08}{}\n", "x".repeat(91)).into_bytes()).collect();
        assert!(out.stdout == want, "logtap run passed {} bytes of {} through", out.stdout.len(), want.len());
        let got = agent.wait_lines(self.service, "stdout", self.n as usize, Duration::from_secs(60));
        let dups = duplicates(&got, &want);
        assert!(dups as u64 <= twice, "{dups} lines twice, at most {twice} expected");
        let s = agent.stats();
        let targets = s["pipes"]["targets"].as_array().expect("targets");
        let t =
            targets.iter().find(|t| t["id"] == self.id).unwrap_or_else(|| panic!("target {}: {}", self.id, s["pipes"]));
        assert_eq!(t["ended"], true, "the run unwatched its target through the last worker");
        assert_eq!(t["lost_events_total"], 0, "{t}");
    }
}

/// `logtap run` printing a line every 1 ms while the worker is killed five times: the eBPF
/// programs stay attached and capture into the BPF ring buffer while no worker runs, the
/// target and its id survive every restart, `logtap run` never says the output is lost, and
/// every line arrives.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_killed_worker_keeps_capturing_logtap_run() {
    let agent = Agent::start(Setup::default());
    let printer = Printer::start(&agent, "printer", 5_000);
    let mut again = 0;
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(600));
        let stats = agent.kill_worker();
        assert_eq!(stats["restarts"], kill as u64 + 1);
        printer.still_watched(&stats);
        again += redelivered(&stats);
    }
    printer.finished(&agent, again);
}

/// A reload (SIGHUP) with other `[pipes]` settings under a `logtap run` printer: the new worker
/// loads the programs anew with the old watch maps copied in, so the run's target goes on under
/// its id, and reads what the old programs captured in the gap first: every line arrives once,
/// also those both programs captured while the new ones attached.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_reload_with_other_pipe_settings_keeps_the_targets_and_reads_the_gap() {
    let agent = Agent::start(Setup::default());
    let printer = Printer::start(&agent, "reloaded", 3_000);
    std::thread::sleep(Duration::from_millis(800));
    let before = agent.worker_pid();
    let mut config = std::fs::read_to_string(&agent.config).unwrap();
    config += "[pipes]\nmax_write_capture = \"32KiB\"\n";
    std::fs::write(&agent.config, config).unwrap();
    agent.signal(libc::SIGHUP);
    let mut stats = agent.stats();
    for _ in 0..500 {
        if let Ok(body) = agent.get("/v1/stats") {
            stats = serde_json::from_slice(&body).unwrap();
            if stats["worker_pid"].as_i64().is_some_and(|p| p as i32 != before) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    printer.still_watched(&stats);
    assert_eq!(stats["last_restart"]["unread_pipe_bytes"], 0, "{}", stats["last_restart"]);
    // What both workers' programs captured while the new ones attached arrives once.
    printer.finished(&agent, 0);
}

logtap_e2e::suite!(passthrough: Passthrough, requests: Requests;
    [a_killed_worker_costs_the_writers_nothing, an_upgrade_swaps_the_worker_under_a_writer]);
