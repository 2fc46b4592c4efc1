//! A harness for end-to-end tests: starts the real `logtap` binary on a private mount,
//! socket and sink directory, and reads back what it delivered.
//!
//! The binary is `$LOGTAP_BIN`, else `target/debug/logtap` (`cargo xtask test` builds it).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod broker;
pub mod podman;

pub fn logtap_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOGTAP_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/logtap");
    assert!(p.exists(), "{} is missing: build it first (`cargo xtask test` does)", p.display());
    p
}

/// Fails the test clearly when the machine cannot run it, instead of skipping it.
pub fn require_root_and_fuse() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests mount FUSE filesystems and must run as root");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
}

#[derive(Debug, Clone)]
pub enum Sink {
    /// The files sink into `<tmp>/out`.
    Files,
    /// The stdout sink; the test reads the agent's stdout.
    Stdout,
    /// A Kafka sink named `kafka` on these brokers; `settings` are more lines of its table.
    Kafka { brokers: String, settings: String },
}

/// How the volumes serve files: the default (FUSE passthrough), or the fallbacks the agent
/// uses where the kernel refuses passthrough (every write a request; the writeback cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    Passthrough,
    Requests,
    Writeback,
}

impl Serving {
    /// What `logtap stats` calls it.
    pub fn name(self) -> &'static str {
        match self {
            Serving::Passthrough => "passthrough",
            Serving::Requests => "requests",
            Serving::Writeback => "writeback",
        }
    }
}

/// The parts of the config tests vary.
#[derive(Debug, Clone)]
pub struct Setup {
    pub sink: Sink,
    /// `ring.capacity` and `ring.policy`; empty: the agent's defaults.
    pub ring_capacity: String,
    pub policy: String,
    pub block_timeout: String,
    /// More keys of `[ring]` (rates).
    pub ring: String,
    pub max_record_bytes: String,
    pub partial_flush: String,
    pub flush_interval: String,
    pub serving: Serving,
    /// `volumes.volume_memory`.
    pub volume_memory: String,
    pub shutdown_timeout: String,
    pub timezone: String,
    /// The files sink's `format`: `raw` or `json`.
    pub files_format: String,
    /// More TOML appended to the config (tables the fields above do not cover).
    pub extra: String,
    /// The agent's stdout on a pipe for the test (implied by `Sink::Stdout`).
    pub pipe_stdout: bool,
    /// The agent binary (default [`logtap_bin`]): benchmarks run a previous build beside it.
    pub bin: Option<PathBuf>,
    /// Where the files sink writes (default: `out` in the agent's directory).
    pub out: Option<PathBuf>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            sink: Sink::Files,
            ring_capacity: String::new(),
            policy: String::new(),
            block_timeout: "5s".into(),
            ring: String::new(),
            max_record_bytes: "256KiB".into(),
            partial_flush: "1s".into(),
            flush_interval: "200ms".into(),
            serving: Serving::Passthrough,
            volume_memory: "256MiB".into(),
            shutdown_timeout: "10s".into(),
            timezone: "UTC".into(),
            files_format: "raw".into(),
            extra: String::new(),
            pipe_stdout: false,
            bin: None,
            out: None,
        }
    }
}

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub mount: PathBuf,
    pub socket: PathBuf,
    pub out: PathBuf,
    pub config: PathBuf,
    /// The Docker volume plugin's socket.
    pub plugin: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
}

/// `key = "value"` on a line, or nothing for an empty value (the agent's default).
fn setting(key: &str, value: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!("{key} = \"{value}\"\n")
    }
}

impl Setup {
    fn out(&self, dir: &Path) -> PathBuf {
        self.out.clone().unwrap_or_else(|| dir.join("out"))
    }

