//! A process with known output for the pipe-capture tests: `pipe-writer MODE [ARGS]`.
//! Most modes write to fd 1 and/or fd 2 with plain write(2)/writev(2) calls; `fd`, `reopened`,
//! `vmsplice` and `splice` reach the output pipe the other ways programs do.

use std::io::Read;

fn write_fd(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing from a valid buffer.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                // A non-blocking pipe that is full: wait for room, as event loops do.
                let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 1000) };
                continue;
            }
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            panic!("write: {e}");
        }
        data = &data[n as usize..];
    }
}

fn writev_fd(fd: i32, parts: &[&[u8]]) {
    let iov: Vec<libc::iovec> =
        parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }).collect();
    // SAFETY: iovecs point into live buffers.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
    assert_eq!(n as usize, parts.iter().map(|p| p.len()).sum::<usize>(), "short writev");
}

/// `path` opened for appending (created if need be), as loggers open their files.
fn open_append(path: &str) -> i32 {
    use std::os::fd::IntoRawFd;
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path);
    f.unwrap_or_else(|e| panic!("open {path}: {e}")).into_raw_fd()
}

/// `n` lines `{prefix}-i` to `fd` (just `prefix` for one line), write() and writev() in turn.
fn write_or_writev(fd: i32, n: usize, prefix: &str) {
    for i in 0..n {
        let line = if n == 1 { format!("{prefix}\n") } else { format!("{prefix}-{i}\n") };
        if i % 2 == 0 {
            write_fd(fd, line.as_bytes());
        } else {
            let (a, b) = line.as_bytes().split_at(line.len() / 2);
            writev_fd(fd, &[a, b]);
        }
    }
}

