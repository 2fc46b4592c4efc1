//! The capture reader: one thread that reads every volume file's new bytes, woken by inotify
//! on the in-memory contents (passthrough writes fire IN_MODIFY there), with a periodic scan as
//! the bound for anything inotify did not tell (its queue overflowed). A file being written is
//! "hot": its watch is taken off (an inotify event costs every write(): measured, a third of a
//! small-line writer's speed) and it is polled every few milliseconds instead, until it has
//! been quiet for a while. The reader also holds each volume to its memory budget.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::capture::Stream;
use crate::sync::lock;
use crate::tap::{Drain, Progress, Tap};

/// How soon capture tries again while the stream is not ready (the ring is full).
const RETRY: Duration = Duration::from_millis(5);
/// How often a file being written is polled.
const HOT_POLL: Duration = Duration::from_millis(5);
/// Polls without new bytes after which a file is watched by inotify again.
const QUIET_POLLS: u32 = 20;

/// Every file capture reads, by inode, with its inotify watch.
pub struct Taps<S> {
    inotify: OwnedFd,
    inner: Mutex<Inner<S>>,
}

struct Inner<S> {
    by_ino: HashMap<u64, (Arc<Tap<S>>, i32)>,
    by_watch: HashMap<i32, u64>,
}

impl<S: Stream> Taps<S> {
    pub fn new() -> io::Result<Arc<Self>> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Self {
            // SAFETY: fd was just made.
            inotify: unsafe { OwnedFd::from_raw_fd(fd) },
            inner: Mutex::new(Inner { by_ino: HashMap::new(), by_watch: HashMap::new() }),
        }))
    }

    /// Starts reading `tap`. Without a watch (the inotify limit reached) the scan still finds it.
    pub fn add(&self, ino: u64, tap: Arc<Tap<S>>) {
        let wd = self.watch(&tap);
        let mut inner = lock(&self.inner);
        inner.by_watch.insert(wd, ino);
        inner.by_ino.insert(ino, (tap, wd));
    }

    fn watch(&self, tap: &Tap<S>) -> i32 {
        let path = format!("/proc/self/fd/{}", tap.backing().file().as_raw_fd());
        let wd = CString::new(path).map_or(-1, |p| {
            // SAFETY: valid fd and C string.
            unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), p.as_ptr(), libc::IN_MODIFY) }
        });
        if wd < 0 {
            tracing::warn!(
                "no inotify watch for a volume file ({}); the periodic scan reads it",
                io::Error::last_os_error()
            );
        }
        wd
    }

    /// Puts the file's watch back (`true`) or takes it off (`false`).
    fn set_watched(&self, ino: u64, on: bool) {
        let mut inner = lock(&self.inner);
        let Some((tap, wd)) = inner.by_ino.get(&ino).map(|(t, w)| (t.clone(), *w)) else { return };
        if on && wd < 0 {
            let wd = self.watch(&tap);
            inner.by_watch.insert(wd, ino);
            inner.by_ino.insert(ino, (tap, wd));
        } else if !on && wd >= 0 {
            self.unwatch(&mut inner, wd);
            inner.by_ino.insert(ino, (tap, -1));
        }
    }

    fn unwatch(&self, inner: &mut Inner<S>, wd: i32) {
        inner.by_watch.remove(&wd);
        // The watch would otherwise keep the memory alive.
        // SAFETY: valid fd and watch.
        unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
    }

    /// Stops reading the file (it is gone).
    pub fn remove(&self, ino: u64) {
        let mut inner = lock(&self.inner);
        if let Some((_, wd)) = inner.by_ino.remove(&ino) {
            if wd >= 0 {
                self.unwatch(&mut inner, wd);
            }
        }
    }

    pub fn all(&self) -> Vec<Arc<Tap<S>>> {
        lock(&self.inner).by_ino.values().map(|(t, _)| t.clone()).collect()
    }

    /// The files inotify says were written, or all of them if its queue overflowed.
    fn woken(&self, out: &mut HashSet<u64>) -> bool {
        let mut buf = [0u8; 16 << 10];
        let mut overflow = false;
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let inner = lock(&self.inner);
            let mut at = 0;
            let n = n as usize;
            while at + std::mem::size_of::<libc::inotify_event>() <= n {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    overflow = true;
                } else if let Some(&ino) = inner.by_watch.get(&ev.wd) {
                    out.insert(ino);
                }
                at += std::mem::size_of::<libc::inotify_event>() + ev.len as usize;
            }
        }
        overflow
    }

    fn get(&self, ino: u64) -> Option<Arc<Tap<S>>> {
        lock(&self.inner).by_ino.get(&ino).map(|(t, _)| t.clone())
    }

    /// Waits for inotify up to `timeout`.
    fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.inotify.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReaderSettings {
    /// The periodic scan and partial-record timeouts run this often.
    pub interval: Duration,
    /// Memory each volume's files may hold.
    pub budget: u64,
}

