//! The `logtap` command: the daemon and the CLI that talks to it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hyper::Method;
use logtap::api::{DiscoverySnapshot, Snapshot, Stdout, TargetSpec, UnwatchSpec, VolumeSnapshot, VolumeSpec};
use logtap::config::{self, Config};
use logtap::control::client;
use logtap::encryption::keys::KeySet;

#[derive(Parser)]
#[command(name = "logtap", version, about = "Diskless container log capture")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SocketArg {
    /// The agent's control socket.
    #[arg(long, env = "LOGTAP_SOCKET", default_value = "/run/logtap/logtap.sock")]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: a keeper process that holds the mount and the ring, and the worker it
    /// starts (again at once if it dies) that does the rest.
    Daemon {
        /// Config file; without it /etc/logtap/logtap.toml is read if present, else the
        /// built-in defaults apply.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The agent's worker (started by `logtap daemon`; alone, it keeps nothing past itself).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Replace the running worker with a new binary, without unmounting or losing what the
    /// ring and the volumes hold.
    Upgrade {
        /// The binary the next worker runs (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The keeper too re-executes itself into the binary (same pid; it passes on all it
        /// holds). A keeper binary that then fails to start takes the mount with it.
        #[arg(long)]
        keeper: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Manage volumes.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Show capture statistics.
    Stats {
        #[command(flatten)]
        socket: SocketArg,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Run a command with its stdout/stderr captured (and passed through to this terminal).
    Run {
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        socket: SocketArg,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Capture the stdout/stderr pipe writes of a process (and its children) or a cgroup.
    Watch {
        #[command(flatten)]
        target: WatchArgs,
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Stop capturing a process, a cgroup or a whole target.
    Unwatch {
        #[command(flatten)]
        target: WatchArgs,
        /// A target id, as `logtap watch` printed it.
        #[arg(long, conflicts_with_all = ["pid", "cgroup"])]
        target_id: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The containers the agent follows: identity, stdout capture, volumes, counters.
    Containers {
        #[command(flatten)]
        socket: SocketArg,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Check or print configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Make and list tenant keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the values of sealed records (files sink lines, or Kafka values back to back);
    /// exits non-zero, with the count, if any record does not open.
    Decrypt {
        #[command(flatten)]
        keys: KeysArg,
        /// The tenant whose stream this is: a record of another tenant fails.
        #[arg(long)]
        tenant: Option<String>,
        /// Files to read; `-` or none: standard input.
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct KeysArg {
    /// The key directory (files TENANT.KEYID.key).
    #[arg(long, env = "LOGTAP_KEYS", default_value = "/etc/logtap/keys")]
    keys: PathBuf,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new key for a tenant (it seals the tenant's records from now on) and print its id.
    New {
        tenant: String,
        #[command(flatten)]
        keys: KeysArg,
    },
    /// List the tenants, their key ids, and the files that are not usable keys.
    List {
        #[command(flatten)]
        keys: KeysArg,
    },
}

/// The identity of captured pipe records.
#[derive(clap::Args)]
struct IdentityArgs {
    /// Service of the records (default: pid-<PID>, or the cgroup's directory name).
    #[arg(long)]
    service: Option<String>,
    /// Module of the records (default: stdout / stderr).
    #[arg(long)]
    module: Option<String>,
}

#[derive(clap::Args)]
struct WatchArgs {
    /// A process id (tgid).
    #[arg(long, conflicts_with = "cgroup")]
    pid: Option<u32>,
    /// A cgroup v2 directory.
    #[arg(long)]
    cgroup: Option<PathBuf>,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume (a directory of the logtap mount) with its identity.
    Create {
        name: String,
        /// Service of its records (default: the volume name).
        #[arg(long)]
        service: Option<String>,
        /// Tenant of its records, whichever container mounts it (its key seals them).
        #[arg(long)]
        tenant: Option<String>,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Owner of the volume directory, UID or UID:GID (e.g. a container's user).
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, Option<u32>)>,
        /// Mode of the volume directory, in octal (e.g. 0777).
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List volumes with their counters.
    List {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file.
    Check { file: PathBuf },
    /// Print the documented default config.
    Default,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn parse_owner(s: &str) -> Result<(u32, Option<u32>), String> {
    let bad = || format!("expected UID or UID:GID, got {s:?}");
    match s.split_once(':') {
        Some((u, g)) => Ok((u.parse().map_err(|_| bad())?, Some(g.parse().map_err(|_| bad())?))),
        None => Ok((s.parse().map_err(|_| bad())?, None)),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("expected an octal mode like 0777, got {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("logtap: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(&p)?),
        None => {
            let p = PathBuf::from(config::DEFAULT_PATH);
            if p.exists() {
                Ok(Config::load(&p)?)
            } else {
                tracing::info!("no {} here: using the built-in defaults", p.display());
                Ok(Config::default())
            }
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon { config } => {
            let mount = load_config(config.clone())?.volumes.mount;
            let args = config.map(|c| vec!["--config".to_string(), c.to_string_lossy().into_owned()]);
            let code = logtap::keeper::run(args.unwrap_or_default(), mount)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Worker { config } => {
            logtap::daemon::run(load_config(config)?, logtap::keeper::client::KeeperLink::from_env())
        }
        Command::Upgrade { binary, keeper, socket } => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe().context("cannot find this binary")?,
            };
            let binary = binary.canonicalize().with_context(|| format!("{}", binary.display()))?;
            let body = serde_json::json!({ "binary": binary.to_string_lossy(), "keeper": keeper }).to_string();
            block_on(client::call(&socket.socket, Method::POST, "/v1/upgrade", Some(body.into_bytes())))?;
            let what = if keeper { "the keeper and the worker" } else { "the worker" };
            println!("upgrading {what} to {}", binary.display());
            Ok(())
        }
        Command::Config { command: ConfigCommand::Default } => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Command::Config { command: ConfigCommand::Check { file } } => {
            let config = Config::load(&file)?;
            if config.encryption.enabled() {
                let keys = KeySet::load(&config.encryption.keys)?;
                for r in &keys.refused {
                    eprintln!("{}: refused: {}", r.file.display(), r.reason);
                }
                if !keys.refused.is_empty() {
                    bail!("{} key files refused in {}", keys.refused.len(), config.encryption.keys.display());
                }
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Keys { command: KeysCommand::New { tenant, keys } } => {
            let (id, path) = logtap::encryption::keys::new_key(&keys.keys, &tenant)?;
            eprintln!("made {}", path.display());
            println!("{id}");
            Ok(())
        }
        Command::Keys { command: KeysCommand::List { keys } } => {
            let set = KeySet::load(&keys.keys)?;
            print!("{}", render_keys(&set.snapshot(&keys.keys, 0)));
            Ok(())
        }
        Command::Decrypt { keys, tenant, files } => decrypt(&keys.keys, tenant.as_deref(), &files),
        Command::Stats { socket, json } => {
            let body = block_on(client::call(&socket.socket, Method::GET, "/v1/stats", None))?;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let snapshot: Snapshot =
                    serde_json::from_slice(&body).context("the agent sent stats this CLI cannot read")?;
                print!("{}", render_stats(&snapshot));
            }
            Ok(())
        }
        Command::Run { identity, socket, command } => {
            let code = run_command(&socket.socket, identity.service, identity.module, &command)?;
            std::process::exit(code);
        }
        Command::Watch { target, identity, socket } => {
            let spec = TargetSpec {
                pid: target.pid,
                cgroup: target.cgroup,
                service: identity.service,
                module: identity.module,
                ..Default::default()
            };
            if spec.pid.is_none() && spec.cgroup.is_none() {
                bail!("name a --pid or a --cgroup");
            }
            let body = serde_json::to_vec(&spec).context("encoding the request")?;
            let answer = block_on(client::call(&socket.socket, Method::POST, "/v1/watch", Some(body)))?;
            println!("{}", String::from_utf8_lossy(&answer).trim());
            Ok(())
        }
        Command::Unwatch { target, target_id, socket } => {
            let spec = UnwatchSpec { pid: target.pid, cgroup: target.cgroup, target: target_id };
            if spec == UnwatchSpec::default() {
                bail!("name a --pid, a --cgroup or a --target-id");
            }
            let body = serde_json::to_vec(&spec).context("encoding the request")?;
            block_on(client::call(&socket.socket, Method::POST, "/v1/unwatch", Some(body)))?;
            Ok(())
        }
        Command::Containers { socket, json } => {
            let body = block_on(client::call(&socket.socket, Method::GET, "/v1/containers", None))?;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let d: DiscoverySnapshot = serde_json::from_slice(&body).context("unreadable container list")?;
                print!("{}", render_discovery(&d));
            }
            Ok(())
        }
        Command::Volume { command: VolumeCommand::List { socket, json } } => {
            let body = block_on(client::call(&socket.socket, Method::GET, "/v1/volumes", None))?;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let volumes: Vec<VolumeSnapshot> = serde_json::from_slice(&body).context("unreadable volume list")?;
                print!("{}", render_volumes(&volumes));
            }
            Ok(())
        }
        Command::Volume { command: VolumeCommand::Create { name, service, tenant, labels, owner, mode, socket } } => {
            let spec = VolumeSpec {
                name,
                service,
                tenant,
                labels: labels.into_iter().collect(),
                uid: owner.map(|o| o.0),
                gid: owner.and_then(|o| o.1),
                mode,
            };
            if let Err(e) = spec.validate() {
                bail!("{e}");
            }
            let body = serde_json::to_vec(&spec).context("encoding the request")?;
            block_on(client::call(&socket.socket, Method::POST, "/v1/volumes", Some(body)))?;
            println!("volume {} is ready: bind-mount it into a container as its log directory", spec.name);
            Ok(())
        }
    }
}

/// `logtap decrypt`: every file (or stdin) through one decryptor; any failure fails the command.
fn decrypt(keys: &std::path::Path, tenant: Option<&str>, files: &[PathBuf]) -> anyhow::Result<()> {
    use logtap::encryption::decrypt::{Decrypted, Decryptor};
    let set = KeySet::load(keys)?;
    for r in &set.refused {
        eprintln!("logtap: {}: refused: {}", r.file.display(), r.reason);
    }
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut d = Decryptor { keys: &set, tenant, out, errors: std::io::stderr(), done: Decrypted::default() };
    let stdin = [PathBuf::from("-")];
    for file in if files.is_empty() { &stdin[..] } else { files } {
        if file.as_os_str() == "-" {
            d.read("stdin", std::io::stdin().lock()).context("reading stdin")?;
        } else {
            let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
            d.read(&file.display().to_string(), std::io::BufReader::with_capacity(1 << 20, f))
                .with_context(|| format!("reading {}", file.display()))?;
        }
    }
    std::io::Write::flush(&mut d.out).context("writing the values")?;
    if d.done.failed > 0 {
        bail!("{} of {} records did not decrypt", d.done.failed, d.done.failed + d.done.opened);
    }
    Ok(())
}

/// `logtap run`: the agent watches this process, the command is forked from it (and so is
/// followed), then this process stops being watched and relays the command's output.
fn run_command(
    socket: &std::path::Path,
    service: Option<String>,
    module: Option<String>,
    argv: &[String],
) -> anyhow::Result<i32> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let me = std::process::id();
    // A call that got no answer (the agent's worker restarting) is made again, for a while.
    let post = |path: &str, body: Vec<u8>| {
        let since = std::time::Instant::now();
        loop {
            match block_on(client::call(socket, Method::POST, path, Some(body.clone()))) {
                Err(e) if client::may_answer_later(&e) && since.elapsed() < UNANSWERED => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                answer => return answer,
            }
        }
    };
    // The command's stdout and stderr are pipes made here, so that the agent knows them before
    // the command writes: writes to any other pipe (`a | b` inside the command) are not its output.
    let (out_read, out_write) = pipe().context("cannot make the command's stdout pipe")?;
    let (err_read, err_write) = pipe().context("cannot make the command's stderr pipe")?;
    let spec = TargetSpec {
        pid: Some(me),
        service,
        module,
        stdout_pipe: Some(out_write.metadata()?.ino()),
        stderr_pipe: Some(err_write.metadata()?.ino()),
        ..Default::default()
    };
    let target = match post("/v1/watch", serde_json::to_vec(&spec)?) {
        Ok(answer) => serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["target"].as_str().map(str::to_string)),
        Err(e) => {
            eprintln!("logtap run: the output is NOT captured: {e:#}");
            None
        }
    };
    let (program, args) = argv.split_first().context("no command given")?;
    // The Command (and with it this process's copies of the write ends) is gone after spawn,
    // so the relays see the end of the output when the command's side closes.
    let spawned = std::process::Command::new(program).args(args).stdout(out_write).stderr(err_write).spawn();
    if target.is_some() {
        let unwatch = UnwatchSpec { pid: Some(me), ..Default::default() };
        if let Err(e) = post("/v1/unwatch", serde_json::to_vec(&unwatch)?) {
            eprintln!("logtap run: {e:#}");
        }
    }
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            if let Some(id) = target {
                let done = UnwatchSpec { target: Some(id), ..Default::default() };
                let _ = post("/v1/unwatch", serde_json::to_vec(&done)?);
            }
            return Err(e).with_context(|| format!("cannot run {program}"));
        }
    };
    fn relay(mut from: std::fs::File, to: fn() -> Box<dyn std::io::Write>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = vec![0u8; 64 << 10];
            let mut out = to();
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        })
    }
    let relays = [relay(out_read, || Box::new(std::io::stdout())), relay(err_read, || Box::new(std::io::stderr()))];
    // Say at once when the capture stops (the agent restarted or went away), not at the end.
    let exited = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let watcher = target.clone().map(|id| {
        let (socket, exited, lost) = (socket.to_path_buf(), exited.clone(), lost.clone());
        std::thread::spawn(move || {
            let mut failing_since = None;
            while !exited.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(250));
                if let Some(why) = capture_stopped(&socket, &id, &mut failing_since) {
                    if !exited.load(Ordering::Relaxed) {
                        eprintln!("logtap run: the output is NOT captured from here on: {why}");
                        lost.store(true, Ordering::Relaxed);
                    }
                    return;
                }
            }
        })
    });
    let status = child.wait().context("waiting for the command")?;
    for r in relays {
        let _ = r.join();
    }
    exited.store(true, Ordering::Relaxed);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    if let Some(id) = target.filter(|_| !lost.load(Ordering::Relaxed)) {
        let done = UnwatchSpec { target: Some(id), ..Default::default() };
        if let Err(e) = post("/v1/unwatch", serde_json::to_vec(&done)?) {
            eprintln!("logtap run: {e:#}");
        }
    }
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// A pipe whose ends are not inherited by accident (close-on-exec; `Command` dups the end it
/// gives the child).
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) })
}

