//! The agent as a whole: ring policies under a stalled sink, the control socket, bad input,
//! shutdown.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use logtap_e2e::{logtap_bin, numbered, read_json_lines, Agent, Setup, Sink};
use serde_json::json;

/// A sink that stops reading: the stdout sink on a pipe nobody drains. A small ring.
fn stalled(policy: &str) -> Setup {
    Setup {
        sink: Sink::Stdout,
        // The stall (2 s) must not end a line held half-written behind it as a partial record.
        partial_flush: "30s".into(),
        ring_capacity: "256KiB".into(),
        max_record_bytes: "4KiB".into(),
        policy: policy.into(),
        block_timeout: "60s".into(),
        ..Setup::default()
    }
}

/// The ring's `drop_oldest` under a stalled sink, with a source that has nowhere else to keep
/// its records (a pipe, `logtap run`): dropped = written - delivered, exactly, the oldest first.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn drop_oldest_counts_exactly_what_the_sink_missed() {
    let mut agent = Agent::start(stalled("drop_oldest"));
    let stdout = agent.take_stdout();
    let n = 50_000u64;
    let run = Command::new(logtap_bin())
        .args(["run", "--service", "drop", "--socket"])
        .arg(&agent.socket)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_pipe-writer"))
        .args(["lines", &n.to_string(), "d"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(run.success());
    let target = || {
        let pipes = agent.stats()["pipes"].clone();
        pipes["targets"].as_array().and_then(|t| t.iter().find(|t| t["service"] == "drop").cloned()).unwrap()
    };
    let mut t = target();
    for _ in 0..200 {
        if t["captured_records_total"] == n {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        t = target();
    }
    assert_eq!(t["captured_records_total"], n, "{t}");
    assert!(t["dropped_records_total"].as_u64().unwrap() > 0, "the ring overflowed: {t}");

    // Unstall the sink and let it deliver what the ring still holds.
    let reader = read_json_lines(stdout);
    agent.wait_idle(Duration::from_secs(60));
    let stats = agent.stats();
    let t = target();
    assert_eq!(agent.stop().code(), Some(0));
    let delivered = reader.join().unwrap();
    let dropped = t["dropped_records_total"].as_u64().unwrap();
    assert_eq!(delivered.len() as u64, stats["sinks"][0]["delivered_records_total"].as_u64().unwrap());
    assert_eq!(dropped, n - delivered.len() as u64, "dropped = written - delivered, exactly");
    assert_eq!(stats["ring"]["dropped_records_total"].as_u64().unwrap(), dropped);
    // What was delivered is in order, a suffix-biased subsequence: the oldest were dropped.
    let msgs: Vec<&str> = delivered.iter().filter_map(|r| r["message"].as_str()).collect();
    let lines: Vec<String> = (0..n).map(|i| format!("d-{i}")).collect();
    let mut expected = lines.iter().map(String::as_str);
    assert!(msgs.iter().all(|m| expected.any(|e| e == *m)), "delivered lines keep their order");
    assert_eq!(msgs.last().copied(), lines.last().map(String::as_str), "the newest survive");
}

/// A stalled sink and a volume writer, under either policy: the writer is not held back, the
/// ring drops nothing of the volume's, its lines wait in the file's memory; once the sink moves
/// again every line arrives, in order, and the memory is given back.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_stalled_sink_makes_volume_lines_wait_in_their_file_under_either_policy() {
    for policy in ["drop_oldest", "block"] {
        let mut agent = Agent::start(stalled(policy));
        let mut stdout = agent.take_stdout();
        let vol = agent.volume("wait");
        let lines = numbered("w ", 50_000, 100);
        let start = std::time::Instant::now();
        let mut f = OpenOptions::new().create(true).append(true).open(vol.join("app.log")).unwrap();
        for l in &lines {
            writeln!(f, "{l}").unwrap();
        }
        drop(f);
        let wrote = start.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let v = agent.volume_stats("wait");
        assert!(v["memory_bytes"].as_u64().unwrap() > 1 << 20, "{policy}: the lines wait in the file: {v}");
        assert_eq!(agent.stats()["ring"]["dropped_records_total"], 0, "{policy}");
        // Unstall.
        let mut first = [0u8; 1];
        stdout.read_exact(&mut first).unwrap();
        let reader = read_json_lines(stdout);
        agent.wait_idle(Duration::from_secs(60));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while agent.volume_stats("wait")["captured_records_total"] != lines.len() as u64 {
            assert!(std::time::Instant::now() < deadline, "{policy}: {}", agent.volume_stats("wait"));
            std::thread::sleep(Duration::from_millis(50));
        }
        agent.wait_idle(Duration::from_secs(60));
        let stats = agent.stats();
        assert_eq!(agent.stop().code(), Some(0));
        let delivered = reader.join().unwrap();
        // The first record lost its first byte to the unstalling read above; count it.
        assert_eq!(delivered.len() + 1, lines.len(), "{policy}");
        let msgs: Vec<&str> = delivered.iter().filter_map(|r| r["message"].as_str()).collect();
        assert!(msgs.iter().copied().eq(lines[1..].iter().map(String::as_str)), "{policy}");
        assert_eq!(stats["ring"]["dropped_records_total"], 0, "{policy}");
        let v = &stats["volumes"][0];
        assert_eq!(v["dropped_bytes_total"], 0, "{policy}");
        // What stays is the file's readable tail (64 KiB), given back in steps of 256 KiB.
        assert!(v["memory_bytes"].as_u64().unwrap() <= (64 + 256 + 4) << 10, "{policy}: given back: {v}");
        assert!(wrote < Duration::from_secs(20), "{policy}: the writer was not held back ({wrote:?})");
    }
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn control_socket_serves_stats_metrics_and_volumes() {
    let agent = Agent::start(Setup::default());
    let created =
        agent.post("/v1/volumes", &json!({"name": "web", "service": "shop", "labels": {"team": "a"}})).unwrap();
    let created: serde_json::Value = serde_json::from_slice(&created).unwrap();
    assert_eq!(created["service"], "shop");
    std::fs::write(agent.mount.join("web/access.log"), "GET /\n").unwrap();
    let lines = agent.wait_lines("shop", "access", 1, Duration::from_secs(30));
    assert_eq!(lines, vec![b"GET /".to_vec()]);
    // Same identity again is fine; another identity is a conflict; bad names are refused.
    assert!(agent.post("/v1/volumes", &json!({"name": "web", "service": "shop", "labels": {"team": "a"}})).is_ok());
    let e = agent.post("/v1/volumes", &json!({"name": "web", "service": "other"})).unwrap_err().to_string();
    assert!(e.contains("409"), "{e}");
    for bad in ["../etc", "a/b", "", ".x", &"v".repeat(200)] {
        let e = agent.post("/v1/volumes", &json!({"name": bad})).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("invalid volume name"), "{bad}: {e}");
    }
    let e = agent.post("/v1/volumes", &json!({"nam": "x"})).unwrap_err().to_string();
    assert!(e.contains("400"), "{e}");

    let metrics = String::from_utf8(agent.get("/metrics").unwrap()).unwrap();
    assert!(metrics.contains("logtap_volume_captured_records_total{volume=\"web\",service=\"shop\"} 1"), "{metrics}");
    assert!(metrics.contains("logtap_sink_delivered_records_total{sink=\"files\"} 1"), "{metrics}");
    assert!(agent.get("/nope").unwrap_err().to_string().contains("404"));

    // The CLI: stats table, JSON, volume create and list.
    let bin = logtap_bin();
    let out = Command::new(&bin).arg("stats").arg("--socket").arg(&agent.socket).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("web") && table.contains("shop") && table.contains("files"),
        "{table}"
    );
    assert!(table.contains("pipes (eBPF): running"), "{table}");
    let out = Command::new(&bin)
        .args(["volume", "create", "api", "--service", "billing", "--label", "tier=1"])
        .arg("--socket")
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(agent.mount.join("api").is_dir());
    let out =
        Command::new(&bin).args(["volume", "create", "bad/name"]).arg("--socket").arg(&agent.socket).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid volume name"));
    let out =
        Command::new(&bin).args(["volume", "list", "--json"]).arg("--socket").arg(&agent.socket).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "api" && v["service"] == "billing" && v["labels"]["tier"] == "1"));
    let socket_mode =
        std::fs::metadata(&agent.socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(socket_mode.unwrap(), 0o660);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn bad_config_is_refused_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[ring]\ncapacity = \"64MiB\"\npolicy = \"whenever\"\n").unwrap();
    let out = Command::new(logtap_bin()).args(["daemon", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("line 3") && err.contains("unknown variant `whenever`"), "{err}");
    std::fs::write(&bad, "[volumes]\nmoutn = \"/x\"\n").unwrap();
    let out = Command::new(logtap_bin()).args(["config", "check"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `moutn`"));
    let missing = Command::new(logtap_bin()).args(["daemon", "--config", "/nonexistent/logtap.toml"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/logtap.toml"));
    // The documented default config is valid.
    let default = Command::new(logtap_bin()).args(["config", "default"]).output().unwrap();
    std::fs::write(&bad, &default.stdout).unwrap();
    assert!(Command::new(logtap_bin()).args(["config", "check"]).arg(&bad).status().unwrap().success());
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_second_agent_on_the_same_socket_is_refused() {
    let agent = Agent::start(Setup::default());
    let out = Command::new(logtap_bin()).args(["daemon", "--config"]).arg(&agent.config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first one is unharmed.
    assert!(agent.get("/v1/health").is_ok());
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn shutdown_delivers_what_was_accepted_and_refuses_later_writes() {
    let mut agent = Agent::start(Setup::default());
    let vol = agent.volume("bye");
    let path = vol.join("app.log");
    let writer = std::thread::spawn(move || {
        // open, write, close per line: close() reports whether the agent took the line.
        let mut accepted = Vec::new();
        let mut refused = 0;
        for i in 0..1_000_000 {
            let line = format!("bye {i:08}\n");
            let ok = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|()| f.sync_all()));
            match ok {
                Ok(()) => accepted.push(line.trim_end().to_string()),
                Err(_) => {
                    refused += 1;
                    if refused > 20 {
                        break;
                    }
                }
            }
        }
        (accepted, refused)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let status = agent.stop();
    let (accepted, refused) = writer.join().unwrap();
    assert_eq!(status.code(), Some(0), "clean exit");
    assert!(refused > 0, "writes after shutdown began were refused");
    assert!(!accepted.is_empty());
    let delivered: Vec<String> =
        agent.sink_lines("bye", "app").iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    assert_eq!(delivered, accepted, "every accepted line was delivered, once, in order");
    // The mount is gone.
    assert!(!agent.mount.join("bye").exists());
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn an_optional_sink_that_stalls_does_not_hold_back_the_others() {
    // Files (required) and stdout (optional) sinks; stdout is a pipe nobody reads.
    let mut agent = Agent::start(Setup {
        ring_capacity: "256KiB".into(),
        max_record_bytes: "4KiB".into(),
        policy: "block".into(),
        block_timeout: "60s".into(),
        extra: "[sinks.debug]\ntype = \"stdout\"\noptional = true\n".into(),
        pipe_stdout: true,
        ..Setup::default()
    });
    let _stalled = agent.take_stdout();
    let vol = agent.volume("opt");
    let lines = numbered("o ", 30_000, 100);
    let mut f = OpenOptions::new().create(true).append(true).open(vol.join("app.log")).unwrap();
    for l in &lines {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    let got = agent.wait_lines("opt", "app", lines.len(), Duration::from_secs(60));
    assert_eq!(got.len(), lines.len(), "the required sink got every line");
    let stats = agent.stats();
    let ring = &stats["ring"];
    assert_eq!(ring["dropped_records_total"], 0, "nothing lost to the pipeline: {ring}");
    assert_eq!(stats["volumes"][0]["dropped_records_total"], 0);
    let debug = ring["readers"].as_array().unwrap().iter().find(|r| r["name"] == "debug").unwrap();
    assert_eq!(debug["optional"], true);
    assert!(debug["dropped_records_total"].as_u64().unwrap() > 0, "the stalled optional sink skipped ahead: {debug}");
    // Shutdown drains the required sinks and does not wait for the stalled optional one.
    assert_eq!(agent.stop().code(), Some(0));
}

/// Clients that connect and say nothing (or many at once) cannot hold the control socket:
/// connections are limited, and one that sends no request head within 2 s is closed.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn idle_control_connections_are_limited_and_closed() {
    let agent = Agent::start(Setup::default());
    let idle: Vec<std::os::unix::net::UnixStream> =
        (0..200).map(|_| std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect")).collect();
    let start = std::time::Instant::now();
    let health = agent.get("/v1/health").expect("the agent answers past the idle connections");
    assert!(String::from_utf8_lossy(&health).contains("ok"));
    // 200 idle ones, 64 served at a time, each closed after 2 s: about 7 s.
    assert!(start.elapsed() < Duration::from_secs(15), "answered after {:?}", start.elapsed());
    // The idle ones were closed by the agent: reading one sees the end.
    let mut first = &idle[0];
    first.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(first.read(&mut buf).unwrap_or(0), 0, "an idle connection is closed");
}

/// A stalled sink under `block`: writers do not wait (their lines wait in the files), but the
/// last capture at shutdown waits for room. SIGTERM must still be over within
/// `shutdown_timeout` (3 s), not one `block_timeout` (60 s) after another; what could not be
/// delivered is counted, and later writes get an error.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn shutdown_keeps_its_deadline_when_a_stalled_sink_holds_the_ring() {
    let mut agent = Agent::start(Setup { shutdown_timeout: "3s".into(), ..stalled("block") });
    let _stdout = agent.take_stdout();
    let vol = agent.volume("held");
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let path = vol.join(format!("w{w}.log"));
            std::thread::spawn(move || {
                let mut f = OpenOptions::new().create(true).append(true).open(path).unwrap();
                let line = format!("writer {w} {}\n", "x".repeat(200));
                // Until the agent seals the file (EPERM) or goes away.
                while f.write_all(line.as_bytes()).is_ok() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let v = agent.volume_stats("held");
    assert!(v["memory_bytes"].as_u64().unwrap() > 0, "lines wait in the files: {v}");
    let start = std::time::Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(50));
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(8), "shutdown took {took:?} with shutdown_timeout = 3s");
    for w in writers {
        w.join().unwrap();
    }
}