/// Holds the volume to its budget: kept tails go first, then the oldest uncaptured bytes of
/// the files furthest behind (dropped, counted).
pub fn enforce_budget<S: Stream>(taps: &[Arc<Tap<S>>], budget: u64) {
    let held: u64 = taps.iter().map(|t| t.held()).sum();
    if held <= budget {
        return;
    }
    for t in taps {
        t.release_tail();
    }
    let held: u64 = taps.iter().map(|t| t.held()).sum();
    // Down to 7/8 of the budget, so that a writer at the limit does not cost a drop per write.
    let mut excess = held.saturating_sub(budget - budget / 8);
    if held <= budget {
        return;
    }
    let mut behind: Vec<&Arc<Tap<S>>> = taps.iter().filter(|t| t.behind() > 0).collect();
    behind.sort_by_key(|t| std::cmp::Reverse(t.behind()));
    for t in behind {
        if excess == 0 {
            break;
        }
        let n = t.drop_oldest(excess.min(t.behind()));
        excess = excess.saturating_sub(n);
    }
}

fn by_volume<S: Stream>(taps: Vec<Arc<Tap<S>>>) -> HashMap<u64, Vec<Arc<Tap<S>>>> {
    let mut out: HashMap<u64, Vec<Arc<Tap<S>>>> = HashMap::new();
    for t in taps {
        out.entry(t.volume).or_default().push(t);
    }
    out
}

pub fn spawn<S: Stream>(
    taps: Arc<Taps<S>>,
    settings: ReaderSettings,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("volume-capture".into()).spawn(move || {
        let mut todo: HashSet<u64> = HashSet::new();
        // Files being written, polled instead of watched: polls without new bytes.
        let mut hot: HashMap<u64, u32> = HashMap::new();
        let mut next_scan = Instant::now() + settings.interval;
        let mut waiting = false;
        while !stop.load(Ordering::Relaxed) {
            let until_scan = next_scan.saturating_duration_since(Instant::now());
            let timeout = if waiting || !todo.is_empty() {
                RETRY.min(until_scan)
            } else if !hot.is_empty() {
                HOT_POLL.min(until_scan)
            } else {
                until_scan
            };
            if todo.is_empty() || waiting {
                taps.wait(timeout);
            }
            let overflow = taps.woken(&mut todo);
            todo.extend(hot.keys());
            let now = Instant::now();
            let scan = overflow || now >= next_scan;
            let files: Vec<(u64, Arc<Tap<S>>)> = if scan {
                next_scan = now + settings.interval;
                lock(&taps.inner).by_ino.iter().map(|(&i, (t, _))| (i, t.clone())).collect()
            } else {
                todo.iter().filter_map(|&i| taps.get(i).map(|t| (i, t))).collect()
            };
            todo.clear();
            waiting = false;
            for (ino, tap) in &files {
                let before = tap.position();
                match tap.drain(Drain::Ready) {
                    Ok(Progress::Caught) => {}
                    Ok(Progress::More) => {
                        todo.insert(*ino);
                    }
                    Ok(Progress::Waiting) => {
                        waiting = true;
                        todo.insert(*ino);
                    }
                    Err(e) => tracing::warn!("cannot read a volume file: {e}"),
                }
                if tap.position() != before {
                    if hot.insert(*ino, 0).is_none() {
                        taps.set_watched(*ino, false);
                    }
                } else if let Some(quiet) = hot.get_mut(ino) {
                    *quiet += 1;
                    if *quiet >= QUIET_POLLS {
                        hot.remove(ino);
                        taps.set_watched(*ino, true);
                        // A write between the last poll and the watch: read now.
                        todo.insert(*ino);
                    }
                }
                // A partial line times out only if nothing of the file waits to be read: else its
                // end is likely in what waits.
                if scan && tap.behind() == 0 {
                    tap.with_stream(|s| s.idle(now));
                }
            }
            hot.retain(|ino, _| taps.get(*ino).is_some());
            let touched: HashSet<u64> = files.iter().map(|(_, t)| t.volume).collect();
            for (volume, group) in by_volume(taps.all()) {
                if scan || touched.contains(&volume) {
                    enforce_budget(&group, settings.budget);
                }
            }
        }
    })
}