/// Why the agent no longer captures target `id`, if it does not: the agent does not answer, or
/// it has no such target (it was restarted).
/// Why the capture of target `id` stopped, if it did: the agent says the target is gone, no
/// agent listens, or it has not answered for [`UNANSWERED`] (a restarting worker's keeper holds
/// the socket, and the next worker answers within that).
fn capture_stopped(
    socket: &std::path::Path,
    id: &str,
    failing_since: &mut Option<std::time::Instant>,
) -> Option<String> {
    let Err(e) = block_on(client::call(socket, Method::GET, &format!("/v1/targets/{id}"), None)) else {
        *failing_since = None;
        return None;
    };
    if !client::may_answer_later(&e) {
        return Some(format!("{e:#}"));
    }
    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
    (since.elapsed() >= UNANSWERED).then(|| format!("{e:#}"))
}

/// How long `logtap run` waits for an agent that took a call and did not answer.
const UNANSWERED: std::time::Duration = std::time::Duration::from_secs(10);

fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn render_volumes(volumes: &[VolumeSnapshot]) -> String {
    let row = |name: &str, service: &str, c: &logtap::counters::CountersSnapshot| {
        format!(
            "{:<24} {:<16} {:>12} {:>11} {:>10} {:>10} {:>8} {:>10} {:>12} {:>10}\n",
            name,
            service,
            c.captured_records_total,
            bytes(c.captured_bytes_total),
            bytes(c.dropped_bytes_total),
            bytes(c.throttled_bytes_total),
            c.split_records_total,
            bytes(c.copied_bytes_total),
            bytes(c.overwritten_bytes_total),
            bytes(c.refused_bytes_total)
        )
    };
    let mut out = format!(
        "{:<24} {:<16} {:>12} {:>11} {:>10} {:>10} {:>8} {:>10} {:>12} {:>10}\n",
        "VOLUME / FILE",
        "SERVICE",
        "RECORDS",
        "BYTES",
        "DROPPED",
        "THROTTLED",
        "SPLIT",
        "COPIED",
        "OVERWRITTEN",
        "REFUSED"
    );
    for v in volumes {
        out += &row(&v.name, &v.service, &v.totals);
        if !v.tenant.is_empty() {
            out += &format!("  tenant {}\n", v.tenant);
        }
        for (path, c) in &v.files {
            out += &row(&format!("  {path}"), "", c);
        }
    }
    out
}