    pub fn toml(&self, dir: &Path) -> String {
        let sink = match &self.sink {
            Sink::Files => format!(
                "[sinks.files]\ntype = \"files\"\ndir = \"{}\"\ntimezone = \"{}\"\nformat = \"{}\"\n",
                self.out(dir).display(),
                self.timezone,
                self.files_format
            ),
            Sink::Stdout => "[sinks.stdout]\ntype = \"stdout\"\n".to_string(),
            Sink::Kafka { brokers, settings } => {
                format!("[sinks.kafka]\ntype = \"kafka\"\nbrokers = [\"{brokers}\"]\n{settings}\n")
            }
        };
        format!(
            "shutdown_timeout = \"{}\"\n\
             [volumes]\nmount = \"{}\"\n{}writeback_cache = {}\nmax_record_bytes = \"{}\"\npartial_flush = \"{}\"\n\
             flush_interval = \"{}\"\nplugin_socket = \"{}\"\n\
             [ring]\n{}{}block_timeout = \"{}\"\n{}\
             [control]\nsocket = \"{}\"\n{sink}{}",
            self.shutdown_timeout,
            dir.join("volumes").display(),
            // A previous build (benchmarks) may not know these keys; it had no passthrough.
            if self.bin.is_some() {
                String::new()
            } else {
                format!(
                    "passthrough = {}\nvolume_memory = \"{}\"\n",
                    self.serving == Serving::Passthrough,
                    self.volume_memory
                )
            },
            self.serving == Serving::Writeback,
            self.max_record_bytes,
            self.partial_flush,
            self.flush_interval,
            dir.join("plugin.sock").display(),
            setting("capacity", &self.ring_capacity),
            setting("policy", &self.policy),
            self.block_timeout,
            self.ring,
            dir.join("logtap.sock").display(),
            self.extra,
        )
    }
}

impl Agent {
    pub fn start(setup: Setup) -> Agent {
        require_root_and_fuse();
        let dir = tempfile::Builder::new().prefix("logtap-e2e-").tempdir().expect("tempdir");
        let config = dir.path().join("logtap.toml");
        std::fs::write(&config, setup.toml(dir.path())).expect("write config");
        let piped = matches!(setup.sink, Sink::Stdout) || setup.pipe_stdout;
        let bin = setup.bin.clone().unwrap_or_else(logtap_bin);
        let child = spawn_daemon(&bin, &config, piped);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let agent = Agent {
            mount: dir.path().join("volumes"),
            socket: dir.path().join("logtap.sock"),
            out: setup.out(dir.path()),
            plugin: dir.path().join("plugin.sock"),
            config,
            bin,
            dir,
            child: Some(child),
            rt,
        };
        agent.wait_ready();
        if setup.bin.is_none() {
            let serving = agent.stats()["volume_serving"]["mode"].clone();
            assert_eq!(serving, setup.serving.name(), "the volumes serve files as asked");
        }
        agent
    }

    /// Stops the agent (SIGTERM) and starts a new one on the same config, socket and mount.
    pub fn restart(&mut self) {
        assert!(self.stop().success(), "the agent did not stop cleanly");
        self.child = Some(spawn_daemon(&self.bin, &self.config, false));
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.get("/v1/health").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("logtap did not answer on {} within 20 s", self.socket.display());
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.rt.block_on(logtap::control::client::call(&self.socket, hyper::Method::GET, path, None))?.to_vec())
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Vec<u8>> {
        let body = serde_json::to_vec(body)?;
        Ok(self
            .rt
            .block_on(logtap::control::client::call(&self.socket, hyper::Method::POST, path, Some(body)))?
            .to_vec())
    }

    pub fn stats(&self) -> Value {
        serde_json::from_slice(&self.get("/v1/stats").expect("stats")).expect("stats JSON")
    }

    /// The process doing the agent's work: the worker serving now (the agent's own pid is its
    /// keeper's), or the agent itself for a build without a keeper.
    pub fn worker_pid(&self) -> i32 {
        self.stats()["worker_pid"].as_i64().map_or_else(|| self.pid(), |p| p as i32)
    }