/// `n` lines of `len` bytes to `fd`, one write each, at `rate` bytes/s (0: as fast as it goes);
/// `fill` may write line `i` into the buffer (its newline stays).
fn pace(fd: i32, n: usize, len: usize, rate: usize, mut fill: impl FnMut(usize, &mut [u8])) {
    let mut line = vec![b'x'; len - 1];
    line.push(b'\n');
    let start = std::time::Instant::now();
    for i in 0..n {
        fill(i, &mut line[..len - 1]);
        write_fd(fd, &line);
        if rate > 0 && i % 16 == 15 {
            let due = std::time::Duration::from_secs_f64(((i + 1) * len) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        // N lines "line-i" on stdout, one write each.
        "lines" => {
            let prefix = std::env::args().nth(3).unwrap_or_else(|| "line".into());
            for i in 0..arg(2, 10) {
                write_fd(1, format!("{prefix}-{i}\n").as_bytes());
            }
        }
        // Alternating stdout/stderr.
        "interleaved" => {
            for i in 0..arg(2, 100) {
                write_fd(1, format!("out-{i}\n").as_bytes());
                write_fd(2, format!("err-{i}\n").as_bytes());
            }
        }
        // One write per size, each a line of that many bytes (newline included).
        "sizes" => {
            for size in [1usize, 2, 100, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20] {
                let mut line: Vec<u8> = (0..size - 1).map(|i| b'a' + (i % 26) as u8).collect();
                line.push(b'\n');
                write_fd(1, &line);
            }
        }
        // writev with parts that split lines, then one with more iovecs than are followed.
        "writev" => {
            for i in 0..arg(2, 100) {
                let a = format!("v{i}-");
                writev_fd(1, &[a.as_bytes(), b"abc", b"\nnext-", b"def\n"]);
            }
            let many: Vec<Vec<u8>> = (0..10).map(|i| format!("p{i}").into_bytes()).collect();
            let mut refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
            refs.push(b"\n");
            writev_fd(1, &refs);
        }
        // Threads writing whole lines concurrently.
        "threads" => {
            let n = arg(2, 1000);
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    std::thread::spawn(move || {
                        for i in 0..n {
                            write_fd(1, format!("T{t}-{i}\n").as_bytes());
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
        // Child processes writing to the inherited stdout.
        "children" => {
            let me = std::env::current_exe().unwrap();
            let kids: Vec<_> = (0..3)
                .map(|c| {
                    std::process::Command::new(&me)
                        .args(["lines", &arg(2, 100).to_string(), &format!("child{c}")])
                        .spawn()
                        .unwrap()
                })
                .collect();
            for mut k in kids {
                assert!(k.wait().unwrap().success());
            }
        }
        // Bytes that are not text, in lines.
        "binary" => {
            for i in 0..arg(2, 200u32 as usize) {
                let mut line: Vec<u8> =
                    (0..64u32).map(|j| ((i as u32 * 7 + j * 13) % 256) as u8).filter(|&b| b != b'\n').collect();
                line.push(b'\n');
                write_fd(2, &line);
            }
        }
        // A last line without its newline, then exit.
        "exit-mid-line" => {
            write_fd(1, b"complete\n");
            write_fd(1, b"partial at exit");
        }
        // Output redirected away from the pipe: to a file and to /dev/null, then a marker on
        // the real stdout.
        "redirected" => {
            let path = std::env::args().nth(2).expect("file path");
            // SAFETY: plain fd juggling on our own process.
            unsafe {
                let saved = libc::dup(1);
                let file = std::fs::File::create(&path).unwrap();
                libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), 1);
                write_fd(1, b"to the file\n");
                let null = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
                libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
                write_fd(1, b"to /dev/null\n");
                libc::dup2(saved, 1);
            }
            write_fd(1, b"marker\n");
        }
        // Waits for a byte on stdin, then writes N lines of LEN bytes to a non-blocking stdout.
        "nonblock" => {
            let mut go = [0u8; 1];
            std::io::stdin().read_exact(&mut go).unwrap();
            // SAFETY: fcntl on our own fd.
            unsafe { libc::fcntl(1, libc::F_SETFL, libc::fcntl(1, libc::F_GETFL) | libc::O_NONBLOCK) };
            let len = arg(3, 1000);
            for i in 0..arg(2, 2000) {
                let mut line = format!("nb-{i:06}-").into_bytes();
                line.resize(len - 1, b'x');
                line.push(b'\n');
                write_fd(1, &line);
            }
        }
        // Benchmark: `flood N LEN RATE [OUT]` waits for a byte on stdin, then N writes of LEN
        // bytes (each a line) to stdout, as fast as possible or paced to RATE bytes/s. OUT: an
        // fd number, or a path opened for appending (`/dev/stdout`), instead of stdout.
        "flood" => {
            let out = std::env::args().nth(5).map_or(1, |out| out.parse().unwrap_or_else(|_| open_append(&out)));
            let mut go = [0u8; 1];
            std::io::stdin().read_exact(&mut go).unwrap();
            pace(out, arg(2, 100_000), arg(3, 100), arg(4, 0), |_, _| {});
        }
        // `paced N LEN RATE START_MS [FILE]`: from START_MS (Unix time, ms) on, N numbered
        // lines of LEN bytes at RATE bytes/s, to FILE (appended) or stdout: a container's logger.
        "paced" => {
            let (n, len, rate, start_ms) = (arg(2, 100_000), arg(3, 100), arg(4, 0), arg(5, 0));
            let fd = std::env::args().nth(6).map_or(1, |path| open_append(&path));
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            if let Some(wait) = std::time::Duration::from_millis(start_ms as u64).checked_sub(now) {
                std::thread::sleep(wait);
            }
            pace(fd, n, len, rate, |i, line| {
                let number = format!("{i:08}");
                line[..number.len()].copy_from_slice(number.as_bytes());
            });
        }
        // `fd N FD PREFIX`: N lines `PREFIX-i` to an inherited fd (a shell's `exec 3>&1`),
        // write() and writev() in turn.
        "fd" => {
            let fd = arg(3, 1) as i32;
            let prefix = std::env::args().nth(4).unwrap_or_else(|| "fd".into());
            write_or_writev(fd, arg(2, 10), &prefix);
        }
        // `reopened N PREFIX OUT ERR`: opens the paths OUT and ERR (`/dev/stdout`,
        // `/proc/self/fd/2`, as nginx opens its logs linked there) and writes N lines
        // `PREFIX-out-i` to the first and `PREFIX-err-i` to the second, write() and writev()
        // in turn.
        "reopened" => {
            let n = arg(2, 10);
            let prefix = std::env::args().nth(3).unwrap_or_else(|| "re".into());
            // O_APPEND, as nginx opens its logs: a file there is appended to, not overwritten.
            let open = |i: usize| open_append(&std::env::args().nth(i).expect("OUT and ERR paths"));
            let (out, err) = (open(4), open(5));
            for i in 0..n {
                write_or_writev(out, 1, &format!("{prefix}-out-{i}"));
                write_or_writev(err, 1, &format!("{prefix}-err-{i}"));
            }
        }
        // `vmsplice N PREFIX`: N lines `PREFIX-i` into the stdout pipe with vmsplice(2) (or
        // write(2) where seccomp refuses vmsplice).
        "vmsplice" => {
            let prefix = std::env::args().nth(3).unwrap_or_else(|| "vm".into());
            // The pipe holds references to these pages until it is read: they are never freed,
            // so that the allocator does not write into them.
            let lines: &[String] = (0..arg(2, 10)).map(|i| format!("{prefix}-{i}\n")).collect::<Vec<_>>().leak();
            for line in lines {
                let iov = libc::iovec { iov_base: line.as_ptr() as *mut _, iov_len: line.len() };
                // SAFETY: one iovec over a buffer that lives until the process exits.
                let n = unsafe { libc::vmsplice(1, &iov, 1, 0) };
                let e = std::io::Error::last_os_error();
                if n < 0 && e.raw_os_error() == Some(libc::EPERM) {
                    // podman's default seccomp profile refuses vmsplice: the line is written.
                    write_fd(1, line.as_bytes());
                    continue;
                }
                assert_eq!(n as usize, line.len(), "vmsplice: {e}");
            }
        }
        // `splice FILE`: the file's bytes into the stdout pipe with splice(2), as `pv` and
        // some copy tools do: no user buffer passes.
        "splice" => {
            use std::os::fd::AsRawFd;
            let path = std::env::args().nth(2).expect("FILE");
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            loop {
                // SAFETY: valid fds, no offsets.
                let n = unsafe {
                    libc::splice(file.as_raw_fd(), std::ptr::null_mut(), 1, std::ptr::null_mut(), 1 << 16, 0)
                };
                assert!(n >= 0, "splice: {}", std::io::Error::last_os_error());
                if n == 0 {
                    break;
                }
            }
        }
        other => {
            eprintln!("pipe-writer: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}