fn render_pipes(p: &logtap::api::PipesSnapshot) -> String {
    let mut out = format!("\npipes (eBPF): {}", p.status);
    if let Some(reason) = &p.reason {
        out += &format!(": {reason}");
    }
    out += &format!(", {} pending\n", bytes(p.pending_bytes));
    if let Some(c) = &p.containers {
        out += &format!(
            "containers: {} held ({}), {} records unnamed, {} of other cgroups ignored, {} unresolved, \
             {} lost in the kernel\n",
            c.held_records,
            bytes(c.held_bytes),
            c.unidentified_records_total,
            bytes(c.ignored_bytes_total),
            bytes(c.unresolved_bytes_total),
            bytes(c.lost_bytes_total)
        );
    }
    if p.targets.is_empty() {
        return out;
    }
    out += &format!(
        "{:<16} {:<28} {:<16} {:>10} {:>11} {:>12} {:>10} {:>10} {:>8} {:>10}\n",
        "TARGET", "WATCHING", "SERVICE", "WRITES", "BYTES", "RECORDS", "TRUNCATED", "LOST", "DROPPED", "THROTTLED"
    );
    for t in &p.targets {
        let what = match (&t.spec.pid, &t.spec.cgroup, &t.container_identity) {
            (Some(pid), _, _) => format!("pid {pid}"),
            (_, Some(cg), _) => format!("cgroup {}", cg.display()),
            (_, _, Some(c)) if !c.name.is_empty() => format!("container {}", c.name),
            (_, _, Some(c)) => format!("container {}", logtap::discovery::identity::short_id(&c.id)),
            _ => String::new(),
        };
        let what = if t.ended { format!("{what} (ended)") } else { what };
        out += &format!(
            "{:<16} {:<28} {:<16} {:>10} {:>11} {:>12} {:>10} {:>10} {:>8} {:>10}\n",
            t.id,
            what,
            t.service_name,
            t.writes_total,
            bytes(t.written_bytes_total),
            t.totals.captured_records_total,
            bytes(t.truncated_bytes_total),
            bytes(t.lost_bytes_total),
            t.totals.dropped_records_total,
            t.totals.throttled_records_total
        );
    }
    out
}

