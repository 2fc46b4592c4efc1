//! Containers end to end: real podman containers (runc), podman's Docker-compatible API service
//! on a socket of the test's own, the agent following it, the eBPF programs capturing every
//! container's stdout/stderr and logtap volumes mounted as containers' log directories.
//!
//! Every agent captures every container on the machine, so these tests take turns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use logtap_e2e::broker::{consume, Broker};
use logtap_e2e::podman::{Podman, IMAGE};
use logtap_e2e::{Agent, Setup};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's config for following `podman`, files sink in JSON.
fn setup(podman: &Podman, discovery: &str, extra: &str) -> Setup {
    Setup {
        files_format: "json".into(),
        extra: format!(
            "[discovery]\ndocker_socket = \"{}\"\nlabels = [\"team\"]\n{discovery}\n{extra}",
            podman.socket.display()
        ),
        ..Setup::default()
    }
}

/// One test's turn: podman with its API service, and an agent following it. Bind `_turn`
/// first: bindings drop in reverse, so the turn passes on last.
struct Scene {
    agent: Agent,
    podman: Podman,
    _turn: MutexGuard<'static, ()>,
}

/// `discovery` and `extra`: more keys of `[discovery]`, and more tables.
fn scene(discovery: &str, extra: &str) -> Scene {
    let turn = one_at_a_time();
    let podman = Podman::start(None);
    let agent = Agent::start(setup(&podman, discovery, extra));
    wait_status(&agent, "connected");
    Scene { agent, podman, _turn: turn }
}

fn containers(agent: &Agent) -> Value {
    serde_json::from_slice(&agent.get("/v1/containers").expect("/v1/containers")).expect("JSON")
}

