//! A log writer with known output for the volume tests: `line-writer MODE PATH [ARGS]`.
//! Lines are [`logtap_e2e::log_line`]s, so a test can say byte for byte what was written.
//!
//! - `lines PATH N LEN`: N lines, one write(2) each, as fast as it can.
//! - `blocks PATH BYTES BLOCK LEN`: lines packed into write(2) calls of BLOCK bytes (lines
//!   split across calls), BYTES in all.
//! - `paced PATH N LEN MS`: a line every MS milliseconds until N were written or a write
//!   fails; prints the writes that succeeded and the error (`ok N`, `error ERRNO`), and at the
//!   end how long write(2) took (`p50_us A p99_us B max_us C`).
//! - `reopening PATH N LEN [EVERY]`: as `lines`, reopening PATH on SIGUSR1 (nginx after a
//!   rotation by rename), and pausing 1 ms after every EVERY lines (so that a test can rotate
//!   the file many times while it writes, however fast the machine); prints `ok N` at the end.
//!
//! Files are opened with O_APPEND (created if missing), as loggers open them.

use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use logtap_e2e::log_line;

static REOPEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    REOPEN.store(true, Ordering::Relaxed);
}

fn open(path: &str) -> i32 {
    match std::fs::OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => f.into_raw_fd(),
        Err(e) => {
            eprintln!("line-writer: cannot open {path}: {e}");
            std::process::exit(2);
        }
    }
}

/// One write(2) of all of `data` (a short write is an error here: files take whole writes).
fn write(fd: i32, data: &[u8]) -> Result<(), i32> {
    loop {
        // SAFETY: writing from a valid buffer.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            return if n as usize == data.len() { Ok(()) } else { Err(libc::EIO) };
        }
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!("line-writer: argument {i} missing or bad: {args:?}");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    let path: String = arg(&args, 1);
    let mut line = Vec::new();
    match mode {
        "lines" | "reopening" => {
            let (n, len): (u64, usize) = (arg(&args, 2), arg(&args, 3));
            let every: u64 = if args.len() > 4 { arg(&args, 4) } else { 0 };
            if mode == "reopening" {
                // SAFETY: installing a handler that only stores an atomic.
                unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
            }
            let mut fd = open(&path);
            for i in 0..n {
                if REOPEN.swap(false, Ordering::Relaxed) {
                    // SAFETY: closing our own fd.
                    unsafe { libc::close(fd) };
                    fd = open(&path);
                }
                line.clear();
                log_line(i, len, &mut line);
                if let Err(e) = write(fd, &line) {
                    eprintln!("line-writer: write {i}: errno {e}");
                    std::process::exit(1);
                }
                if every > 0 && i % every == every - 1 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            println!("ok {n}");
        }
        "blocks" => {
            let (total, block, len): (usize, usize, usize) = (arg(&args, 2), arg(&args, 3), arg(&args, 4));
            let fd = open(&path);
            let (mut i, mut done, mut buf) = (0u64, 0usize, Vec::with_capacity(block + len));
            while done < total {
                while buf.len() < block && done + buf.len() < total {
                    log_line(i, len, &mut buf);
                    i += 1;
                }
                let n = block.min(buf.len()).min(total - done);
                if let Err(e) = write(fd, &buf[..n]) {
                    eprintln!("line-writer: write at {done}: errno {e}");
                    std::process::exit(1);
                }
                buf.drain(..n);
                done += n;
            }
            println!("ok {i}");
        }
        "paced" => {
            let (n, len, ms): (u64, usize, u64) = (arg(&args, 2), arg(&args, 3), arg(&args, 4));
            let fd = open(&path);
            let mut took = Vec::with_capacity(n as usize);
            for i in 0..n {
                line.clear();
                log_line(i, len, &mut line);
                let t = std::time::Instant::now();
                if let Err(e) = write(fd, &line) {
                    println!("ok {i}\nerror {e}");
                    return;
                }
                took.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(ms));
            }
            took.sort();
            let at = |q: f64| took.get(((took.len() as f64 * q) as usize).min(took.len().saturating_sub(1)));
            let us = |d: Option<&Duration>| d.map_or(0, |d| d.as_micros());
            println!("ok {n}\np50_us {} p99_us {} max_us {}", us(at(0.5)), us(at(0.99)), us(took.last()));
        }
        _ => {
            eprintln!("usage: line-writer lines|blocks|paced|reopening PATH ...");
            std::process::exit(2);
        }
    }
}