fn render_discovery(d: &DiscoverySnapshot) -> String {
    let r = &d.runtime;
    let mut out = format!("\ncontainers ({}): {}", r.socket.display(), r.status);
    if let Some(reason) = &r.reason {
        out += &format!(": {reason}");
    }
    out += &format!(", {} reconnects, {} events\n", r.reconnects_total, r.events_total);
    if d.containers.is_empty() {
        return out;
    }
    out += &format!(
        "{:<14} {:<20} {:<16} {:<10} {:<8} {:<10} {:>10} {:>11} {:>10} {:>11}  {}\n",
        "CONTAINER",
        "NAME",
        "SERVICE",
        "TENANT",
        "STATE",
        "STDOUT",
        "RECORDS",
        "BYTES",
        "LOST",
        "OTHER PIPES",
        "VOLUMES"
    );
    for c in &d.containers {
        let i = &c.info;
        let stdout = match i.stdout {
            Stdout::Captured => "captured",
            Stdout::OptedOut => "opted out",
            Stdout::NotCapturable => "NO",
        };
        out += &format!(
            "{:<14} {:<20} {:<16} {:<10} {:<8} {:<10} {:>10} {:>11} {:>10} {:>11}  {}\n",
            logtap::discovery::identity::short_id(&i.id),
            i.name,
            i.service,
            i.tenant,
            i.state,
            stdout,
            c.pipe.captured_records_total,
            bytes(c.pipe.captured_bytes_total),
            bytes(c.lost_bytes_total),
            bytes(c.other_pipe_bytes_total),
            i.volumes.join(",")
        );
        if let Some(reason) = &i.reason {
            out += &format!("  not capturable: {reason}\n");
        }
    }
    out
}

