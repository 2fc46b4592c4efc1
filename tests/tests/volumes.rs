//! Real loggers and shell tools writing into real logtap volumes; what arrives in the sink.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use logtap_e2e::{as_strings, numbered, read_json_lines, Agent, Setup, Sink};

const WAIT: Duration = Duration::from_secs(60);

fn append(path: &std::path::Path) -> std::fs::File {
    OpenOptions::new().create(true).append(true).open(path).expect("open for append")
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn python_rotating_file_handler_every_line_once_in_order() {
    let agent = Agent::start(Setup::default());
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_line_every_100ms_is_captured_within_a_second() {
    let mut agent = Agent::start(Setup { sink: Sink::Stdout, ..Setup::default() });
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn echo_appends_and_dd_blocks() {
    let agent = Agent::start(Setup::default());
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn copytruncate_restarts_capture_from_zero() {
    let agent = Agent::start(Setup::default());
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn rename_and_unlink_while_open() {
    let agent = Agent::start(Setup::default());
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
    assert!(agent.volume_stats("rot")["files"]["app.log.1"]["captured_records_total"] == 2000);

    let mut g = append(&vol.join("gone.log"));
    writeln!(g, "before unlink").unwrap();
    std::fs::remove_file(vol.join("gone.log")).unwrap();
    writeln!(g, "after unlink").unwrap();
    drop(g);
    let got = agent.wait_lines("rot", "gone", 2, WAIT);
    assert_eq!(as_strings(&got), vec!["before unlink", "after unlink"]);
}

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn two_processes_appending_to_one_file() {
    let agent = Agent::start(Setup::default());
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn unterminated_lines_end_at_close_and_after_partial_flush() {
    let agent = Agent::start(Setup { partial_flush: "500ms".into(), ..Setup::default() });
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_10mb_line_is_split_and_counted_and_binary_passes_unchanged() {
    let agent = Agent::start(Setup::default());
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn filesystem_behaves_like_a_log_directory() {
    let agent = Agent::start(Setup::default());
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

#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn without_the_writeback_cache_every_write_is_captured_the_same() {
    let agent = Agent::start(Setup { writeback_cache: false, ..Setup::default() });
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
    // Offsets are exact without the cache: nothing is sent twice.
    assert_eq!(agent.volume_stats("wt")["overwritten_bytes_total"], 0);
}

/// `cat`, `tail` and logrotate's copy open and close a file while its writer is in the middle of
/// a line: the reader's close must not cut the writer's line in two.
#[test]
#[ignore = "privileged: mounts FUSE and loads eBPF as root (cargo xtask test runs it)"]
fn a_reader_in_the_middle_of_a_writers_line_does_not_split_it() {
    for writeback_cache in [true, false] {
        let agent = Agent::start(Setup { writeback_cache, ..Setup::default() });
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
        assert_eq!(as_strings(&got), expected, "writeback_cache = {writeback_cache}");
        agent.wait_idle(Duration::from_secs(5));
        assert_eq!(agent.sink_lines("rd", "app").len(), rounds, "no extra record at the writer's close");
    }
}