fn wait_status(agent: &Agent, status: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = containers(agent);
        if c["status"] == status {
            return c;
        }
        assert!(Instant::now() < deadline, "discovery is not {status}: {c}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The container's entry in `/v1/containers`, once it has one satisfying `ready`.
fn container(agent: &Agent, name: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = containers(agent);
        let found = all["containers"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name).cloned());
        if let Some(c) = found.filter(&ready) {
            return c;
        }
        assert!(Instant::now() < deadline, "no container {name} as expected: {all}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shell script writing `n` numbered lines `{p}-out-i` to stdout, `{p}-err-i` to stderr and,
/// when `file`, `{p}-file-i` to /var/log/app/app.log.
fn script(p: &str, n: usize, file: bool) -> String {
    let f = if file { format!("echo \"{p}-file-$i\" >> /var/log/app/app.log; ") } else { String::new() };
    format!("i=0; while [ $i -lt {n} ]; do echo \"{p}-out-$i\"; echo \"{p}-err-$i\" >&2; {f}i=$((i+1)); done")
}

fn numbered(p: &str, stream: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{p}-{stream}-{i}")).collect()
}

/// Waits for `n` JSON records in the files sink for `service`/`module`.
fn records(agent: &Agent, service: &str, module: &str, n: usize) -> Vec<Value> {
    agent.wait_lines(service, module, n, WAIT);
    agent.json_lines(service, module)
}

fn messages(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["message"].as_str().unwrap_or_default().to_string()).collect()
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_containers_file_stdout_and_stderr_arrive_once_with_its_identity_in_files_and_kafka() {
    let broker = Broker::start();
    broker.create_topic("containers", 1);
    let kafka = format!(
        "[sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"containers\"\nkey = \"{{container_id}}/{{path}}\"\n",
        broker.address()
    );
    let Scene { _turn, agent, podman } = scene("", &kafka);
    let vol = agent.volume("web");
    let n = 500;
    let id = podman.run(&[
        "-d",
        "--name",
        "lt-web",
        "-l",
        "logtap.service=shop",
        "-l",
        "logtap.tenant=acme",
        "-l",
        "team=payments",
        "-v",
        &format!("{}:/var/log/app", vol.display()),
        IMAGE,
        "sh",
        "-c",
        &script("w", n, true),
    ]);
    assert_eq!(podman.wait("lt-web"), 0);

    for (module, stream) in [("stdout", "out"), ("stderr", "err"), ("app", "file")] {
        let got = records(&agent, "shop", module, n);
        assert_eq!(messages(&got), numbered("w", stream, n), "{module}");
        for r in &got {
            assert_eq!(r["container"]["id"], id.as_str(), "{r}");
            assert_eq!(r["container"]["name"], "lt-web", "{r}");
            assert_eq!(r["container"]["image"], IMAGE, "{r}");
            assert_eq!(r["container"]["labels"]["team"], "payments", "{r}");
            assert_eq!(r["tenant"], "acme", "{r}");
        }
        if module == "app" {
            assert_eq!(got[0]["volume"], "web");
        } else {
            assert_eq!(got[0]["path"], module);
            assert!(got[0]["pid"].as_u64().is_some_and(|p| p > 0));
        }
    }

    agent.wait_delivered("kafka", 3 * n as u64, WAIT);
    let got = consume(&broker.address(), "containers", 3 * n, Duration::from_secs(5));
    let mut by_path: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &got {
        assert_eq!(m.headers["container_id"], id, "{:?}", m.headers);
        assert_eq!(m.headers["container_name"], "lt-web");
        assert_eq!(m.headers["image"], IMAGE);
        assert_eq!(m.headers["tenant"], "acme");
        assert_eq!(m.headers["service"], "shop");
        assert_eq!(m.headers["label.team"], "payments");
        assert_eq!(String::from_utf8_lossy(&m.key), format!("{id}/{}", m.headers["path"]));
        by_path.entry(m.headers["path"].clone()).or_default().push(String::from_utf8_lossy(&m.value).into_owned());
    }
    assert_eq!(by_path["stdout"], numbered("w", "out", n));
    assert_eq!(by_path["stderr"], numbered("w", "err", n));
    assert_eq!(by_path["app.log"], numbered("w", "file", n));

    let c = container(&agent, "lt-web", |c| c["pipe"]["captured_records_total"] == 2 * n as u64);
    assert_eq!(c["stdout"], "captured");
    assert_eq!(c["volumes"], json!(["web"]));
    let s = agent.stats();
    assert_eq!(s["pipes"]["containers"]["unidentified_records_total"], 0, "{}", s["pipes"]);
    let v = agent.volume_stats("web");
    assert_eq!(v["container"]["name"], "lt-web", "{v}");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn labels_env_and_the_name_set_the_identity_and_opted_out_or_tty_containers_are_reported() {
    let Scene { _turn, agent, podman } = scene("", "");
    let n = 50;
    let quiet = agent.volume("quiet");
    let runs: [(&str, Vec<&str>); 4] = [
        ("lt-lab", vec!["-l", "logtap.service=lab-svc", "-l", "logtap.module=api", "-l", "logtap.tenant=t1"]),
        ("lt-env", vec!["-e", "LOGTAP_SERVICE=env-svc", "-e", "LOGTAP_TENANT=t2"]),
        ("lt-plain", vec![]),
        ("lt-quiet", vec!["-l", "logtap.stdout=false"]),
    ];
    let quiet_mount = format!("{}:/var/log/app", quiet.display());
    for (name, opts) in &runs {
        let mut args = vec!["-d", "--name", name];
        args.extend(opts.iter().copied());
        if *name == "lt-quiet" {
            args.extend(["-v", quiet_mount.as_str()]);
        }
        let prefix = name.trim_start_matches("lt-");
        let body = script(prefix, n, *name == "lt-quiet");
        args.extend([IMAGE, "sh", "-c", body.as_str()]);
        podman.run(&args);
    }
    // A tty: its output goes to a terminal, which the eBPF programs do not see.
    podman.run(&["-d", "-t", "--name", "lt-tty", IMAGE, "sleep", "60"]);
    for (name, _) in &runs {
        assert_eq!(podman.wait(name), 0);
    }

    // Labels: service, module (both streams), tenant.
    let got = records(&agent, "lab-svc", "api", 2 * n);
    let mut want: BTreeSet<String> = numbered("lab", "out", n).into_iter().collect();
    want.extend(numbered("lab", "err", n));
    assert_eq!(messages(&got).into_iter().collect::<BTreeSet<_>>(), want);
    assert!(got.iter().all(|r| r["tenant"] == "t1" && r["container"]["name"] == "lt-lab"));
    assert_eq!(got.iter().filter(|r| r["path"] == "stderr").count(), n);
    // Environment variables.
    let got = records(&agent, "env-svc", "stdout", n);
    assert_eq!(messages(&got), numbered("env", "out", n));
    assert!(got.iter().all(|r| r["tenant"] == "t2"));
    assert_eq!(messages(&records(&agent, "env-svc", "stderr", n)), numbered("env", "err", n));
    // Nothing set: the container's name, no tenant.
    let got = records(&agent, "lt-plain", "stdout", n);
    assert_eq!(messages(&got), numbered("plain", "out", n));
    assert!(got.iter().all(|r| r.get("tenant").is_none()));
    // Opted out: its stdout/stderr are not captured, its volume is.
    let got = records(&agent, "lt-quiet", "app", n);
    assert_eq!(messages(&got), numbered("quiet", "file", n));
    assert!(agent.sink_lines("lt-quiet", "stdout").is_empty() && agent.sink_lines("lt-quiet", "stderr").is_empty());
    let q = container(&agent, "lt-quiet", |_| true);
    assert_eq!(q["stdout"], "opted_out");
    // Captured before the runtime said so, if it started writing first: counted, not delivered.
    let discarded = &agent.stats()["pipes"]["containers"]["opted_out_records_total"];
    assert_eq!(&q["pipe"]["captured_records_total"], discarded, "{q}");

    let t = container(&agent, "lt-tty", |c| c["stdout"] == "not_capturable");
    assert!(t["reason"].as_str().is_some_and(|r| r.contains("tty")), "{t}");
    let table = std::process::Command::new(logtap_e2e::logtap_bin())
        .args(["containers", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("logtap containers");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("lt-tty") && table.contains("not capturable: the container has a tty"), "{table}");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn containers_that_exit_right_after_writing_lose_nothing() {
    let Scene { _turn, agent, podman } = scene("", "");
    let n = 300;
    let names: Vec<String> = (0..5).map(|i| format!("lt-quick{i}")).collect();
    for name in &names {
        // `--rm`: the container is gone (and its cgroup removed) moments after its last write.
        podman.run(&["--rm", "--name", name, IMAGE, "sh", "-c", &script(name, n, false)]);
    }
    for name in &names {
        let got = records(&agent, name, "stdout", n);
        assert_eq!(messages(&got), numbered(name, "out", n), "{name}");
        assert!(got.iter().all(|r| r["container"]["name"] == name.as_str()), "{name}: unnamed records");
        assert_eq!(messages(&records(&agent, name, "stderr", n)), numbered(name, "err", n), "{name}");
    }
    let c = &agent.stats()["pipes"]["containers"];
    assert_eq!(c["unresolved_bytes_total"], 0, "{c}");
    assert_eq!(c["unidentified_records_total"], 0, "{c}");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_restarted_container_is_collected_once_per_run() {
    let Scene { _turn, agent, podman } = scene("", "");
    let n = 200;
    // Each run counts itself in the container's own filesystem, which survives a restart.
    let body = format!(
        "r=$(cat /tmp/runs 2>/dev/null || echo 0); r=$((r+1)); echo $r > /tmp/runs; \
         i=0; while [ $i -lt {n} ]; do echo \"run$r-$i\"; i=$((i+1)); done"
    );
    podman.run(&["-d", "--name", "lt-again", IMAGE, "sh", "-c", &body]);
    assert_eq!(podman.wait("lt-again"), 0);
    records(&agent, "lt-again", "stdout", n);
    podman.podman(&["start", "lt-again"]);
    assert_eq!(podman.wait("lt-again"), 0);
    let got = messages(&records(&agent, "lt-again", "stdout", 2 * n));
    let mut want = Vec::new();
    for run in 1..=2 {
        want.extend((0..n).map(|i| format!("run{run}-{i}")));
    }
    assert_eq!(got, want);
    // Nothing more comes later.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.sink_lines("lt-again", "stdout").len(), 2 * n);
    let c = container(&agent, "lt-again", |_| true);
    assert_eq!(c["pipe"]["captured_records_total"], 2 * n as u64, "{c}");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn twenty_containers_at_once_each_line_to_its_own_container() {
    let Scene { _turn, agent, podman } = scene("", "");
    let n = 500;
    let names: Vec<String> = (0..20).map(|i| format!("lt-many{i:02}")).collect();
    std::thread::scope(|s| {
        for name in &names {
            let podman = &podman;
            s.spawn(move || {
                let body = format!("i=0; while [ $i -lt {n} ]; do echo \"{name} $i\"; i=$((i+1)); done");
                podman.run(&["-d", "--name", name, IMAGE, "sh", "-c", &body]);
            });
        }
    });
    for name in &names {
        assert_eq!(podman.wait(name), 0);
    }
    for name in &names {
        let got = records(&agent, name, "stdout", n);
        let want: Vec<String> = (0..n).map(|i| format!("{name} {i}")).collect();
        assert_eq!(messages(&got), want, "{name}");
        assert!(got.iter().all(|r| r["container"]["name"] == name.as_str()));
    }
}

/// 20 containers each print 50,000 short numbered lines and 1,000 to stderr at once (1.02M
/// lines): with the default config every line arrives, in its container's stream.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_burst_from_twenty_containers_arrives_whole_with_the_default_config() {
    let Scene { _turn, agent, podman } = scene("", "");
    let (out, err) = (50_000, 1_000);
    let names: Vec<String> = (0..20).map(|i| format!("lt-burst{i:02}")).collect();
    // Each container waits for a file to appear, so that all start printing at once.
    let gate = tempfile::tempdir().unwrap();
    let go = gate.path().join("go");
    std::thread::scope(|s| {
        for name in &names {
            let podman = &podman;
            let gate = &gate;
            s.spawn(move || {
                let body = format!("while [ ! -e /go/go ]; do sleep 0.01; done; seq {out}; seq {err} >&2");
                let mount = format!("{}:/go", gate.path().display());
                podman.run(&["-d", "--name", name, "-v", &mount, IMAGE, "sh", "-c", &body]);
            });
        }
    });
    std::fs::write(&go, "").unwrap();
    for name in &names {
        assert_eq!(podman.wait(name), 0);
    }
    for name in &names {
        let got = records(&agent, name, "stdout", out);
        assert_eq!(got.len(), out, "{name}: stdout lines delivered");
        assert_eq!(messages(&got), (1..=out).map(|i| i.to_string()).collect::<Vec<_>>(), "{name} stdout");
        let got = records(&agent, name, "stderr", err);
        assert_eq!(got.len(), err, "{name}: stderr lines delivered");
        assert_eq!(messages(&got), (1..=err).map(|i| i.to_string()).collect::<Vec<_>>(), "{name} stderr");
    }
    let stats = agent.stats();
    assert_eq!(stats["ring"]["dropped_records_total"], 0, "{}", stats["ring"]);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn the_runtime_api_going_away_and_coming_back() {
    let Scene { _turn, agent, mut podman } = scene("hold_timeout = \"60s\"", "");
    podman.run(&["-d", "--name", "lt-before", IMAGE, "sh", "-c", "echo before; sleep 60"]);
    container(&agent, "lt-before", |c| c["state"] == "running");

    podman.stop_service();
    let c = wait_status(&agent, "disconnected");
    assert!(c["reason"].as_str().is_some_and(|r| !r.is_empty()), "{c}");
    // Started while the API is away: its lines wait for its identity, nothing is lost.
    podman.run(&["-d", "--name", "lt-away", IMAGE, "sh", "-c", &script("away", 100, false)]);
    assert_eq!(podman.wait("lt-away"), 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.sink_lines("lt-away", "stdout").is_empty(), "named without the runtime?");
    let held = &agent.stats()["pipes"]["containers"];
    assert_eq!(held["held_records"], 200, "{held}");

    podman.start_service();
    let c = wait_status(&agent, "connected");
    assert!(c["reconnects_total"].as_u64().is_some_and(|n| n >= 1), "{c}");
    assert_eq!(messages(&records(&agent, "lt-away", "stdout", 100)), numbered("away", "out", 100));
    assert_eq!(messages(&records(&agent, "lt-away", "stderr", 100)), numbered("away", "err", 100));
    assert_eq!(messages(&records(&agent, "lt-before", "stdout", 1)), ["before"]);
    let c = container(&agent, "lt-away", |_| true);
    assert_eq!(c["pipe"]["captured_records_total"], 200, "{c}");
    let s = agent.stats();
    assert_eq!(s["pipes"]["containers"]["unidentified_records_total"], 0, "{}", s["pipes"]);
    assert_eq!(s["pipes"]["containers"]["held_records"], 0);
}

/// One call of the volume plugin protocol: its answer, or the `Err` it gave.
fn plugin(agent: &Agent, call: &str, body: Value) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let body = serde_json::to_vec(&body).expect("JSON");
    let path = format!("/{call}");
    match rt.block_on(logtap::control::client::call(&agent.plugin, hyper::Method::POST, &path, Some(body))) {
        Ok(b) => {
            let v: Value = serde_json::from_slice(&b).expect("JSON answer");
            match v["Err"].as_str() {
                Some(e) if !e.is_empty() => Err(e.to_string()),
                _ => Ok(v),
            }
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn the_volume_plugin_protocol_directly_and_through_podman() {
    let Scene { _turn, agent, podman: _runtime } = scene("", "");

    let activate = plugin(&agent, "Plugin.Activate", json!({})).unwrap();
    assert_eq!(activate["Implements"], json!(["VolumeDriver"]));
    assert_eq!(plugin(&agent, "VolumeDriver.Capabilities", json!({})).unwrap()["Capabilities"]["Scope"], "local");
    let opts = json!({"service": "plug-svc", "label": "team=a", "mode": "0777"});
    plugin(&agent, "VolumeDriver.Create", json!({"Name": "pv", "Opts": opts})).unwrap();
    let mountpoint = agent.mount.join("pv");
    let got = plugin(&agent, "VolumeDriver.Get", json!({"Name": "pv"})).unwrap();
    assert_eq!(got["Volume"]["Mountpoint"], mountpoint.to_string_lossy().as_ref());
    assert_eq!(got["Volume"]["Status"]["service"], "plug-svc");
    let list = plugin(&agent, "VolumeDriver.List", json!({})).unwrap();
    assert!(list["Volumes"].as_array().is_some_and(|v| v.iter().any(|v| v["Name"] == "pv")), "{list}");
    let m = plugin(&agent, "VolumeDriver.Mount", json!({"Name": "pv", "ID": "m1"})).unwrap();
    assert_eq!(m["Mountpoint"], mountpoint.to_string_lossy().as_ref());
    assert_eq!(
        std::fs::metadata(&mountpoint).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).ok(),
        Some(0o777)
    );
    assert!(plugin(&agent, "VolumeDriver.Remove", json!({"Name": "pv"})).unwrap_err().contains("mounted"));
    plugin(&agent, "VolumeDriver.Unmount", json!({"Name": "pv", "ID": "m1"})).unwrap();
    assert_eq!(
        plugin(&agent, "VolumeDriver.Path", json!({"Name": "pv"})).unwrap()["Mountpoint"],
        mountpoint.to_string_lossy().as_ref()
    );
    let bad = plugin(&agent, "VolumeDriver.Create", json!({"Name": "../etc", "Opts": {}})).unwrap_err();
    assert!(bad.contains("invalid volume name"), "{bad}");
    let bad = plugin(&agent, "VolumeDriver.Create", json!({"Name": "x", "Opts": {"size": "1G"}})).unwrap_err();
    assert!(bad.contains("unknown option"), "{bad}");
    plugin(&agent, "VolumeDriver.Remove", json!({"Name": "pv"})).unwrap();
    assert!(plugin(&agent, "VolumeDriver.Get", json!({"Name": "pv"})).is_err());
    assert!(!mountpoint.exists());

    // Through podman: the plugin as podman's volume driver `logtap`.
    let podman = Podman::start(Some(&agent.plugin));
    // A run that failed midway left its volume in podman's database.
    let _ = podman.output(&["volume", "rm", "-f", "lt-vol"]);
    podman.podman(&["volume", "create", "--driver", "logtap", "-o", "service=plugged", "lt-vol"]);
    podman.run(&[
        "--rm",
        "--name",
        "lt-plugged",
        "-v",
        "lt-vol:/var/log/app",
        IMAGE,
        "sh",
        "-c",
        &script("p", 20, true),
    ]);
    let got = records(&agent, "plugged", "app", 20);
    assert_eq!(messages(&got), numbered("p", "file", 20));
    assert!(got.iter().all(|r| r["container"]["name"] == "lt-plugged" && r["volume"] == "lt-vol"), "{got:?}");
    podman.podman(&["volume", "rm", "lt-vol"]);
    assert!(!agent.mount.join("lt-vol").exists());
}

/// A container whose records the ring dropped shows them as lost, in `/v1/containers`, in
/// `logtap containers` and in Prometheus: its stdout/stderr and its volume's files alike.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn records_the_ring_drops_show_as_the_containers_loss() {
    let turn = one_at_a_time();
    let podman = Podman::start(None);
    // A required Kafka sink that never answers holds the ring full: drop_oldest must drop.
    let kafka = "[sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"127.0.0.1:1\"]\ntopic = \"t\"\n";
    // 64 KiB: the 6,000 stdout/stderr records (about 216 KB with their headers) overflow it
    // several times. The file's lines wait in the file rather than make the ring drop (and the
    // ring takes space from whoever holds most), so the volume is given its least memory,
    // 4 MiB, and 6 MB of file lines: what is over the budget is dropped, counted as the
    // volume's, so the container's.
    let lossy = Setup {
        ring_capacity: "64KiB".into(),
        max_record_bytes: "4KiB".into(),
        volume_memory: "4MiB".into(),
        ..setup(&podman, "", kafka)
    };
    let agent = Agent::start(lossy);
    wait_status(&agent, "connected");
    let Scene { _turn, agent, podman } = Scene { agent, podman, _turn: turn };
    let vol = agent.volume("lossy");
    let n = 3000;
    podman.run(&[
        "-d",
        "--name",
        "lt-lossy",
        "-v",
        &format!("{}:/var/log/app", vol.display()),
        IMAGE,
        "sh",
        "-c",
        &script("l", n, true).replace("-file-$i", &format!("-file-$i-{}", "f".repeat(2000))),
    ]);
    assert_eq!(podman.wait("lt-lossy"), 0);
    let c = container(&agent, "lt-lossy", |c| c["pipe"]["captured_records_total"] == 2 * n as u64);
    let volume = agent.volume_stats("lossy");
    let pipe_dropped = c["pipe"]["dropped_bytes_total"].as_u64().unwrap();
    let file_dropped = volume["dropped_bytes_total"].as_u64().unwrap();
    assert!(pipe_dropped > 0 && file_dropped > 0, "the ring must have dropped both: {c} {volume}");
    assert_eq!(c["dropped_bytes_total"], pipe_dropped + file_dropped, "{c}");
    let lost = c["lost_bytes_total"].as_u64().unwrap();
    let kernel = c["kernel_lost_bytes_total"].as_u64().unwrap() + c["truncated_bytes_total"].as_u64().unwrap();
    assert_eq!(lost, pipe_dropped + file_dropped + kernel, "{c}");

    let table = std::process::Command::new(logtap_e2e::logtap_bin())
        .args(["containers", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().find(|l| l.contains("lt-lossy")).unwrap_or_else(|| panic!("{table}"));
    // The LOST column, as the CLI prints sizes.
    let human = |n: u64| match n {
        0..1024 => format!("{n} B"),
        1024..1048576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1048576.0),
    };
    assert!(row.contains(&format!(" {} ", human(lost))), "LOST must read {}: {table}", human(lost));
    let metrics = String::from_utf8_lossy(&agent.get("/metrics").unwrap()).into_owned();
    let series = metrics.lines().find(|l| l.starts_with("logtap_container_lost_bytes_total{container=\"lt-lossy\""));
    assert_eq!(series.and_then(|l| l.rsplit(' ').next()), Some(lost.to_string().as_str()), "{metrics}");
}

/// The host's C library, for the workspace's own programs run inside the busybox image.
const HOST_LIBS: [&str; 4] = ["-v", "/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:ro", "-v", "/lib64:/lib64:ro"];

/// A container's output reached through any fd (`/dev/stdout` and `/proc/self/fd/1` opened
/// again, `exec 3>&1`, vmsplice) arrives once, in its stream, with its identity; a pipeline
/// inside it contributes only what reaches its output; bytes spliced into its stdout show as
/// lost. Three containers, one after another.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_containers_output_through_any_fd_arrives_once_and_its_inner_pipes_stay_out() {
    let Scene { _turn, agent, podman } = scene("", "");
    let writer = format!("{}:/writer:ro", env!("CARGO_BIN_EXE_pipe-writer"));
    let script = logtap_e2e::other_ways_to_stdout("/writer") + " && seq 1 10000 | tail -n 2";
    let (mut stdout, stderr) = logtap_e2e::other_ways_expected();
    stdout.extend(["9999".to_string(), "10000".to_string()]);
    for round in 0..3 {
        let (name, service) = (format!("lt-ways-{round}"), format!("ways-{round}"));
        let label = format!("logtap.service={service}");
        let mut args = vec!["-d", "--log-driver", "none", "--name", &name, "-l", &label, "-v", &writer];
        args.extend(HOST_LIBS);
        args.extend([IMAGE, "sh", "-c", &script]);
        let id = podman.run(&args);
        assert_eq!(podman.wait(&name), 0);
        for (module, want) in [("stdout", &stdout), ("stderr", &stderr)] {
            let got = records(&agent, &service, module, want.len());
            logtap_e2e::assert_lines(&messages(&got), want, module);
            for r in &got {
                assert_eq!(r["container"]["id"], id.as_str(), "{r}");
                assert_eq!(r["container"]["name"], name.as_str(), "{r}");
                assert_eq!(r["path"], module, "{r}");
            }
        }
        let c = container(&agent, &name, |c| {
            c["pipe"]["captured_records_total"] == (stdout.len() + stderr.len()) as u64
                && c["spliced_bytes_total"] == logtap_e2e::SPLICED_BYTES
        });
        agent.wait_idle(WAIT);
        assert_eq!(agent.json_lines(&service, "stdout").len(), stdout.len(), "nothing more came");
        assert_eq!(c["lost_bytes_total"], logtap_e2e::SPLICED_BYTES, "{c}");
        // seq wrote 48,894 bytes into the pipe to tail: not output, counted.
        assert!(c["other_pipe_bytes_total"].as_u64().unwrap() >= 48_894, "{c}");
    }
}

/// nginx's configuration for [`nginx_in_a_container_logs_every_request_through_dev_stdout`]:
/// logs where the official image puts them (links to /dev/stdout and /dev/stderr), each access
/// line unique (connection serial and request number on it).
const NGINX_CONF: &str = r#"daemon off;
worker_processes 2;
user root;
pid /tmp/nginx/nginx.pid;
error_log /var/log/nginx/error.log notice;
events { worker_connections 256; }
http {
    log_format unique '$connection $connection_requests $remote_addr "$request" $status $body_bytes_sent';
    access_log /var/log/nginx/access.log unique;
    client_body_temp_path /tmp/nginx/body;
    proxy_temp_path /tmp/nginx/proxy;
    fastcgi_temp_path /tmp/nginx/fastcgi;
    uwsgi_temp_path /tmp/nginx/uwsgi;
    scgi_temp_path /tmp/nginx/scgi;
    server {
        listen 127.0.0.1:8080;
        location = /status { stub_status; }
        location / { return 200 "ok\n"; }
    }
}
"#;

/// The official nginx image's way of logging, with Debian's nginx in the busybox image: the
/// access log is a link to `/dev/stdout`, which nginx opens as a file (fd 4 and up), written by
/// its workers. Under wrk for 3 s, every request nginx counted (stub_status, read after the
/// load) is one stdout record, none twice; its error log arrives on stderr. wrk and nginx's
/// workers take both cores: the BPF ring buffer holds the whole burst (with the default
/// 16 MiB, a debug build of the agent, starved of CPU, lost 2.5 of 10 MB here, counted as LOST).
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn nginx_in_a_container_logs_every_request_through_dev_stdout() {
    for program in ["/usr/sbin/nginx", "/usr/bin/wrk"] {
        assert!(
            std::path::Path::new(program).exists(),
            "{program} is missing: `cargo xtask setup` installs nginx and wrk"
        );
    }
    let Scene { _turn, agent, podman } = scene("", "[pipes]\nring_buffer = \"256MiB\"\n");
    let conf = tempfile::tempdir().expect("tempdir");
    std::fs::write(conf.path().join("nginx.conf"), NGINX_CONF).expect("write nginx.conf");
    let conf_mount = format!("{}:/conf:ro", conf.path().display());
    let script = "mkdir -p /var/log/nginx /tmp/nginx && ln -s /dev/stdout /var/log/nginx/access.log && \
                  ln -s /dev/stderr /var/log/nginx/error.log && echo 'root:x:0:0:root:/:/bin/sh' > /etc/passwd && \
                  echo 'root:x:0:' > /etc/group && { /nginx -c /conf/nginx.conf & } && \
                  until wget -q -O /dev/null http://127.0.0.1:8080/ready; do sleep 0.1; done && \
                  /wrk -t 2 -c 16 -d 3s http://127.0.0.1:8080/ > /tmp/wrk.txt && \
                  wget -q -O /tmp/status http://127.0.0.1:8080/status && \
                  kill -QUIT $(cat /tmp/nginx/nginx.pid) && wait && \
                  echo \"handled: $(head -n 3 /tmp/status | tail -n 1)\" >&2";
    for round in 0..2 {
        let (name, service) = (format!("lt-nginx-{round}"), format!("nginx-{round}"));
        let label = format!("logtap.service={service}");
        let mut args = vec!["-d", "--log-driver", "none", "--name", &name, "-l", &label, "-v", &conf_mount];
        args.extend(["-v", "/usr/sbin/nginx:/nginx:ro", "-v", "/usr/bin/wrk:/wrk:ro"]);
        args.extend(HOST_LIBS);
        args.extend([IMAGE, "sh", "-c", script]);
        podman.run(&args);
        assert_eq!(podman.wait(&name), 0, "{}", podman.podman(&["logs", &name]));
        let deadline = Instant::now() + WAIT;
        let errors = loop {
            let errors = messages(&agent.json_lines(&service, "stderr"));
            if errors.iter().any(|m| m.starts_with("handled: ")) {
                break errors;
            }
            assert!(Instant::now() < deadline, "no stub_status figures on stderr: {errors:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let handled = errors.iter().find_map(|m| m.strip_prefix("handled: ")).expect("found above");
        // " accepts handled requests": the third is every request nginx read.
        let requests: usize = handled.split_whitespace().nth(2).and_then(|n| n.parse().ok()).expect("requests");
        assert!(requests > 1000, "wrk made only {requests} requests");
        assert!(errors.iter().any(|m| m.contains("[notice]") && m.contains("nginx/")), "the error log: {errors:?}");
        let got = messages(&records(&agent, &service, "stdout", requests));
        agent.wait_idle(WAIT);
        let c = container(&agent, &name, |_| true);
        let got_all = messages(&agent.json_lines(&service, "stdout"));
        assert_eq!(got_all.len(), got.len(), "nothing more came");
        let unique: BTreeSet<(&str, &str)> = got
            .iter()
            .filter_map(|l| l.split_once(' ').and_then(|(c, rest)| Some((c, rest.split(' ').next()?))))
            .collect();
        assert_eq!(
            (got.len(), unique.len()),
            (requests, requests),
            "every request once: {c} {}",
            agent.stats()["ring"]
        );
        let served = got.iter().filter(|l| l.ends_with("\"GET / HTTP/1.1\" 200 3")).count();
        assert!(served + 2 >= requests && got.iter().all(|l| l.contains(" 127.0.0.1 \"GET /")), "{:?}", &got[..3]);
        assert_eq!(c["lost_bytes_total"], 0, "{c}");
    }
}

/// A container printing a line every 1 ms while the agent's worker is killed five times: the
/// container's target (its cgroup in the kernel's watch map) outlives every worker, and every
/// line arrives with the container's identity.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_containers_output_is_captured_across_worker_kills() {
    let Scene { _turn, agent, podman } = scene("", "");
    let n = 4_000;
    let body = format!("i=0; while [ $i -lt {n} ]; do echo \"k-out-$i\"; usleep 1000; i=$((i+1)); done");
    podman.run(&["-d", "--name", "lt-kept", "-l", "logtap.service=kept", IMAGE, "sh", "-c", &body]);
    agent.wait_lines("kept", "stdout", 1, WAIT);
    let mut redelivered = 0;
    for kill in 0..5 {
        std::thread::sleep(Duration::from_millis(600));
        let stats = agent.kill_worker();
        assert_eq!(stats["restarts"], kill + 1);
        redelivered += stats["last_restart"]["redelivered_records"].as_u64().unwrap_or(0);
    }
    assert_eq!(podman.wait("lt-kept"), 0);
    let got = records(&agent, "kept", "stdout", n);
    let mut seen = BTreeSet::new();
    let firsts: Vec<String> = messages(&got).into_iter().filter(|m| seen.insert(m.clone())).collect();
    assert_eq!(firsts, numbered("k", "out", n));
    let twice = (got.len() - n) as u64;
    assert!(twice <= redelivered, "{twice} lines twice, {redelivered} counted as redelivered");
    assert!(got.iter().all(|r| r["container"]["name"] == "lt-kept"), "unnamed records");
    let c = container(&agent, "lt-kept", |_| true);
    assert_eq!(c["stdout"], "captured", "{c}");
}