/// The tenants with records or losses, and the sources holding most of the ring.
fn render_tenants(r: &logtap::api::RingSnapshot) -> String {
    let mut out = String::new();
    let shown: Vec<_> = r
        .tenants
        .iter()
        .filter(|t| !t.tenant.is_empty() || t.dropped_records_total + t.throttled_records_total > 0)
        .collect();
    if !shown.is_empty() {
        out +=
            &format!("{:<24} {:>11} {:>12} {:>11} {:>12} {:>11}\n", "TENANT", "HELD", "DROPPED", "", "THROTTLED", "");
        for t in shown {
            let name = if t.tenant.is_empty() { "(none)" } else { &t.tenant };
            out += &format!(
                "{:<24} {:>11} {:>12} {:>11} {:>12} {:>11}\n",
                name,
                bytes(t.held_bytes),
                t.dropped_records_total,
                bytes(t.dropped_bytes_total),
                t.throttled_records_total,
                bytes(t.throttled_bytes_total)
            );
        }
    }
    let top: Vec<String> = r.sources.iter().take(3).map(|s| format!("{} {}", s.source, bytes(s.held_bytes))).collect();
    if !top.is_empty() {
        out += &format!("holding most: {}\n", top.join(", "));
    }
    out
}

/// Which processes serve, and how the last worker ended.
fn render_life(s: &Snapshot) -> String {
    let Some(keeper) = s.keeper_pid else {
        return format!("worker pid {} (no keeper: a restart loses the mount)\n", s.worker_pid);
    };
    let mut out = format!("keeper pid {keeper}, worker pid {}, {} restarts", s.worker_pid, s.restarts);
    if let Some(r) = &s.last_restart {
        out += &format!(
            "; last: {}, {:.1} ms to serve again, {} records carried over, {} delivered again",
            r.exit, r.gap_ms, r.carried_records, r.redelivered_records
        );
        if r.unread_pipe_bytes > 0 {
            out += &format!(", {} of pipe output not read (other eBPF programs)", bytes(r.unread_pipe_bytes));
        }
    }
    out + "\n"
}

