//! Real loggers and shell tools writing into real logtap volumes; what arrives in the sink.
//!
//! Every test runs in each way the volumes can serve files (the `passthrough`, `requests` and
//! `writeback` modules at the end): passthrough by default, the fallback the agent uses where
//! the kernel refuses passthrough, and the writeback cache a user may opt into.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use logtap_e2e::{as_strings, log_lines, numbered, read_json_lines, Agent, Serving, Setup, Sink};

const WAIT: Duration = Duration::from_secs(60);
const LINE_WRITER: &str = env!("CARGO_BIN_EXE_line-writer");

fn agent(serving: Serving) -> Agent {
    Agent::start(Setup { serving, ..Setup::default() })
}

fn append(path: &std::path::Path) -> std::fs::File {
    OpenOptions::new().create(true).append(true).open(path).expect("open for append")
}

fn python_rotating_file_handler_every_line_once_in_order(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("py");
    let n = 200_000;
    let script = r#"
import logging, logging.handlers, sys
path, n = sys.argv[1], int(sys.argv[2])
h = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=3)
h.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("t"); log.addHandler(h); log.setLevel(logging.INFO)
for i in range(n):
    log.info("line %08d %s", i, "p" * 40)
h.close()
"#;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(vol.join("app.log"))
        .arg(n.to_string())
        .status()
        .expect("python3 (cargo xtask setup installs it)");
    assert!(status.success());
    // Rotation really happened inside the volume.
    assert!(vol.join("app.log.1").exists() && vol.join("app.log.3").exists());
    assert!(!vol.join("app.log.4").exists());

    let lines = agent.wait_lines("py", "app", n, WAIT);
    let expected: Vec<String> = (0..n).map(|i| format!("line {i:08} {}", "p".repeat(40))).collect();
    assert_eq!(lines.len(), n, "every line once");
    assert!(as_strings(&lines) == expected, "in order, unchanged");
    let v = agent.volume_stats("py");
    assert_eq!(v["captured_records_total"], n as u64);
    assert_eq!(v["dropped_records_total"], 0);
}

fn a_line_every_100ms_is_captured_within_a_second(serving: Serving) {
    let mut agent = Agent::start(Setup { sink: Sink::Stdout, serving, ..Setup::default() });
    let out = read_json_lines(agent.take_stdout());
    let vol = agent.volume("slow");
    let mut f = append(&vol.join("app.log"));
    let mut written = Vec::new();
    for i in 0..20 {
        writeln!(f, "tick {i}").unwrap();
        written.push(SystemTime::now());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The file stays open: only the flush interval gets the lines out of the page cache.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.stop().success());
    drop(f);
    let records = out.join().unwrap();
    let ticks: Vec<_> = records.iter().filter(|r| r["path"] == "app.log").collect();
    assert_eq!(ticks.len(), 20, "{records:?}");
    for (i, r) in ticks.iter().enumerate() {
        assert_eq!(r["message"], format!("tick {i}"));
        let captured: chrono::DateTime<chrono::Utc> = r["timestamp"].as_str().unwrap().parse().unwrap();
        let latency = SystemTime::from(captured).duration_since(written[i]).unwrap_or_default();
        assert!(latency < Duration::from_secs(1), "line {i} took {latency:?}");
    }
}

fn echo_appends_and_dd_blocks(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("sh");
    for i in 0..50 {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("echo 'echo {i}' >> {}/echo.log", vol.display()))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let src = agent.dir.path().join("src.txt");
    let lines = numbered("dd ", 100_000, 60);
    std::fs::write(&src, lines.join("\n") + "\n").unwrap();
    for bs in ["4k", "1M"] {
        let status = Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}/dd-{bs}.log", vol.display()))
            .arg(format!("bs={bs}"))
            .arg("status=none")
            .status()
            .unwrap();
        assert!(status.success());
    }
    let echoed = agent.wait_lines("sh", "echo", 50, WAIT);
    assert_eq!(as_strings(&echoed), (0..50).map(|i| format!("echo {i}")).collect::<Vec<_>>());
    for bs in ["4k", "1M"] {
        let got = agent.wait_lines("sh", &format!("dd-{bs}"), lines.len(), WAIT);
        assert!(as_strings(&got) == lines, "dd bs={bs}: {} lines", got.len());
    }
    // Read-back of the recent tail: `tail` works on the volume.
    let tail = Command::new("tail").args(["-n", "2"]).arg(vol.join("dd-4k.log")).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&tail.stdout),
        format!("{}\n{}\n", lines[lines.len() - 2], lines[lines.len() - 1])
    );
}