    /// `kill -9` of the worker; returns the stats of the next one once it serves.
    pub fn kill_worker(&self) -> Value {
        let old = self.worker_pid();
        // SAFETY: signalling the agent's worker.
        unsafe { libc::kill(old, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = self.get("/v1/stats") {
                let s: Value = serde_json::from_slice(&body).expect("stats JSON");
                if s["worker_pid"].as_i64().is_some_and(|p| p as i32 != old) {
                    return s;
                }
            }
            assert!(Instant::now() < deadline, "no new worker 30 s after kill -9 of {old}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes a volume with mkdir, as a user would.
    pub fn volume(&self, name: &str) -> PathBuf {
        let p = self.mount.join(name);
        std::fs::create_dir(&p).expect("mkdir volume");
        p
    }

    /// The volume's stats entry.
    pub fn volume_stats(&self, name: &str) -> Value {
        let s = self.stats();
        s["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == name).cloned()).unwrap_or(Value::Null)
    }

    /// Lines the files sink wrote for `service`/`module`, over all days, in order.
    pub fn sink_lines(&self, service: &str, module: &str) -> Vec<Vec<u8>> {
        let data = self.sink_bytes(service, module);
        let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        lines.pop(); // after the last newline
        lines
    }

    /// The bytes the files sink wrote for `service`/`module` (raw format: each record and a
    /// newline), over all days, in order.
    pub fn sink_bytes(&self, service: &str, module: &str) -> Vec<u8> {
        self.sink_files(service, module).iter().flat_map(|f| std::fs::read(f).unwrap_or_default()).collect()
    }

    fn sink_files(&self, service: &str, module: &str) -> Vec<PathBuf> {
        let dir = self.out.join(service);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
        files.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{module}."))));
        files.sort();
        files
    }

    /// Waits until the files sink wrote at least `len` bytes for `service`/`module` and the
    /// agent is idle (or the timeout); returns them.
    pub fn wait_sink_bytes(&self, service: &str, module: &str, len: u64, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let size = || -> u64 {
            self.sink_files(service, module).iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
        };
        while size() < len && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_idle(Duration::from_secs(30));
        self.sink_bytes(service, module)
    }

    /// The files sink's lines for `service`/`module` as JSON (`files_format = "json"`).
    pub fn json_lines(&self, service: &str, module: &str) -> Vec<Value> {
        self.sink_lines(service, module)
            .iter()
            .map(|l| {
                serde_json::from_slice(l).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(l)))
            })
            .collect()
    }

    /// Waits until the files sink holds `n` lines for `service`/`module` (or the timeout).
    pub fn wait_lines(&self, service: &str, module: &str, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.sink_lines(service, module);
            if lines.len() >= n || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A sink's stats entry.
    pub fn sink_stats(&self, name: &str) -> Value {
        let s = self.stats();
        s["sinks"].as_array().and_then(|v| v.iter().find(|k| k["name"] == name).cloned()).unwrap_or(Value::Null)
    }

    /// A ring reader's (a sink's) stats entry: lag, in flight, what it missed.
    pub fn reader_stats(&self, name: &str) -> Value {
        let s = self.stats();
        s["ring"]["readers"]
            .as_array()
            .and_then(|v| v.iter().find(|r| r["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    /// Waits until the sink has delivered at least `n` records (or the timeout); returns its stats.
    pub fn wait_delivered(&self, sink: &str, n: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let k = self.sink_stats(sink);
            if k["delivered_records_total"].as_u64().unwrap_or(0) >= n || Instant::now() >= deadline {
                return k;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the ring is empty and every sink has acknowledged everything.
    pub fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            let ring = &s["ring"];
            let busy = ring["records"].as_u64() != Some(0)
                || ring["readers"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["lag_records"] != 0 || r["in_flight_records"] != 0));
            if !busy {
                return;
            }
            assert!(Instant::now() < deadline, "the agent did not go idle: {ring}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's stdout (the stdout sink); taken once.
    pub fn take_stdout(&mut self) -> ChildStdout {
        self.child.as_mut().and_then(|c| c.stdout.take()).expect("stdout sink output")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running agent")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running agent");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "logtap did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn_daemon(bin: &Path, config: &Path, piped_stdout: bool) -> Child {
    Command::new(bin)
        .args(["daemon", "--config"])
        .arg(config)
        .env("RUST_LOG", std::env::var("LOGTAP_E2E_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(if piped_stdout { Stdio::piped() } else { Stdio::null() })
        .spawn()
        .expect("spawn logtap")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Leave no mount behind, whatever happened.
        if let Ok(c) = std::ffi::CString::new(self.mount.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Reads JSON lines (the stdout sink) on a thread; returns them when the stream ends.
pub fn read_json_lines(out: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<Value>> {
    std::thread::spawn(move || {
        BufReader::new(out).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
    })
}

/// `n` numbered lines `"{prefix}{i:08} {padding}"` of about `len` bytes each.
pub fn numbered(prefix: &str, n: usize, len: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut s = format!("{prefix}{i:08} ");
            while s.len() < len {
                s.push('x');
            }
            s
        })
        .collect()
}

/// Calls `tick(i)` for i in 0..`ticks`, one every 10 ms from now (late ticks catch up).
pub fn every_10ms(ticks: usize, mut tick: impl FnMut(usize)) {
    let start = Instant::now();
    for i in 0..ticks {
        tick(i);
        let due = start + Duration::from_millis(10 * (i as u64 + 1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

pub fn as_strings(lines: &[Vec<u8>]) -> Vec<String> {
    lines.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect()
}

/// Bytes [`other_ways_to_stdout`] splices into stdout.
pub const SPLICED_BYTES: u64 = 100_000;

/// A shell script that reaches its stdout and stderr pipes the ways programs do besides fd 1
/// and 2, with `writer` (the `pipe-writer` binary): opened again as `/dev/stdout` (nginx's logs
/// linked there) and as `/proc/self/fd/1`, through a shell's `exec 3>&1`, with vmsplice(2).
/// Then what is not output: a file written through fd 1, and [`SPLICED_BYTES`] zeros that
/// splice(2) moves into stdout with no user buffer (counted as lost, not copied).
pub fn other_ways_to_stdout(writer: &str) -> String {
    format!(
        "W={writer}; F=/tmp/logtap-ways.$$; $W reopened 500 dev /dev/stdout /dev/stderr && \
         $W reopened 500 proc /proc/self/fd/1 /proc/self/fd/2 && exec 3>&1 4>&2 && $W fd 500 3 dup-out && \
         $W fd 500 4 dup-err && $W vmsplice 500 vm && $W fd 500 1 to-file > $F && \
         head -c {SPLICED_BYTES} /dev/zero > $F && $W splice $F && rm $F"
    )
}

/// The stdout and stderr lines [`other_ways_to_stdout`] writes, in order.
pub fn other_ways_expected() -> (Vec<String>, Vec<String>) {
    let n = |p: &str| (0..500).map(move |i| format!("{p}-{i}")).collect::<Vec<_>>();
    let stdout = [n("dev-out"), n("proc-out"), n("dup-out"), n("vm")].concat();
    let stderr = [n("dev-err"), n("proc-err"), n("dup-err")].concat();
    (stdout, stderr)
}

/// Fails with the first line that differs (and the counts), not with every line.
pub fn assert_lines(got: &[String], want: &[String], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: {} lines, {} expected; line {i} is {:?}, expected {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// Line `i` of [`log_lines`]: `len` bytes with its newline, numbered, the rest padding.
pub fn log_line(i: u64, len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    let _ = std::io::Write::write_fmt(out, format_args!("{i:010} "));
    out.resize(start + len.max(12) - 1, b'a' + (i % 26) as u8);
    out.push(b'\n');
}

/// What `line-writer` writes: lines `from..to` of `len` bytes.
pub fn log_lines(from: u64, to: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((to - from) as usize * len);
    for i in from..to {
        log_line(i, len, &mut out);
    }
    out
}

/// Runs each test in each of the named ways of serving files, as `MODE::TEST`.
#[macro_export]
macro_rules! suite {
    ($($mode:ident: $serving:ident),* ; $tests:tt) => {
        $( $crate::suite!(@mode $mode $serving $tests); )*
    };
    (@mode $mode:ident $serving:ident [$($test:ident),* $(,)?]) => {
        mod $mode {
            $(
                #[test]
                #[ignore = "privileged: mounts FUSE as root (cargo xtask test runs it)"]
                fn $test() {
                    super::$test(logtap_e2e::Serving::$serving)
                }
            )*
        }
    };
}