fn render_stats(s: &Snapshot) -> String {
    let r = &s.ring;
    let mut out = format!("logtap {} on {}, up {:.0}s\n", s.version, s.host, s.uptime_seconds);
    out += &render_life(s);
    out += "\n";
    out += &format!(
        "ring: {} of {} used ({} of memory), {} records, policy {}; dropped {} records ({}), throttled {} \
         records ({})\n",
        bytes(r.used_bytes),
        bytes(r.capacity_bytes),
        bytes(r.memory_bytes),
        r.records,
        r.policy,
        r.dropped_records_total,
        bytes(r.dropped_bytes_total),
        r.throttled_records_total,
        bytes(r.throttled_bytes_total)
    );
    out += &render_tenants(r);
    out += "\n";
    out += &format!("volumes: {}", s.volume_serving.mode);
    if let Some(reason) = &s.volume_serving.reason {
        out += &format!(" ({reason})");
    }
    out += "\n";
    out += &render_volumes(&s.volumes);
    out += &render_pipes(&s.pipes);
    if let Some(d) = &s.discovery {
        out += &render_discovery(d);
    }
    out += &format!(
        "\n{:<16} {:<8} {:>12} {:>11} {:>9} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10}\n",
        "SINK", "TYPE", "DELIVERED", "BYTES", "IN FLIGHT", "RETRIED", "ERRORS", "REJECTED", "P50", "P99", "MAX"
    );
    for k in &s.sinks {
        let skipped = r.readers.iter().find(|x| x.name == k.name).map_or(0, |x| x.dropped_records_total);
        out += &format!(
            "{:<16} {:<8} {:>12} {:>11} {:>9} {:>8} {:>8} {:>9} {:>9.1}ms {:>9.1}ms {:>9.1}ms\n",
            k.name,
            k.kind,
            k.delivered_records_total,
            bytes(k.delivered_bytes_total),
            k.in_flight_records,
            k.retried_records_total,
            k.errors_total,
            k.rejected_records_total,
            k.latency.p50_seconds * 1e3,
            k.latency.p99_seconds * 1e3,
            k.latency.max_seconds * 1e3
        );
        if skipped > 0 {
            out += &format!("  missed {skipped} records the ring dropped before this sink read them\n");
        }
        if k.split_records_total > 0 {
            out += &format!("  split {} records too long for one message\n", k.split_records_total);
        }
        for (topic, d) in &k.topics {
            out += &format!(
                "  topic {topic}: {} records, {}\n",
                d.delivered_records_total,
                bytes(d.delivered_bytes_total)
            );
        }
        for (tenant, t) in &k.encryption {
            let name = if tenant.is_empty() { "(none)" } else { tenant };
            let mut line =
                format!("  tenant {name}: sealed {} records ({})", t.sealed_records_total, bytes(t.sealed_bytes_total));
            if t.plaintext_records_total > 0 {
                line += &format!(", IN CLEAR {} records (no key)", t.plaintext_records_total);
            }
            if t.dropped_records_total > 0 {
                line += &format!(
                    ", DROPPED {} records ({}) without a usable key",
                    t.dropped_records_total,
                    bytes(t.dropped_bytes_total)
                );
            }
            if t.waiting_records > 0 {
                line += &format!(", {} waiting for a key", t.waiting_records);
            }
            out += &line;
            out += "\n";
        }
        if !k.errors_by_kind.is_empty() {
            let kinds: Vec<String> = k.errors_by_kind.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
            out += &format!("  errors by kind: {}\n", kinds.join(", "));
        }
        if let Some(e) = &k.last_error {
            out += &format!("  last error: {e}\n");
        }
    }
    if let Some(e) = &s.encryption {
        out += "\n";
        out += &render_keys(e);
    }
    out
}

/// The key directory: each tenant's keys, and what was refused.
fn render_keys(e: &logtap::api::EncryptionSnapshot) -> String {
    let mut out = format!("keys: {} ({} tenants, {} refused files)\n", e.keys, e.tenants.len(), e.refused.len());
    for t in &e.tenants {
        out += &format!(
            "  {}: seals with {} ({} keys: {})\n",
            t.tenant,
            t.sealing_key,
            t.key_ids.len(),
            t.key_ids.join(", ")
        );
    }
    for r in &e.refused {
        out += &format!("  REFUSED {}: {}\n", r.file, r.reason);
    }
    out
}
