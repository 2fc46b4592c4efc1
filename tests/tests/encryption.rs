//! Per-tenant encryption end to end: podman containers and volumes of two tenants, the files
//! and Kafka sinks, `logtap keys` and `logtap decrypt`, and an independent reader (Python's
//! `cryptography`, written from docs/ENCRYPTION.md) opening what the broker holds.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use logtap_e2e::broker::{consume, Broker, Consumed};
use logtap_e2e::podman::{Podman, IMAGE};
use logtap_e2e::{logtap_bin, Agent, Setup};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn logtap(args: &[&str]) -> Output {
    Command::new(logtap_bin()).args(args).output().expect("run logtap")
}

/// `logtap keys new TENANT --keys DIR`: the id it printed.
fn new_key(dir: &Path, tenant: &str) -> String {
    let out = logtap(&["keys", "new", tenant, "--keys", &dir.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("id").trim().to_string()
}

/// A key directory holding only `tenant`'s keys, copied from `from`.
fn keys_of(from: &Path, tenant: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("keys").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{tenant}.")) {
            std::fs::copy(e.path(), to.join(&name)).expect("copy key");
            std::fs::set_permissions(to.join(&name), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }
    to.to_path_buf()
}

/// `logtap decrypt --keys DIR [--tenant T] FILE`.
fn decrypt(keys: &Path, tenant: Option<&str>, file: &Path) -> Output {
    let mut args = vec!["decrypt".to_string(), "--keys".into(), keys.display().to_string()];
    if let Some(t) = tenant {
        args.extend(["--tenant".into(), t.into()]);
    }
    args.push(file.display().to_string());
    Command::new(logtap_bin()).args(&args).output().expect("run logtap decrypt")
}

fn lines(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out).lines().map(str::to_string).collect()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05} a secret of {prefix}")).collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The one file of the files sink for a tenant's (or, with `None`, a clear) service/module.
fn sink_file(agent: &Agent, tenant: Option<&str>, service: &str, module: &str) -> PathBuf {
    let dir = match tenant {
        Some(t) => agent.out.join("tenants").join(t).join(service),
        None => agent.out.join(service),
    };
    let mut files: Vec<PathBuf> = files_under(&dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{module}."))))
        .collect();
    assert_eq!(files.len(), 1, "one day's file in {}: {files:?}", dir.display());
    files.remove(0)
}

/// Waits until the files sink's tenant counters show `n` sealed records of `tenant`.
fn wait_sealed(agent: &Agent, sink: &str, tenant: &str, field: &str, n: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = agent.sink_stats(sink)["encryption"][tenant].clone();
        if t[field].as_u64().unwrap_or(0) >= n || Instant::now() >= deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sealed values of `messages` opened by the Python reader with the keys of `keys`.
fn python_open(keys: &Path, messages: &[&Consumed]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/open_sealed.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs cryptography)");
    let mut input = String::new();
    for m in messages {
        input += &json!({ "value": base64::engine::general_purpose::STANDARD.encode(&m.value) }).to_string();
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python");
    writer.join().expect("writer").expect("write to python");
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    lines(&out.stdout).iter().map(|l| serde_json::from_str(l).expect("python JSON")).collect()
}

fn value_of(opened: &Value) -> String {
    let v = base64::engine::general_purpose::STANDARD.decode(opened["value"].as_str().expect("value")).expect("b64");
    String::from_utf8(v).expect("UTF-8")
}

fn create_volume(agent: &Agent, name: &str, tenant: &str) -> PathBuf {
    agent.post("/v1/volumes", &json!({ "name": name, "tenant": tenant })).expect("create volume");
    agent.mount.join(name)
}

fn write_lines(file: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).expect("open");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn each_tenants_records_open_with_its_key_only_in_files_and_kafka_and_nothing_else_is_in_clear() {
    let broker = Broker::start();
    broker.create_topic("sealed", 1);
    let podman = Podman::start(None);
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_dir.path().join("keys");
    let acme_id = new_key(&keys, "acme");
    let globex_id = new_key(&keys, "globex");
    let setup = Setup {
        extra: format!(
            "[discovery]\ndocker_socket = \"{}\"\n[encryption]\nkeys = \"{}\"\n\
             [sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"sealed\"\nkey = \"{{tenant}}/{{path}}\"\n",
            podman.socket.display(),
            keys.display(),
            broker.address()
        ),
        ..Setup::default()
    };
    let agent = Agent::start(setup);
    let n = 300;
    // A volume made for globex, written from the host: its tenant is the volume's.
    let vault = create_volume(&agent, "vault", "globex");
    write_lines(&vault.join("audit.log"), &numbered("vault", n));
    // Two tenants' containers and one of no tenant (sent in clear: without_key = "plaintext").
    let print =
        |p: &str| format!("i=0; while [ $i -lt {n} ]; do printf '{p}-%05d a secret of {p}\\n' $i; i=$((i+1)); done");
    for (name, service, tenant) in
        [("lt-acme", "web", "acme"), ("lt-globex", "shop", "globex"), ("lt-plain", "plain", "")]
    {
        let mut args = vec!["-d", "--name", name, "-l"];
        let service_label = format!("logtap.service={service}");
        let tenant_label = format!("logtap.tenant={tenant}");
        args.push(&service_label);
        if !tenant.is_empty() {
            args.extend(["-l", &tenant_label]);
        }
        let body = print(service);
        args.extend([IMAGE, "sh", "-c", &body]);
        podman.run(&args);
        assert_eq!(podman.wait(name), 0);
    }
    let total = 4 * n as u64;
    agent.wait_delivered("files", total, WAIT);
    agent.wait_delivered("kafka", total, WAIT);

    // Files: each tenant's own directory, each record opening with its tenant's key only.
    let acme_file = sink_file(&agent, Some("acme"), "web", "stdout");
    let globex_file = sink_file(&agent, Some("globex"), "shop", "stdout");
    let vault_file = sink_file(&agent, Some("globex"), "vault", "audit");
    let only_acme = keys_of(&keys, "acme", &keys_dir.path().join("acme-only"));
    let only_globex = keys_of(&keys, "globex", &keys_dir.path().join("globex-only"));
    let out = decrypt(&only_acme, Some("acme"), &acme_file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out.stdout), numbered("web", n), "acme's stdout, byte for byte, once each");
    for (file, want) in [(&globex_file, numbered("shop", n)), (&vault_file, numbered("vault", n))] {
        let out = decrypt(&only_globex, Some("globex"), file);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(lines(&out.stdout), want, "{}", file.display());
    }
    let plain = agent.sink_lines("plain", "stdout");
    assert_eq!(logtap_e2e::as_strings(&plain), numbered("plain", n), "no tenant: in clear, where it always was");

    // The other tenant's key opens nothing, and says so.
    let out = decrypt(&only_globex, None, &acme_file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no key acme.{acme_id}.key")), "{err}");
    assert!(err.contains(&format!("{n} of {n} records did not decrypt")), "{err}");
    assert!(out.stdout.is_empty());

    // A flipped bit fails authentication; a record of globex copied into acme's stream fails.
    let text = std::fs::read_to_string(&acme_file).expect("read");
    let mut sealed: Vec<String> = text.lines().map(str::to_string).collect();
    let mut bytes = base64::engine::general_purpose::STANDARD.decode(&sealed[7]).expect("b64");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    sealed[7] = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let foreign = std::fs::read_to_string(&globex_file).expect("read").lines().next().expect("a line").to_string();
    sealed.insert(20, foreign);
    let tampered = keys_dir.path().join("tampered");
    std::fs::write(&tampered, sealed.join("\n") + "\n").expect("write");
    let out = decrypt(&keys, Some("acme"), &tampered);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":8: authentication failed"), "{err}");
    assert!(err.contains(":21: a record of tenant \"globex\" in the stream of tenant \"acme\""), "{err}");
    assert!(err.contains(&format!("2 of {} records did not decrypt", n + 1)), "{err}");
    let mut want = numbered("web", n);
    want.remove(7);
    assert_eq!(lines(&out.stdout), want, "every other record still opens");

    // Kafka: sealed values with enc and key_id, identity in clear; Python opens each.
    let got = consume(&broker.address(), "sealed", total as usize, Duration::from_secs(5));
    assert_eq!(got.len(), total as usize);
    let (sealed_msgs, clear): (Vec<&Consumed>, Vec<&Consumed>) =
        got.iter().partition(|m| m.headers.contains_key("enc"));
    assert_eq!((sealed_msgs.len(), clear.len()), (3 * n, n));
    for m in &sealed_msgs {
        assert_eq!(m.headers["enc"], "aes-256-gcm-hkdf-sha256");
        let id = if m.headers["tenant"] == "acme" { &acme_id } else { &globex_id };
        assert_eq!(&m.headers["key_id"], id, "{:?}", m.headers);
        for marker in ["web-", "shop-", "vault-", "a secret"] {
            assert!(!contains(&m.value, marker), "plaintext in a sealed value");
        }
    }
    let opened = python_open(&keys, &sealed_msgs);
    let mut by_stream: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (o, m) in opened.iter().zip(&sealed_msgs) {
        assert!(o.get("error").is_none(), "python could not open a value: {o}");
        assert_eq!(o["tenant"], m.headers["tenant"].as_str());
        assert_eq!(o["service"], m.headers["service"].as_str());
        by_stream
            .entry((o["tenant"].as_str().unwrap().into(), o["service"].as_str().unwrap().into()))
            .or_default()
            .push(value_of(o));
    }
    assert_eq!(by_stream[&("acme".into(), "web".into())], numbered("web", n));
    assert_eq!(by_stream[&("globex".into(), "shop".into())], numbered("shop", n));
    assert_eq!(by_stream[&("globex".into(), "vault".into())], numbered("vault", n));
    let globex_values: Vec<&Consumed> =
        sealed_msgs.iter().copied().filter(|m| m.headers["tenant"] == "globex").collect();
    for o in python_open(&only_acme, &globex_values[..3]) {
        assert_eq!(o["error"], format!("no key globex.{globex_id}"), "{o}");
    }
    // The tenant string starts at byte 53 (docs/ENCRYPTION.md): "globex" renamed "acme".
    let v = &globex_values[0].value;
    let moved = Consumed { value: [&v[..53], &b"\x00\x04acme"[..], &v[61..]].concat(), ..globex_values[0].clone() };
    assert!(python_open(&keys, &[&moved])[0]["error"].is_string(), "a record renamed to another tenant opens");

    // Nothing of the tenants' lines is in clear anywhere the sinks wrote.
    for f in files_under(&agent.out) {
        if f.starts_with(agent.out.join("plain")) {
            continue;
        }
        let data = std::fs::read(&f).expect("read");
        assert!(!contains(&data, "a secret"), "plaintext in {}", f.display());
    }
    for m in &clear {
        assert_eq!(m.headers["service"], "plain", "only the no-tenant container is in clear");
    }
    let s = agent.sink_stats("files");
    assert_eq!(s["encryption"]["acme"]["sealed_records_total"], n as u64, "{s}");
    assert_eq!(s["encryption"]["globex"]["sealed_records_total"], 2 * n as u64, "{s}");
    assert_eq!(s["encryption"][""]["plaintext_records_total"], n as u64, "{s}");
    let keys_stats = &agent.stats()["encryption"];
    assert_eq!(keys_stats["tenants"].as_array().map(Vec::len), Some(2), "{keys_stats}");
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_key_made_while_a_tenant_writes_seals_from_then_on_and_every_record_opens_once() {
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_dir.path().join("keys");
    let first = new_key(&keys, "acme");
    let setup = Setup {
        extra: format!(
            "[discovery]\nenabled = false\n[encryption]\nkeys = \"{}\"\nrequired = [\"acme\"]\n",
            keys.display()
        ),
        ..Setup::default()
    };
    let agent = Agent::start(setup);
    let vol = create_volume(&agent, "rot", "acme");
    let n = 3000;
    let want = numbered("rot", n);
    let mut f = std::fs::File::create(vol.join("app.log")).expect("create");
    let mut second = String::new();
    for (i, line) in want.iter().enumerate() {
        writeln!(f, "{line}").expect("write");
        if i == n / 3 {
            second = new_key(&keys, "acme");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    drop(f);
    let t = wait_sealed(&agent, "files", "acme", "sealed_records_total", n as u64);
    assert_eq!(t["sealed_records_total"], n as u64, "{t}");
    assert_eq!(t["dropped_records_total"], 0, "{t}");
    let file = sink_file(&agent, Some("acme"), "rot", "app");
    let out = decrypt(&keys, Some("acme"), &file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out.stdout), want, "every line once, in order, across the rotation");

    // Which key sealed each record: the first up to some point, the new one from then on.
    let sealed: Vec<Consumed> = std::fs::read_to_string(&file)
        .expect("read")
        .lines()
        .map(|l| Consumed {
            partition: 0,
            key: Vec::new(),
            value: base64::engine::general_purpose::STANDARD.decode(l).expect("b64"),
            headers: BTreeMap::new(),
            received_at: std::time::SystemTime::now(),
        })
        .collect();
    let opened = python_open(&keys, &sealed.iter().collect::<Vec<_>>());
    let ids: Vec<&str> = opened.iter().map(|o| o["key_id"].as_str().expect("opened")).collect();
    let switch = ids.iter().position(|id| *id == second).expect("the new key sealed some records");
    assert!(ids[..switch].iter().all(|id| *id == first), "only the first key before the switch");
    assert!(ids[switch..].iter().all(|id| *id == second), "never the old key after the switch");
    assert!(switch > n / 3 - 50 && switch < n - 100, "the switch at {switch} follows the new key (made at {})", n / 3);
    assert!(agent.stats()["encryption"]["reloads_total"].as_u64() >= Some(1));
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_required_tenant_without_a_key_and_a_refused_key_file_leak_nothing_and_a_new_key_takes_over() {
    let broker = Broker::start();
    broker.create_topic("required", 1);
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_dir.path().join("keys");
    new_key(&keys, "acme");
    let leaky = keys.join("leaky.k1.key");
    std::fs::write(&leaky, [7u8; 32]).expect("write key");
    std::fs::set_permissions(&leaky, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let setup = Setup {
        extra: format!(
            "[discovery]\nenabled = false\n[encryption]\nkeys = \"{}\"\nrequired = [\"bank\"]\n\
             [sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{}\"]\ntopic = \"required\"\n",
            keys.display(),
            broker.address()
        ),
        ..Setup::default()
    };
    let agent = Agent::start(setup);
    let check = logtap(&["config", "check", &agent.config.display().to_string()]);
    assert!(!check.status.success(), "config check passes a group-readable key");
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains(&leaky.display().to_string()) && err.contains("mode is 0640"), "{err}");
    let refused = agent.stats()["encryption"]["refused"].clone();
    assert_eq!(
        refused,
        json!([{ "file": leaky.display().to_string(), "reason": "its mode is 0640: a key file must not be readable or writable by group or others (chmod 600)" }])
    );

    let n = 200;
    for (volume, tenant) in [("bank", "bank"), ("leaky", "leaky"), ("acme", "acme")] {
        let dir = create_volume(&agent, volume, tenant);
        write_lines(&dir.join("app.log"), &numbered(volume, n));
    }
    for tenant in ["bank", "leaky"] {
        let t = wait_sealed(&agent, "files", tenant, "dropped_records_total", n as u64);
        assert_eq!(t["dropped_records_total"], n as u64, "{tenant}: {t}");
        assert_eq!(t["plaintext_records_total"], 0, "{tenant}: {t}");
        let t = wait_sealed(&agent, "kafka", tenant, "dropped_records_total", n as u64);
        assert_eq!(t["dropped_records_total"], n as u64, "{tenant}: {t}");
    }
    assert_eq!(
        wait_sealed(&agent, "kafka", "acme", "sealed_records_total", n as u64)["sealed_records_total"],
        n as u64
    );

    // A key for the bank: its records are sealed from then on, without a restart.
    let id = new_key(&keys, "bank");
    std::thread::sleep(Duration::from_millis(500));
    write_lines(&agent.mount.join("bank/app.log"), &numbered("later", n));
    let t = wait_sealed(&agent, "files", "bank", "sealed_records_total", n as u64);
    assert_eq!(
        (t["sealed_records_total"].as_u64(), t["dropped_records_total"].as_u64()),
        (Some(n as u64), Some(n as u64))
    );
    let out = decrypt(&keys, Some("bank"), &sink_file(&agent, Some("bank"), "bank", "app"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out.stdout), numbered("later", n));

    // No line of the bank or of leaky before its key is anywhere: files or topic.
    agent.wait_delivered("kafka", 2 * n as u64, WAIT);
    let got = consume(&broker.address(), "required", 2 * n, Duration::from_secs(3));
    assert_eq!(got.len(), 2 * n, "acme's and the bank's later records only");
    for m in &got {
        assert!(m.headers.contains_key("key_id"), "every message sealed: {:?}", m.headers);
        assert!(!contains(&m.value, "a secret"), "plaintext on the topic");
    }
    assert!(got.iter().any(|m| m.headers["key_id"] == id));
    for f in files_under(&agent.out) {
        assert!(!contains(&std::fs::read(&f).expect("read"), "a secret"), "plaintext in {}", f.display());
    }
}