fn copytruncate_restarts_capture_from_zero(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("ct");
    let path = vol.join("app.log");
    let lines = numbered("ct ", 3000, 50);
    let mut f = append(&path);
    for (i, l) in lines.iter().enumerate() {
        writeln!(f, "{l}").unwrap();
        if i == 1000 || i == 2000 {
            // logrotate's copytruncate: copy the file away, truncate it in place.
            f.sync_all().unwrap();
            let copy = agent.dir.path().join(format!("copy{i}"));
            assert!(Command::new("cp").arg(&path).arg(&copy).status().unwrap().success());
            assert!(Command::new("truncate").args(["-s", "0"]).arg(&path).status().unwrap().success());
        }
    }
    drop(f);
    let got = agent.wait_lines("ct", "app", lines.len(), WAIT);
    assert!(as_strings(&got) == lines, "{} lines", got.len());
    // The file restarted at 0: its size is the bytes written since the last truncate.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 999 * 51);
}

fn rename_and_unlink_while_open(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("rot");
    let lines = numbered("r ", 2000, 40);
    let mut f = append(&vol.join("app.log"));
    for l in &lines[..1000] {
        writeln!(f, "{l}").unwrap();
    }
    std::fs::rename(vol.join("app.log"), vol.join("app.log.1")).unwrap();
    for l in &lines[1000..] {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    let got = agent.wait_lines("rot", "app", lines.len(), WAIT);
    assert!(as_strings(&got) == lines);
    // Records written before the rename carry the old name, the rest the new one.
    let files = &agent.volume_stats("rot")["files"];
    let by_name = |n: &str| files[n]["captured_records_total"].as_u64().unwrap_or(0);
    assert_eq!(by_name("app.log") + by_name("app.log.1"), 2000, "{files}");

    let mut g = append(&vol.join("gone.log"));
    writeln!(g, "before unlink").unwrap();
    std::fs::remove_file(vol.join("gone.log")).unwrap();
    writeln!(g, "after unlink").unwrap();
    drop(g);
    let got = agent.wait_lines("rot", "gone", 2, WAIT);
    assert_eq!(as_strings(&got), vec!["before unlink", "after unlink"]);
}

fn two_processes_appending_to_one_file(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("two");
    let path = vol.join("app.log");
    let script = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(int(sys.argv[3])):
    os.write(fd, ("%s-%06d %s\n" % (sys.argv[2], i, "z" * 30)).encode())
os.close(fd)
"#;
    let n = 20_000;
    let children: Vec<_> = ["A", "B"]
        .iter()
        .map(|who| Command::new("python3").args(["-c", script]).arg(&path).arg(who).arg(n.to_string()).spawn().unwrap())
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let got = as_strings(&agent.wait_lines("two", "app", 2 * n, WAIT));
    assert_eq!(got.len(), 2 * n);
    for who in ["A", "B"] {
        let mine: Vec<&String> = got.iter().filter(|l| l.starts_with(who)).collect();
        let expected: Vec<String> = (0..n).map(|i| format!("{who}-{i:06} {}", "z".repeat(30))).collect();
        assert!(
            mine.iter().map(|s| s.as_str()).eq(expected.iter().map(|s| s.as_str())),
            "{who}'s lines whole and in order"
        );
    }
}

fn unterminated_lines_end_at_close_and_after_partial_flush(serving: Serving) {
    let agent = Agent::start(Setup { partial_flush: "500ms".into(), serving, ..Setup::default() });
    let vol = agent.volume("part");
    std::fs::write(vol.join("closed.log"), "a\nb\nlast without newline").unwrap();
    let got = agent.wait_lines("part", "closed", 3, WAIT);
    assert_eq!(as_strings(&got), vec!["a", "b", "last without newline"]);

    // Kept open: the partial line becomes a record after partial_flush.
    let mut f = append(&vol.join("open.log"));
    write!(f, "waiting for its end").unwrap();
    let start = Instant::now();
    let got = agent.wait_lines("part", "open", 1, Duration::from_secs(10));
    assert_eq!(as_strings(&got), vec!["waiting for its end"]);
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(f);
}

fn a_10mb_line_is_split_and_counted_and_binary_passes_unchanged(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("big");
    let line: Vec<u8> = (0..10_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut data = line.clone();
    data.push(b'\n');
    std::fs::write(vol.join("huge.log"), &data).unwrap();
    let pieces = 10_000_000usize.div_ceil(256 << 10);
    let got = agent.wait_lines("big", "huge", pieces, WAIT);
    assert_eq!(got.len(), pieces);
    assert!(got.iter().all(|p| p.len() <= 256 << 10));
    assert!(got.concat() == line);
    assert_eq!(agent.volume_stats("big")["files"]["huge.log"]["split_records_total"], pieces as u64);

    // Binary and invalid UTF-8: NUL, 0xff, lone continuation bytes, CR.
    let mut bin = Vec::new();
    for i in 0..1000u32 {
        bin.extend((0..64).map(|j| ((i * 7 + j * 13) % 256) as u8).filter(|&b| b != b'\n'));
        bin.push(b'\n');
    }
    std::fs::write(vol.join("bin.log"), &bin).unwrap();
    let got = agent.wait_lines("big", "bin", 1000, WAIT);
    let mut rebuilt = got.join(&b'\n');
    rebuilt.push(b'\n');
    assert!(rebuilt == bin, "binary bytes pass unchanged");
}

fn filesystem_behaves_like_a_log_directory(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("fs");
    // Nested directories, stat, readdir, chmod, rmdir, O_EXCL, long and tricky names.
    std::fs::create_dir_all(vol.join("a/b")).unwrap();
    std::fs::write(vol.join("a/b/n.log"), "nested\n").unwrap();
    assert_eq!(std::fs::metadata(vol.join("a/b/n.log")).unwrap().len(), 7);
    let names: Vec<String> = std::fs::read_dir(vol.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["b"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(vol.join("a/b/n.log"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(vol.join("a/b/n.log")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::remove_dir(vol.join("a")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    let excl = OpenOptions::new().write(true).create_new(true).open(vol.join("a/b/n.log"));
    assert_eq!(excl.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    let long = vol.join("x".repeat(300));
    assert_eq!(std::fs::write(&long, "x").unwrap_err().raw_os_error(), Some(libc::ENAMETOOLONG));
    assert!(std::fs::write(vol.join("../escape.log"), "x").is_err(), "the root holds volumes only");
    let ok255 = vol.join("y".repeat(255));
    std::fs::write(&ok255, "fine\n").unwrap();
    // Volume names are checked at mkdir.
    assert_eq!(std::fs::create_dir(agent.mount.join("bad name")).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    assert_eq!(std::fs::create_dir(agent.mount.join(".hidden")).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // statfs answers; fsync works; unsupported operations give errors, not crashes.
    let f = OpenOptions::new().append(true).open(vol.join("a/b/n.log")).unwrap();
    f.sync_all().unwrap();
    let st = Command::new("stat").arg("-f").arg(&vol).output().unwrap();
    assert!(st.status.success());
    assert!(std::os::unix::fs::symlink("x", vol.join("link")).is_err());
    assert!(std::fs::hard_link(vol.join("a/b/n.log"), vol.join("hard")).is_err());
    assert!(
        std::fs::rename(vol.join("a/b/n.log"), agent.volume("other").join("n.log")).is_err(),
        "EXDEV across volumes"
    );
    let got = agent.wait_lines("fs", "n", 1, WAIT);
    assert_eq!(as_strings(&got), vec!["nested"]);
    // Nothing of the captured data was written to the disk under the mount point.
    assert!(agent.dir.path().join("volumes").read_dir().is_ok());
}

fn lines_split_across_writes_arrive_whole(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("wt");
    let lines = numbered("wt ", 20_000, 70);
    let mut f = append(&vol.join("app.log"));
    for (i, l) in lines.iter().enumerate() {
        // Lines split across write() calls, as unbuffered writers do.
        let (a, b) = l.split_at(i % l.len());
        f.write_all(a.as_bytes()).unwrap();
        f.write_all(b.as_bytes()).unwrap();
        f.write_all(b"\n").unwrap();
    }
    drop(f);
    let got = agent.wait_lines("wt", "app", lines.len(), WAIT);
    assert!(as_strings(&got) == lines);
    // Nothing captured was written again (writeback page re-sends carry the same bytes).
    assert_eq!(agent.volume_stats("wt")["overwritten_bytes_total"], 0);
}

/// `cat`, `tail` and logrotate's copy open and close a file while its writer is in the middle of
/// a line: the reader's close must not cut the writer's line in two.
fn a_reader_in_the_middle_of_a_writers_line_does_not_split_it(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("rd");
    let path = vol.join("app.log");
    let mut f = append(&path);
    let rounds = 50;
    for i in 0..rounds {
        write!(f, "line {i} first half ").unwrap();
        let cat = Command::new("cat").arg(&path).output().unwrap();
        assert!(cat.status.success() && cat.stdout.ends_with(b"first half "));
        writeln!(f, "second half").unwrap();
    }
    let got = agent.wait_lines("rd", "app", rounds, WAIT);
    drop(f);
    let expected: Vec<String> = (0..rounds).map(|i| format!("line {i} first half second half")).collect();
    assert_eq!(as_strings(&got), expected);
    agent.wait_idle(Duration::from_secs(5));
    assert_eq!(agent.sink_lines("rd", "app").len(), rounds, "no extra record at the writer's close");
}

/// What the files sink delivered for `volume`/`module` must be exactly `want`.
fn assert_delivered_exactly(agent: &Agent, volume: &str, module: &str, want: &[u8], what: &str) {
    let got = agent.wait_sink_bytes(volume, module, want.len() as u64, Duration::from_secs(120));
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        let show = |b: &[u8]| {
            String::from_utf8_lossy(&b[at.saturating_sub(40).min(b.len())..(at + 60).min(b.len())]).into_owned()
        };
        panic!(
            "{what}: {} bytes delivered, {} written; first difference at {at}: {:?} vs {:?}",
            got.len(),
            want.len(),
            show(&got),
            show(want)
        );
    }
}

fn line_writer(args: &[&str]) -> String {
    let out = Command::new(LINE_WRITER).args(args).output().expect("line-writer");
    assert!(out.status.success(), "line-writer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 2M lines of 100 bytes, one write() each, at full speed, again and again: every byte arrives,
/// in every run (a loss that shows once in five runs is a loss).
fn full_speed_lines_arrive_exactly_in_every_run(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("fast");
    // Every write() is a request to the agent without passthrough: fewer runs, same check.
    let runs = if serving == Serving::Passthrough { 20 } else { 3 };
    let (n, len) = (2_000_000u64, 100);
    let want = log_lines(0, n, len);
    for run in 0..runs {
        let module = format!("run{run}x");
        let path = vol.join(format!("{module}.log"));
        line_writer(&["lines", path.to_str().unwrap(), &n.to_string(), &len.to_string()]);
        assert_delivered_exactly(&agent, "fast", &module, &want, &format!("run {run}"));
    }
    let v = agent.volume_stats("fast");
    assert_eq!(v["dropped_bytes_total"], 0);
    assert_eq!(v["captured_records_total"], runs * n);
}

/// 1 GB written in 1 MiB write() calls (lines split across calls): all lines, exact. The
/// volume's budget is set above the gigabyte: this checks the capture of large writes, not the
/// budget (that is `a_volume_over_its_memory_budget_...`).
fn a_gigabyte_of_megabyte_writes_arrives_exactly(serving: Serving) {
    let agent = Agent::start(Setup { serving, volume_memory: "2GiB".into(), ..Setup::default() });
    let vol = agent.volume("big");
    // 1000-byte lines: a million records (the debug-built agent under test frames and writes
    // each one; 100-byte lines would make this ten million).
    let (total, block, len) = (1_000_000_000usize, 1 << 20, 1000);
    let out = line_writer(&[
        "blocks",
        vol.join("mb.log").to_str().unwrap(),
        &total.to_string(),
        &block.to_string(),
        &len.to_string(),
    ]);
    let lines: u64 = out.trim().trim_start_matches("ok ").parse().unwrap();
    let mut want = log_lines(0, lines, len);
    want.truncate(total);
    if want.last() != Some(&b'\n') {
        // The last line is cut at the gigabyte: it arrives as a record ended by the close.
        want.push(b'\n');
    }
    assert_delivered_exactly(&agent, "big", "mb", &want, "1 GB of 1 MiB writes");
}

/// A logrotate config for `path`: `copytruncate`, or rename-and-create with `kill -USR1` to the
/// writer so that it reopens (nginx's way).
fn logrotate_conf(
    dir: &std::path::Path,
    path: &std::path::Path,
    copytruncate: bool,
    writer: u32,
) -> std::path::PathBuf {
    let conf = dir.join(if copytruncate { "copytruncate.conf" } else { "create.conf" });
    let how = if copytruncate {
        "copytruncate".to_string()
    } else {
        format!("create\n  postrotate\n    kill -USR1 {writer}\n  endscript")
    };
    std::fs::write(&conf, format!("{} {{\n  rotate 1000\n  missingok\n  {how}\n}}\n", path.display())).unwrap();
    conf
}

/// logrotate rotating a fast writer's file again and again, by copytruncate and by rename:
/// every line arrives once, whole, none is a NUL byte, and the copies are counted as copies.
fn logrotate_rotations_under_a_fast_writer_lose_and_repeat_nothing(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("rot");
    let path = vol.join("app.log");
    let (n, len) = (1_000_000u64, 100);
    let mut writer = Command::new(LINE_WRITER)
        // A pause of 1 ms every 1000 lines: the writer lasts a second or more however fast.
        .args(["reopening", path.to_str().unwrap(), &n.to_string(), &len.to_string(), "1000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let confs = [true, false].map(|ct| logrotate_conf(agent.dir.path(), &path, ct, writer.id()));
    let state = agent.dir.path().join("logrotate.state");
    let mut rotations = 0;
    while writer.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
        if !path.exists() {
            continue;
        }
        let conf = &confs[rotations % 2];
        let out = Command::new("logrotate").arg("-f").arg("-s").arg(&state).arg(conf).output().unwrap();
        assert!(out.status.success(), "logrotate: {}", String::from_utf8_lossy(&out.stderr));
        rotations += 1;
    }
    assert!(writer.wait().unwrap().success());
    assert!(rotations >= 4, "only {rotations} rotations happened while the writer wrote");

    let mut got = agent.wait_lines("rot", "app", n as usize, WAIT);
    agent.wait_idle(Duration::from_secs(30));
    got = if got.len() < n as usize { got } else { agent.sink_lines("rot", "app") };
    assert!(!got.iter().any(|l| l.contains(&0)), "no NUL byte is delivered");
    let mut seen = vec![0u32; n as usize];
    for (at, l) in got.iter().enumerate() {
        let number = l.get(..10).and_then(|n| std::str::from_utf8(n).ok()).and_then(|n| n.parse().ok());
        let i: usize = number.unwrap_or_else(|| {
            let around: Vec<_> =
                got[at.saturating_sub(2)..(at + 3).min(got.len())].iter().map(|l| String::from_utf8_lossy(l)).collect();
            panic!("not a numbered line, line {at} of {}: {around:#?}", got.len())
        });
        let mut want = log_lines(i as u64, i as u64 + 1, len);
        want.pop();
        assert_eq!(l, &want, "line {i} whole");
        seen[i] += 1;
    }
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let repeated = seen.iter().filter(|&&c| c > 1).count();
    assert_eq!((missing, repeated), (0, 0), "{} lines delivered for {n} written, {rotations} rotations", got.len());
    assert!(agent.volume_stats("rot")["copied_bytes_total"].as_u64().unwrap() > 0, "copies are counted");
}

/// `cp` of a captured file inside the volume is recognised as a copy: not delivered again.
fn a_copy_inside_the_volume_is_not_delivered_again(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("cp");
    let want = log_lines(0, 50_000, 80);
    std::fs::write(vol.join("app.log"), &want).unwrap();
    assert_delivered_exactly(&agent, "cp", "app", &want, "before the copy");
    assert!(Command::new("cp").arg(vol.join("app.log")).arg(vol.join("app.log.1")).status().unwrap().success());
    std::fs::remove_file(vol.join("app.log")).unwrap();
    agent.wait_idle(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert_delivered_exactly(&agent, "cp", "app", &want, "after the copy");
    assert_eq!(agent.volume_stats("cp")["copied_bytes_total"], want.len() as u64);
}

/// SIGTERM while a writer writes a line every 10 ms: every write that returned success is
/// delivered, and the writes after it fail with an errno (none vanishes).
fn sigterm_delivers_every_write_that_succeeded(serving: Serving) {
    let mut agent = agent(serving);
    let vol = agent.volume("term");
    let path = vol.join("app.log");
    let writer = Command::new(LINE_WRITER)
        .args(["paced", path.to_str().unwrap(), "1000", "60", "10"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.stop().success());
    let out = writer.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let ok: u64 = out.lines().find_map(|l| l.strip_prefix("ok ")).and_then(|n| n.parse().ok()).expect("ok N");
    assert!(out.contains("error "), "the writer got an error after the agent stopped: {out}");
    assert!(ok > 50, "{out}");
    let got = agent.sink_lines("term", "app");
    let mut bytes = got.join(&b'\n');
    bytes.push(b'\n');
    assert_eq!(got.len() as u64, ok, "delivered = writes that returned success ({out})");
    assert!(bytes == log_lines(0, ok, 60));
}

/// O_TRUNC reopens (the same lines written again after each) and a sparse write: every line of
/// each round arrives, and the hole is no NUL bytes.
fn o_trunc_reopens_and_sparse_writes(serving: Serving) {
    let agent = agent(serving);
    let vol = agent.volume("tr");
    let round = log_lines(0, 1000, 50);
    for _ in 0..3 {
        std::fs::write(vol.join("app.log"), &round).unwrap();
    }
    let want = [&round[..], &round[..], &round[..]].concat();
    assert_delivered_exactly(&agent, "tr", "app", &want, "three O_TRUNC rounds of the same lines");

    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(vol.join("sparse.log")).unwrap();
    f.write_all_at(b"start\n", 0).unwrap();
    f.write_all_at(b"far away\n", 1 << 20).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(vol.join("sparse.log")).unwrap().len(), (1 << 20) + 9);
    assert_delivered_exactly(&agent, "tr", "sparse", b"start\nfar away\n", "a sparse file");
}

/// A sink that is down (Kafka with no broker) and a writer that does not stop: the ring fills,
/// the bytes wait in the volume's memory up to its budget, and beyond it the oldest are dropped
/// and counted. The volume's memory stays within the budget (plus what one writer adds between
/// two checks).
fn a_volume_over_its_memory_budget_drops_its_oldest_lines_and_counts_them(serving: Serving) {
    let budget = 16u64 << 20;
    let agent = Agent::start(Setup {
        serving,
        sink: Sink::Kafka { brokers: "127.0.0.1:9".into(), settings: "topic = \"t\"\n".into() },
        ring_capacity: "1MiB".into(),
        volume_memory: "16MiB".into(),
        shutdown_timeout: "1s".into(),
        ..Setup::default()
    });
    let vol = agent.volume("flood");
    let (n, len) = (1_000_000u64, 100);
    let mut writer = Command::new(LINE_WRITER)
        .args(["lines", vol.join("app.log").to_str().unwrap(), &n.to_string(), &len.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    loop {
        let done = writer.try_wait().unwrap().is_some();
        peak = peak.max(agent.volume_stats("flood")["memory_bytes"].as_u64().unwrap_or(0));
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let v = agent.volume_stats("flood");
    let dropped = v["dropped_bytes_total"].as_u64().unwrap();
    let captured = v["captured_bytes_total"].as_u64().unwrap() + v["captured_records_total"].as_u64().unwrap();
    assert!(dropped > 0, "{v}");
    assert!(peak <= budget + (8 << 20), "memory {peak} over the {budget} budget");
    assert!(v["memory_bytes"].as_u64().unwrap() <= budget, "{v}");
    // Every byte is captured (framed: delivered, waiting, or dropped by the ring and counted
    // there too) or dropped from the file; some may still wait in the file.
    assert!(captured + dropped + budget >= n * len as u64, "{v}");
}

// Passthrough, the fallback where the kernel refuses it, and the writeback cache.
logtap_e2e::suite!(passthrough: Passthrough, requests: Requests, writeback: Writeback; [
    python_rotating_file_handler_every_line_once_in_order,
    a_line_every_100ms_is_captured_within_a_second,
    echo_appends_and_dd_blocks,
    copytruncate_restarts_capture_from_zero,
    rename_and_unlink_while_open,
    two_processes_appending_to_one_file,
    unterminated_lines_end_at_close_and_after_partial_flush,
    a_10mb_line_is_split_and_counted_and_binary_passes_unchanged,
    filesystem_behaves_like_a_log_directory,
    lines_split_across_writes_arrive_whole,
    a_reader_in_the_middle_of_a_writers_line_does_not_split_it,
    full_speed_lines_arrive_exactly_in_every_run,
    a_gigabyte_of_megabyte_writes_arrives_exactly,
    a_copy_inside_the_volume_is_not_delivered_again,
    a_volume_over_its_memory_budget_drops_its_oldest_lines_and_counts_them,
]);

// What only passthrough and the request fallback keep: the writeback cache (opt-in) holds
// written bytes where the agent cannot see them, so a truncate discards what it held
// (copytruncate under a writer), writes after its last flush at shutdown are refused (counted,
// not delivered), and a sparse page is sent with its zeros. The README says so.
logtap_e2e::suite!(passthrough_exact: Passthrough, requests_exact: Requests; [
    logrotate_rotations_under_a_fast_writer_lose_and_repeat_nothing,
    sigterm_delivers_every_write_that_succeeded,
    o_trunc_reopens_and_sparse_writes,
]);
