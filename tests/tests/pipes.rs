//! eBPF capture of stdout/stderr pipe writes: real programs loaded into this kernel, real
//! processes writing through write(2) and writev(2).

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use logtap_e2e::{logtap_bin, Agent, Setup};
use serde_json::{json, Value};

const WRITER: &str = env!("CARGO_BIN_EXE_pipe-writer");
const WAIT: Duration = Duration::from_secs(30);

/// `logtap run --service SERVICE -- pipe-writer ARGS`.
fn run(agent: &Agent, service: &str, args: &[&str]) -> Output {
    let out = Command::new(logtap_bin())
        .args(["run", "--service", service, "--socket"])
        .arg(&agent.socket)
        .arg("--")
        .arg(WRITER)
        .args(args)
        .output()
        .expect("logtap run");
    assert!(out.status.success(), "logtap run failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("NOT captured"), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The stats of the (ended) target of `logtap run --service SERVICE`.
fn target(agent: &Agent, service: &str) -> Value {
    for _ in 0..200 {
        let pipes = agent.stats()["pipes"].clone();
        if let Some(t) =
            pipes["targets"].as_array().and_then(|t| t.iter().find(|t| t["service"] == service && t["ended"] == true))
        {
            return t.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no ended target for {service}");
}

/// The files sink's bytes for `service`/`module`, records joined back with newlines.
fn stream(agent: &Agent, service: &str, module: &str, lines: usize) -> Vec<u8> {
    let got = agent.wait_lines(service, module, lines, WAIT);
    let mut out = got.join(&b'\n');
    if !got.is_empty() {
        out.push(b'\n');
    }
    out
}

fn assert_pipes_running(agent: &Agent) {
    let pipes = &agent.stats()["pipes"];
    assert_eq!(pipes["status"], "running", "eBPF capture must load on this machine: {pipes}");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn write_and_writev_are_captured_once_in_order_and_passed_through() {
    let agent = Agent::start(Setup::default());
    assert_pipes_running(&agent);
    let out = run(&agent, "lines", &["lines", "500"]);
    let expected: String = (0..500).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "passed through to the terminal");
    assert_eq!(stream(&agent, "lines", "stdout", 500), expected.as_bytes());

    run(&agent, "vec", &["writev", "50"]);
    let mut expected = String::new();
    for i in 0..50 {
        expected += &format!("v{i}-abc\nnext-def\n");
    }
    // The 10-iovec writev: the first 8 iovecs are followed, the rest counted as truncated.
    expected += "p0p1p2p3p4p5p6p7\n";
    assert_eq!(String::from_utf8_lossy(&stream(&agent, "vec", "stdout", 101)), expected);
    let t = target(&agent, "vec");
    assert_eq!(t["truncated_bytes_total"], "p8p9\n".len() as u64, "{t}");
    assert_eq!(t["writes_total"], 51);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn stdout_and_stderr_are_separate_streams() {
    let agent = Agent::start(Setup::default());
    run(&agent, "both", &["interleaved", "300"]);
    let out: String = (0..300).map(|i| format!("out-{i}\n")).collect();
    let err: String = (0..300).map(|i| format!("err-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&stream(&agent, "both", "stdout", 300)), out);
    assert_eq!(String::from_utf8_lossy(&stream(&agent, "both", "stderr", 300)), err);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn write_sizes_from_1_byte_to_1_mib_and_truncation_is_counted() {
    let agent = Agent::start(Setup::default());
    run(&agent, "sizes", &["sizes"]);
    let got = agent.wait_lines("sizes", "stdout", 10, WAIT);
    let sizes = [1usize, 2, 100, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20];
    assert_eq!(got.len(), sizes.len());
    for (line, size) in got.iter().zip(sizes) {
        // max_write_capture is 64 KiB: longer writes keep their first 64 KiB.
        let kept = (size - 1).min(64 << 10);
        let expected: Vec<u8> = (0..kept).map(|i| b'a' + (i % 26) as u8).collect();
        assert!(*line == expected, "write of {size} bytes: got {} bytes", line.len());
    }
    let target = target(&agent, "sizes");
    assert_eq!(target["truncated_bytes_total"], ((65537 - 65536) + ((1 << 20) - 65536)) as u64);
    assert_eq!(target["written_bytes_total"], sizes.iter().sum::<usize>() as u64);
    assert_eq!(target["writes_total"], sizes.len() as u64);
    assert_eq!(target["lost_events_total"], 0);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn threads_and_child_processes_are_followed() {
    let agent = Agent::start(Setup::default());
    run(&agent, "threads", &["threads", "2000"]);
    let got: Vec<String> = agent
        .wait_lines("threads", "stdout", 8000, WAIT)
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(got.len(), 8000);
    for t in 0..4 {
        let mine: Vec<&String> = got.iter().filter(|l| l.starts_with(&format!("T{t}-"))).collect();
        let expected: Vec<String> = (0..2000).map(|i| format!("T{t}-{i}")).collect();
        assert!(
            mine.iter().map(|s| s.as_str()).eq(expected.iter().map(String::as_str)),
            "thread {t} whole and in order"
        );
    }

    run(&agent, "kids", &["children", "300"]);
    let got: Vec<String> =
        agent.wait_lines("kids", "stdout", 900, WAIT).iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    for c in 0..3 {
        let mine: Vec<&String> = got.iter().filter(|l| l.starts_with(&format!("child{c}-"))).collect();
        assert_eq!(mine.len(), 300, "child {c}");
    }
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn binary_bytes_and_a_process_exiting_mid_line() {
    let agent = Agent::start(Setup::default());
    run(&agent, "bin", &["binary", "200"]);
    let mut expected = Vec::new();
    for i in 0..200u32 {
        expected.extend((0..64u32).map(|j| ((i * 7 + j * 13) % 256) as u8).filter(|&b| b != b'\n'));
        expected.push(b'\n');
    }
    assert!(stream(&agent, "bin", "stderr", 200) == expected, "binary bytes unchanged");

    run(&agent, "mid", &["exit-mid-line"]);
    let got = agent.wait_lines("mid", "stdout", 2, WAIT);
    assert_eq!(got, vec![b"complete".to_vec(), b"partial at exit".to_vec()]);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn only_pipes_of_watched_processes_are_captured() {
    let agent = Agent::start(Setup::default());
    let file = agent.dir.path().join("redirected.txt");
    run(&agent, "redir", &["redirected", file.to_str().unwrap()]);
    assert_eq!(agent.wait_lines("redir", "stdout", 1, WAIT), vec![b"marker".to_vec()]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.sink_lines("redir", "stdout"),
        vec![b"marker".to_vec()],
        "the file and /dev/null writes are not captured"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "to the file\n");

    // An unwatched process writing to a pipe at the same time leaves no trace.
    let unwatched = Command::new(WRITER).args(["lines", "200", "unwatched"]).stdout(Stdio::piped()).output().unwrap();
    assert_eq!(unwatched.stdout.len(), (0..200).map(|i| format!("unwatched-{i}\n").len()).sum::<usize>());
    run(&agent, "after", &["lines", "1"]);
    agent.wait_lines("after", "stdout", 1, WAIT);
    let services: Vec<String> =
        std::fs::read_dir(&agent.out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!services.iter().any(|s| s.contains("pid-")), "{services:?}");
    let delivered = agent.stats()["sinks"][0]["delivered_records_total"].as_u64().unwrap();
    assert_eq!(delivered, 2, "marker and the one line; nothing from the unwatched process");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_non_blocking_pipe_with_a_slow_reader_is_captured_once() {
    let agent = Agent::start(Setup::default());
    let mut child = Command::new(WRITER)
        .args(["nonblock", "3000", "1000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let watched = agent.post("/v1/watch", &json!({"pid": child.id(), "service": "nb"})).unwrap();
    let target: Value = serde_json::from_slice(&watched).unwrap();
    child.stdin.take().unwrap().write_all(b"g").unwrap();
    // Read slowly: the writer meets EAGAIN and short writes, and retries.
    let mut out = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(child.wait().unwrap().success());
    let expected: Vec<u8> = (0..3000)
        .flat_map(|i| {
            let mut line = format!("nb-{i:06}-").into_bytes();
            line.resize(999, b'x');
            line.push(b'\n');
            line
        })
        .collect();
    assert!(got == expected, "the reader got everything");
    assert!(stream(&agent, "nb", "stdout", 3000) == expected, "captured once, in order, short writes included");
    let t = &agent.stats()["pipes"]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == target["target"])
        .cloned()
        .unwrap();
    assert_eq!(t["written_bytes_total"], expected.len() as u64, "only bytes the kernel accepted: {t}");
    assert!(t["writes_total"].as_u64().unwrap() >= 3000);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn bad_targets_are_refused_clearly() {
    let agent = Agent::start(Setup::default());
    for (body, needle) in [
        (json!({"pid": 999_999_999u32}), "no process"),
        (json!({"cgroup": "/nonexistent/cgroup"}), "no cgroup"),
        (json!({"pid": 1, "cgroup": "/sys/fs/cgroup"}), "exactly one"),
        (json!({}), "exactly one"),
        (json!({"pid": 1, "service": "../x"}), "invalid service"),
        (json!({"pod": 1}), "unknown field"),
    ] {
        let e = agent.post("/v1/watch", &body).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains(needle), "{body}: {e}");
    }
    // The same process twice: the second is refused, the first keeps it.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    agent.post("/v1/watch", &json!({"pid": sleeper.id(), "service": "first"})).unwrap();
    let e = agent.post("/v1/watch", &json!({"pid": sleeper.id(), "service": "second"})).unwrap_err().to_string();
    assert!(e.contains("already watched by target"), "{e}");
    sleeper.kill().unwrap();
    let _ = sleeper.wait();
    let e = agent.post("/v1/unwatch", &json!({"target": "0-4000"})).unwrap_err().to_string();
    assert!(e.contains("no target"), "{e}");
    let out = Command::new(logtap_bin())
        .args(["watch", "--pid", "999999999", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no process"));
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn without_kernel_btf_the_agent_says_why_and_volumes_keep_working() {
    // A private mount namespace where /sys/kernel/btf is empty: the programs cannot be fitted
    // to this kernel, so they must not load.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("logtap.toml");
    std::fs::write(&config, Setup::default().toml(dir.path())).unwrap();
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs none /sys/kernel/btf && exec {} daemon --config {}",
        logtap_bin().display(),
        config.display()
    );
    let mut daemon = Command::new("unshare").args(["--mount", "sh", "-c", &script]).spawn().unwrap();
    let agent_socket = dir.path().join("logtap.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let get = |path: &str| rt.block_on(logtap::control::client::call(&agent_socket, hyper::Method::GET, path, None));
    let mut stats = None;
    for _ in 0..200 {
        if let Ok(body) = get("/v1/stats") {
            stats = Some(serde_json::from_slice::<Value>(&body).unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = stats.expect("the agent started without BTF");
    assert_eq!(stats["pipes"]["status"], "unavailable");
    assert!(stats["pipes"]["reason"].as_str().unwrap().contains("BTF"), "{}", stats["pipes"]);
    // The volumes work: write through the agent's own mount namespace.
    let pid = daemon.id().to_string();
    let mount = dir.path().join("volumes");
    let write = format!("mkdir {0}/v && echo still-here >> {0}/v/app.log", mount.display());
    assert!(Command::new("nsenter")
        .args(["--target", &pid, "--mount", "sh", "-c", &write])
        .status()
        .unwrap()
        .success());
    let sink = dir.path().join("out/v");
    let mut found = false;
    for _ in 0..100 {
        if std::fs::read_dir(&sink).map(|d| d.count() > 0).unwrap_or(false) {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(found, "the volume's line reached the files sink");
    // SAFETY: signalling our child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

/// The cgroup v2 hierarchy (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_root() -> std::path::PathBuf {
    for c in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if std::path::Path::new(c).join("cgroup.procs").exists()
            && std::path::Path::new(c).join("cgroup.subtree_control").exists()
        {
            return c.into();
        }
    }
    panic!("no cgroup v2 hierarchy on this machine");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_cgroup_is_watched_with_every_process_in_it() {
    let agent = Agent::start(Setup::default());
    let cgroup = cgroup2_root().join(format!("logtap-test-{}", std::process::id()));
    std::fs::create_dir(&cgroup).unwrap();
    let mut child =
        Command::new(WRITER).args(["flood", "500", "40"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
    let watched = agent.post("/v1/watch", &json!({"cgroup": cgroup, "service": "cg"})).unwrap();
    assert!(serde_json::from_slice::<Value>(&watched).unwrap()["target"].is_string());
    child.stdin.take().unwrap().write_all(b"g").unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    let got = agent.wait_lines("cg", "stdout", 500, WAIT);
    assert_eq!(got.len(), 500);
    assert!(got.iter().all(|l| *l == vec![b'x'; 39]));
    agent.post("/v1/unwatch", &json!({"cgroup": cgroup})).unwrap();
    // The process has exited: the cgroup is empty and can go.
    std::fs::remove_dir(&cgroup).unwrap();
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn logtap_run_exits_with_the_commands_status() {
    let agent = Agent::start(Setup::default());
    let status = Command::new(logtap_bin())
        .args(["run", "--service", "st", "--socket"])
        .arg(&agent.socket)
        .args(["--", "sh", "-c", "echo before failing; exit 3"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    assert_eq!(agent.wait_lines("st", "stdout", 1, WAIT), vec![b"before failing".to_vec()]);
    // A command that cannot be started is an error, not a silent success.
    let out = Command::new(logtap_bin())
        .args(["run", "--socket"])
        .arg(&agent.socket)
        .args(["--", "/nonexistent/cmd"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run /nonexistent/cmd"));
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn static_targets_from_the_config_are_watched_from_the_start() {
    let cgroup = cgroup2_root().join(format!("logtap-static-{}", std::process::id()));
    std::fs::create_dir(&cgroup).unwrap();
    let extra =
        format!("[[pipes.targets]]\ncgroup = \"{}\"\nservice = \"static\"\nmodule = \"app\"\n", cgroup.display());
    let agent = Agent::start(Setup { extra, ..Setup::default() });
    let mut child =
        Command::new(WRITER).args(["flood", "100", "20"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
    child.stdin.take().unwrap().write_all(b"g").unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    let got = agent.wait_lines("static", "app", 100, WAIT);
    assert_eq!(got.len(), 100, "the configured module names the records");
    let targets = agent.stats()["pipes"]["targets"].clone();
    assert!(
        targets.as_array().unwrap().iter().any(|t| t["service"] == "static" && t["writes_total"] == 100),
        "{targets}"
    );
    drop(agent);
    std::fs::remove_dir(&cgroup).unwrap();
}

/// `logtap run --service SERVICE -- sh -c SCRIPT`, its stdout and stderr piped.
fn spawn_sh(agent: &Agent, service: &str, script: &str) -> std::process::Child {
    Command::new(logtap_bin())
        .args(["run", "--service", service, "--socket"])
        .arg(&agent.socket)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logtap run")
}

/// [`spawn_sh`], waited for.
fn run_sh(agent: &Agent, service: &str, script: &str) -> Output {
    let out = spawn_sh(agent, service, script).wait_with_output().expect("logtap run");
    assert!(out.status.success(), "logtap run failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A pipeline inside the command: only what reaches the command's own stdout is its output;
/// the inner pipe's bytes are counted as other-pipe bytes, not delivered.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn logtap_run_captures_the_commands_output_not_its_inner_pipes() {
    let agent = Agent::start(Setup::default());
    assert_pipes_running(&agent);
    let out = run_sh(&agent, "pipeline", "seq 1 100000 | tail -n 5; yes | head -n 1000; echo err >&2");
    let expected: Vec<String> =
        (99_996..=100_000).map(|i| i.to_string()).chain(std::iter::repeat_n("y".to_string(), 1000)).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected.join("\n") + "\n", "passed through unchanged");
    let got = agent.wait_lines("pipeline", "stdout", expected.len(), WAIT);
    let t = target(&agent, "pipeline");
    agent.wait_idle(WAIT);
    let got_all = agent.sink_lines("pipeline", "stdout");
    assert_eq!(got.len(), got_all.len());
    assert!(logtap_e2e::as_strings(&got_all) == expected, "{} records, expected {}", got_all.len(), expected.len());
    assert_eq!(logtap_e2e::as_strings(&agent.wait_lines("pipeline", "stderr", 1, WAIT)), vec!["err"]);
    // seq's 588,895 bytes went into the pipe to tail, and yes wrote to head's pipe: not output.
    assert!(t["other_pipe_bytes_total"].as_u64().unwrap() >= 588_895, "{t}");
    assert_eq!(t["captured_records_total"], expected.len() as u64 + 1, "{t}");
}

/// Target ids never repeat across agent restarts: a `logtap run` that outlived its agent says at
/// once that its output is no longer captured, and its end does not cut another run's capture.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_run_that_outlives_the_agent_says_so_at_once_and_leaves_other_runs_alone() {
    use std::io::BufRead;
    let mut agent = Agent::start(Setup::default());
    assert_pipes_running(&agent);
    let mut first = spawn_sh(&agent, "first", "echo before; sleep 6; echo after");
    assert_eq!(logtap_e2e::as_strings(&agent.wait_lines("first", "stdout", 1, WAIT)), vec!["before"]);
    agent.restart();
    let restarted = std::time::Instant::now();
    // The second run gets a target on the new agent while the first still runs.
    let second = spawn_sh(&agent, "second", "sleep 7; for i in 1 2 3; do echo second $i; done");
    let stderr = std::io::BufReader::new(first.stderr.take().unwrap());
    let mut said_at = None;
    let mut said = String::new();
    for line in stderr.lines().map_while(Result::ok) {
        said_at.get_or_insert_with(std::time::Instant::now);
        said += &line;
    }
    let first_exit = first.wait().unwrap();
    let ended = std::time::Instant::now();
    assert!(first_exit.success());
    assert!(said.contains("NOT captured from here on"), "{said}");
    assert!(!said.contains("400"), "the end of the run must not try the old id: {said}");
    let said_at = said_at.expect("a warning on stderr");
    assert!(ended.duration_since(said_at) > Duration::from_secs(3), "said at the end, not at once: {said}");
    assert!(said_at.duration_since(restarted) < Duration::from_secs(3), "{said}");
    let second = second.wait_with_output().unwrap();
    assert!(second.status.success() && second.stderr.is_empty(), "{}", String::from_utf8_lossy(&second.stderr));
    let got = agent.wait_lines("second", "stdout", 3, WAIT);
    assert_eq!(logtap_e2e::as_strings(&got), vec!["second 1", "second 2", "second 3"]);
}

/// A target that runs many short processes keeps a bounded list of streams: an exited
/// process's counts stay in the target's totals and its own entry goes.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn exited_processes_leave_their_counts_in_the_totals_not_in_a_growing_list() {
    let agent = Agent::start(Setup::default());
    assert_pipes_running(&agent);
    run_sh(&agent, "many", "for i in $(seq 1 300); do /bin/echo line $i; done");
    let got = agent.wait_lines("many", "stdout", 300, WAIT);
    assert_eq!(got.len(), 300);
    let t = target(&agent, "many");
    assert_eq!(t["captured_records_total"], 300, "{t}");
    let streams = t["streams"].as_object().map_or(0, |s| s.len());
    assert!(streams <= 2, "{streams} stream entries left for 300 exited processes: {t}");
}

/// The ways of [`logtap_e2e::other_ways_to_stdout`], 5 runs: each line once, in its stream;
/// the spliced bytes counted as lost.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn logtap_run_captures_output_reached_through_any_fd() {
    let agent = Agent::start(Setup::default());
    assert_pipes_running(&agent);
    let script = logtap_e2e::other_ways_to_stdout(WRITER);
    for round in 0..5 {
        let service = format!("ways-{round}");
        let out = run_sh(&agent, &service, &script);
        let (stdout, stderr) = logtap_e2e::other_ways_expected();
        let want = stdout.join("\n") + "\n";
        assert!(out.stdout.starts_with(want.as_bytes()), "passed through unchanged");
        let got_out = agent.wait_lines(&service, "stdout", stdout.len(), WAIT);
        let got_err = agent.wait_lines(&service, "stderr", stderr.len(), WAIT);
        let t = target(&agent, &service);
        agent.wait_idle(WAIT);
        assert_eq!(got_out.len(), agent.sink_lines(&service, "stdout").len(), "nothing more came");
        logtap_e2e::assert_lines(&logtap_e2e::as_strings(&got_out), &stdout, "stdout");
        logtap_e2e::assert_lines(&logtap_e2e::as_strings(&got_err), &stderr, "stderr");
        assert_eq!(t["captured_records_total"], (stdout.len() + stderr.len()) as u64, "{t}");
        assert_eq!(t["spliced_bytes_total"], logtap_e2e::SPLICED_BYTES, "{t}");
    }
}

/// `watch --pid` on a process whose stderr is a file and whose stdout pipe it also reaches
/// through `/dev/stdout` opened again (fd 3): both ways are its stdout, each line once.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_watched_process_writing_its_stdout_pipe_through_another_fd_is_captured() {
    let agent = Agent::start(Setup::default());
    let stderr = std::fs::File::create(agent.dir.path().join("stderr.txt")).unwrap();
    let mut child = Command::new(WRITER)
        .args(["flood", "1000", "100", "0", "/dev/stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    agent.post("/v1/watch", &json!({"pid": child.id(), "service": "again"})).unwrap();
    child.stdin.take().unwrap().write_all(b"g").unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(out.len(), 1000 * 100, "passed through");
    let got = agent.wait_lines("again", "stdout", 1000, WAIT);
    agent.wait_idle(WAIT);
    assert_eq!(agent.sink_lines("again", "stdout").len(), 1000, "each line once");
    assert!(got.iter().all(|l| l.len() == 99 && l.iter().all(|&b| b == b'x')));
}
