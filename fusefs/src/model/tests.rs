use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proptest::prelude::*;

use super::*;
use crate::capture::Serving;
use crate::reader::enforce_budget;
use crate::tap::Drain;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Volume(String),
    VolumeGone(String),
    Stream(String, String),
    Append(String, Vec<u8>),
    Copied(String, u64),
    Dropped(String, u64),
    Overwritten(String, u64),
    Refused(String, u64),
    End(String),
    Moved(String, String),
}

#[derive(Clone, Default)]
struct Recorder {
    log: Arc<Mutex<Vec<Event>>>,
    /// Streams say they are not ready while this is set (a full ring).
    full: Arc<AtomicBool>,
}

struct RecStream {
    path: String,
    rec: Recorder,
    /// Bytes since the last line end, as a framer holds them.
    partial: u64,
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }
    fn push(&self, e: Event) {
        self.log.lock().unwrap().push(e);
    }
    fn appended(&self, path: &str) -> Vec<u8> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Append(p, d) if p == path => Some(d),
                _ => None,
            })
            .flatten()
            .collect()
    }
    fn sum(&self, pick: impl Fn(&Event) -> Option<u64>) -> u64 {
        self.events().iter().filter_map(pick).sum()
    }
}

impl Capture for Recorder {
    type Stream = RecStream;
    fn volume_created(&self, volume: &str) {
        self.push(Event::Volume(volume.into()));
    }
    fn volume_removed(&self, volume: &str) {
        self.push(Event::VolumeGone(volume.into()));
    }
    fn stream(&self, volume: &str, path: &str, _creator: u32) -> RecStream {
        self.push(Event::Stream(volume.into(), path.into()));
        RecStream { path: path.into(), rec: self.clone(), partial: 0 }
    }
    fn serving(&self, _how: &Serving) {}
}

impl Stream for RecStream {
    fn ready(&mut self) -> bool {
        !self.rec.full.load(Relaxed)
    }
    fn append(&mut self, data: &[u8]) {
        self.partial = match data.iter().rposition(|&b| b == b'\n') {
            Some(nl) => (data.len() - nl - 1) as u64,
            None => self.partial + data.len() as u64,
        };
        self.rec.push(Event::Append(self.path.clone(), data.to_vec()));
    }
    fn flush(&mut self) {}
    fn copied(&mut self, bytes: u64) {
        self.rec.push(Event::Copied(self.path.clone(), bytes));
    }
    fn dropped(&mut self, bytes: u64) {
        self.rec.push(Event::Dropped(self.path.clone(), bytes));
    }
    fn overwritten(&mut self, bytes: u64) {
        self.rec.push(Event::Overwritten(self.path.clone(), bytes));
    }
    fn refused(&mut self, bytes: u64) {
        self.rec.push(Event::Refused(self.path.clone(), bytes));
    }
    fn end_record(&mut self) {
        self.partial = 0;
        self.rec.push(Event::End(self.path.clone()));
    }
    fn moved(&mut self, path: &str) {
        self.rec.push(Event::Moved(self.path.clone(), path.into()));
        self.path = path.into();
    }
    fn held(&mut self, _bytes: u64) {}
    fn idle(&mut self, _now: Instant) {}
    fn unsettled(&self) -> Option<u64> {
        Some(self.partial)
    }
}

const ME: Owner = Owner { uid: 0, gid: 0 };
/// A process that copies.
const COPIER: u32 = 4242;

fn model_with(tail: u64, holes_may_fill: bool) -> (Model<Recorder>, Recorder) {
    let rec = Recorder::default();
    let options = Options { settings: Settings { tail, holes_may_fill }, max_files: 8, budget: 64 << 20 };
    (Model::new(rec.clone(), options, ME, None).unwrap(), rec)
}

fn model() -> (Model<Recorder>, Recorder) {
    model_with(4096, false)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A model with volume `v` and a file `v/app.log` open for writing: (model, recorder, volume,
/// file, the writer's handle).
fn with_open_file() -> (Model<Recorder>, Recorder, u64, u64, u64) {
    let (mut m, rec) = model();
    let vol = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let file = m.create(vol, os("app.log"), 0o644, ME, 0).unwrap().ino;
    let fh = m.open(file, false, true, 1).unwrap();
    (m, rec, vol, file, fh)
}

/// A write through passthrough: straight into the file's memory, at the end (O_APPEND).
fn append(m: &Model<Recorder>, ino: u64, data: &[u8]) {
    let t = m.tap(ino).unwrap();
    t.backing().write_at(data, t.size()).unwrap();
}

/// What the capture reader does when woken.
fn drain(m: &Model<Recorder>, ino: u64) {
    m.tap(ino).unwrap().drain(Drain::Ready).unwrap();
}

fn lines(from: usize, n: usize) -> Vec<u8> {
    (from..from + n).flat_map(|i| format!("line {i:06} of the log\n").into_bytes()).collect()
}

#[test]
fn volumes_are_validated_and_announced() {
    let (mut m, rec) = model();
    assert_eq!(m.mkdir(ROOT, os(".hidden"), 0o755, ME).unwrap_err(), libc::EINVAL);
    assert_eq!(m.mkdir(ROOT, os("a b"), 0o755, ME).unwrap_err(), libc::EINVAL);
    assert_eq!(m.mkdir(ROOT, os(&"x".repeat(300)), 0o755, ME).unwrap_err(), libc::ENAMETOOLONG);
    m.mkdir(ROOT, os("web"), 0o755, ME).unwrap();
    assert_eq!(m.mkdir(ROOT, os("web"), 0o755, ME).unwrap_err(), libc::EEXIST);
    assert_eq!(m.create(ROOT, os("f"), 0o644, ME, 0).unwrap_err(), libc::EPERM);
    assert_eq!(m.volumes(), vec!["web".to_string()]);
    m.rmdir(ROOT, os("web")).unwrap();
    assert_eq!(rec.events(), vec![Event::Volume("web".into()), Event::VolumeGone("web".into())]);
}

#[test]
fn passthrough_and_request_writes_are_captured_once_in_order() {
    let (mut m, rec, _vol, f, _fh) = with_open_file();
    append(&m, f, b"one\ntw");
    drain(&m, f);
    drain(&m, f);
    append(&m, f, b"o\n");
    m.write(f, 8, b"three\n").unwrap();
    assert_eq!(rec.appended("app.log"), b"one\ntwo\nthree\n");
    assert_eq!(m.getattr(f).unwrap().size, 14);
    assert_eq!(m.read(f, 4, 100).unwrap(), b"two\nthree\n");
    // A request that writes captured bytes again: counted only if they change.
    m.write(f, 0, b"one\n").unwrap();
    m.write(f, 0, b"ONE\n").unwrap();
    assert_eq!(rec.sum(|e| matches!(e, Event::Overwritten(..)).then_some(4)), 4);
    assert_eq!(rec.appended("app.log"), b"one\ntwo\nthree\n");
}

#[test]
fn a_full_stream_leaves_the_bytes_in_the_file_until_it_is_ready() {
    let (m, rec, _vol, f, _fh) = with_open_file();
    rec.full.store(true, Relaxed);
    append(&m, f, b"waits\n");
    assert_eq!(m.tap(f).unwrap().drain(Drain::Ready).unwrap(), crate::tap::Progress::Waiting);
    assert!(rec.appended("app.log").is_empty());
    rec.full.store(false, Relaxed);
    drain(&m, f);
    assert_eq!(rec.appended("app.log"), b"waits\n");
}

#[test]
fn a_hole_is_never_delivered() {
    // Through passthrough: memory comes in pages, and the zeros around the written bytes are
    // the hole's.
    let (mut m, rec, _vol, f, fh) = with_open_file();
    append(&m, f, b"a\n");
    let t = m.tap(f).unwrap();
    t.backing().write_at(b"b\n", 100_000).unwrap();
    m.release(fh).unwrap();
    assert_eq!(rec.appended("app.log"), b"a\nb\n");
}

#[test]
fn a_hole_written_by_requests_is_never_delivered() {
    let (mut m, rec, _vol, f, fh) = with_open_file();
    m.write(f, 0, b"a\n").unwrap();
    m.write(f, 100_000, b"b\n").unwrap();
    m.write(f, 100_002, b"c\n").unwrap();
    m.release(fh).unwrap();
    assert_eq!(rec.appended("app.log"), b"a\nb\nc\n");
}

#[test]
fn with_the_writeback_cache_a_hole_waits_for_its_page() {
    let (mut m, rec) = model_with(4096, true);
    let vol = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let f = m.create(vol, os("app.log"), 0o644, ME, 0).unwrap().ino;
    let fh = m.open(f, false, true, 1).unwrap();
    // The kernel sends the second page before the first.
    let first = vec![b'x'; 4096];
    m.write(f, 4096, b"second page\n").unwrap();
    assert!(rec.appended("app.log").is_empty(), "waits for the first page");
    m.write(f, 0, &first).unwrap();
    let mut expected = first.clone();
    expected.extend_from_slice(b"second page\n");
    assert_eq!(rec.appended("app.log"), expected);
    // A hole still there at the last close is a hole.
    m.write(f, 3 * 4096, b"after a real hole\n").unwrap();
    m.release(fh).unwrap();
    expected.extend_from_slice(b"after a real hole\n");
    assert_eq!(rec.appended("app.log"), expected);
}

/// The writeback cache sent the rest of a page after the next page: the bytes between were not
/// written yet (they read as zeros in memory) and wait.
#[test]
fn with_the_writeback_cache_the_rest_of_a_page_sent_late_is_not_zeros() {
    let (mut m, rec) = model_with(4096, true);
    let vol = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let f = m.create(vol, os("app.log"), 0o644, ME, 0).unwrap().ino;
    m.open(f, false, true, 1).unwrap();
    let content = lines(0, 400);
    m.write(f, 0, &content[..3416]).unwrap();
    m.write(f, 4096, &content[4096..]).unwrap();
    assert_eq!(rec.appended("app.log"), &content[..3416]);
    m.write(f, 3416, &content[3416..4096]).unwrap();
    assert!(rec.appended("app.log") == content);
    assert_eq!(rec.sum(|e| matches!(e, Event::Overwritten(..)).then_some(1)), 0);
}

#[test]
fn truncate_captures_what_is_left_then_restarts() {
    let (mut m, rec, _vol, f, _fh) = with_open_file();
    append(&m, f, b"before\n");
    // Not drained by the reader yet: the truncate captures it first.
    m.setattr(f, SetAttr { size: Some(0), ..Default::default() }).unwrap();
    append(&m, f, b"after\n");
    drain(&m, f);
    assert_eq!(rec.appended("app.log"), b"before\nafter\n");
    assert_eq!(m.getattr(f).unwrap().size, 6);
    let ends = rec.events().iter().filter(|e| **e == Event::End("app.log".into())).count();
    assert_eq!(ends, 1, "the truncate ends the record");
}

/// logrotate's copytruncate: read the file, write a copy, truncate the original. The copy's
/// bytes were captured from the original already, also those whose memory was given back
/// (they read as zeros in both files).
#[test]
fn a_copy_of_a_captured_file_is_not_captured_again() {
    let (mut m, rec) = model_with(4096, false);
    let vol = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let f = m.create(vol, os("app.log"), 0o644, ME, 0).unwrap().ino;
    m.open(f, false, true, 1).unwrap();
    let content = lines(0, 200_000);
    append(&m, f, &content);
    while m.tap(f).unwrap().drain(Drain::Ready).unwrap() != crate::tap::Progress::Caught {}
    assert!(m.tap(f).unwrap().held() < content.len() as u64 / 2, "captured bytes were given back");

    let reading = m.open(f, true, false, COPIER).unwrap();
    let copy = m.create(vol, os("app.log.1"), 0o644, ME, COPIER).unwrap().ino;
    let cfh = m.open(copy, false, true, COPIER).unwrap();
    let mut seen = vec![0; m.getattr(f).unwrap().size as usize];
    m.tap(f).unwrap().backing().read_full(&mut seen, 0).unwrap();
    assert!(seen[..4096].iter().all(|&b| b == 0), "the copier reads zeros where memory was given back");
    m.tap(copy).unwrap().backing().write_at(&seen, 0).unwrap();
    m.release(cfh).unwrap();
    m.release(reading).unwrap();
    // The writer goes on after the truncate.
    m.setattr(f, SetAttr { size: Some(0), ..Default::default() }).unwrap();
    append(&m, f, b"new\n");
    drain(&m, f);

    assert!(rec.appended("app.log.1").is_empty(), "nothing of the copy is delivered");
    assert_eq!(rec.sum(|e| if let Event::Copied(_, n) = e { Some(*n) } else { None }), content.len() as u64);
    let mut expected = content.clone();
    expected.extend_from_slice(b"new\n");
    assert!(rec.appended("app.log") == expected);
}

#[test]
fn a_copy_that_goes_its_own_way_is_captured_from_there() {
    let (mut m, rec, vol, f, _fh) = with_open_file();
    append(&m, f, b"shared\n");
    drain(&m, f);
    m.open(f, true, false, COPIER).unwrap();
    let copy = m.create(vol, os("edited.log"), 0o644, ME, COPIER).unwrap().ino;
    append(&m, copy, b"shared\nmine\n");
    drain(&m, copy);
    assert_eq!(rec.appended("edited.log"), b"mine\n");
    // The same bytes written by a process that reads nothing are its own.
    let other = m.create(vol, os("other.log"), 0o644, ME, 7).unwrap().ino;
    append(&m, other, b"shared\n");
    drain(&m, other);
    assert_eq!(rec.appended("other.log"), b"shared\n");
}

#[test]
fn rename_captures_under_the_old_path_first() {
    let (mut m, rec, vol, f, _fh) = with_open_file();
    append(&m, f, b"a\n");
    m.rename(vol, os("app.log"), vol, os("app.log.1"), false).unwrap();
    append(&m, f, b"b\n");
    drain(&m, f);
    assert!(rec.events().contains(&Event::Moved("app.log".into(), "app.log.1".into())));
    assert_eq!(rec.appended("app.log"), b"a\n");
    assert_eq!(rec.appended("app.log.1"), b"b\n");
    assert_eq!(m.lookup(vol, os("app.log")).unwrap_err(), libc::ENOENT);
    assert_eq!(m.lookup(vol, os("app.log.1")).unwrap().ino, f);
}

#[test]
fn rename_over_an_existing_file_unlinks_it() {
    let (mut m, rec, vol, f, _fh) = with_open_file();
    let g = m.create(vol, os("new.log"), 0o644, ME, 0).unwrap().ino;
    m.write(g, 0, b"partial").unwrap();
    m.rename(vol, os("app.log"), vol, os("new.log"), false).unwrap();
    assert!(rec.events().contains(&Event::End("new.log".into())));
    assert_eq!(m.lookup(vol, os("new.log")).unwrap().ino, f);
    assert_eq!(m.rename(vol, os("new.log"), vol, os("new.log"), true), Ok(()));
}

#[test]
fn rename_rules() {
    let (mut m, _rec, v, _f, _fh) = with_open_file();
    let w = m.mkdir(ROOT, os("w"), 0o755, ME).unwrap().ino;
    let d = m.mkdir(v, os("d"), 0o755, ME).unwrap().ino;
    let sub = m.mkdir(d, os("sub"), 0o755, ME).unwrap().ino;
    assert_eq!(m.rename(v, os("app.log"), w, os("x"), false), Err(libc::EXDEV));
    assert_eq!(m.rename(ROOT, os("v"), ROOT, os("v2"), false), Err(libc::EPERM));
    assert_eq!(m.rename(v, os("d"), sub, os("d2"), false), Err(libc::EINVAL));
    assert_eq!(m.rename(v, os("app.log"), v, os("d"), false), Err(libc::EISDIR));
    m.create(v, os("b.log"), 0o644, ME, 0).unwrap();
    assert_eq!(m.rename(v, os("app.log"), v, os("b.log"), true), Err(libc::EEXIST));
    assert_eq!(m.rmdir(v, os("d")), Err(libc::ENOTEMPTY));
    m.rename(d, os("sub"), v, os("sub2"), false).unwrap();
    m.rmdir(v, os("d")).unwrap();
}

#[test]
fn nested_paths_follow_directory_renames() {
    let (mut m, rec) = model();
    let v = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let d = m.mkdir(v, os("d"), 0o755, ME).unwrap().ino;
    m.create(d, os("x.log"), 0o644, ME, 0).unwrap();
    m.rename(v, os("d"), v, os("e"), false).unwrap();
    let events = rec.events();
    assert!(events.contains(&Event::Stream("v".into(), "d/x.log".into())));
    assert!(events.contains(&Event::Moved("d/x.log".into(), "e/x.log".into())));
}

#[test]
fn an_unlinked_open_file_is_captured_until_released_and_forgotten() {
    let (mut m, rec, vol, f, fh) = with_open_file();
    append(&m, f, b"before unlink\n");
    m.unlink(vol, os("app.log")).unwrap();
    append(&m, f, b"after unlink\n");
    assert_eq!(m.getattr(f).unwrap().nlink, 0);
    m.release(fh).unwrap();
    assert!(m.getattr(f).is_ok(), "the kernel still holds a lookup");
    m.forget(f, 1);
    assert_eq!(m.getattr(f).unwrap_err(), libc::ENOENT);
    assert_eq!(rec.appended("app.log"), b"before unlink\nafter unlink\n");
}

#[test]
fn a_readers_close_does_not_end_the_writers_line() {
    let (mut m, rec, _vol, f, writer) = with_open_file();
    append(&m, f, b"first half ");
    let reader = m.open(f, true, false, 9).unwrap();
    m.release(reader).unwrap();
    assert!(!rec.events().contains(&Event::End("app.log".into())), "{:?}", rec.events());
    append(&m, f, b"second half\n");
    m.release(writer).unwrap();
    assert_eq!(rec.appended("app.log"), b"first half second half\n");
    assert_eq!(rec.events().last(), Some(&Event::End("app.log".into())));
    assert_eq!(m.release(writer), Err(libc::EBADF));
}

#[test]
fn records_end_when_the_last_of_several_writers_closes() {
    let (mut m, rec, _vol, f, first) = with_open_file();
    let second = m.open(f, false, true, 2).unwrap();
    append(&m, f, b"partial");
    m.release(first).unwrap();
    assert!(!rec.events().contains(&Event::End("app.log".into())));
    m.release(second).unwrap();
    assert!(rec.events().contains(&Event::End("app.log".into())));
}

#[test]
fn closing_seals_every_file_and_captures_what_came_before() {
    let (mut m, rec, vol, f, _fh) = with_open_file();
    append(&m, f, b"partial");
    m.close();
    assert_eq!(rec.appended("app.log"), b"partial");
    assert!(rec.events().contains(&Event::End("app.log".into())));
    let t = m.tap(f).unwrap();
    assert_eq!(t.backing().write_at(b"late", 7).unwrap_err().raw_os_error(), Some(libc::EPERM));
    assert_eq!(m.write(f, 7, b"more\n"), Err(libc::ESHUTDOWN));
    assert!(rec.events().contains(&Event::Refused("app.log".into(), 5)));
    assert_eq!(m.create(vol, os("n"), 0o644, ME, 0).unwrap_err(), libc::ESHUTDOWN);
    assert_eq!(m.open(f, false, true, 1), Err(libc::ESHUTDOWN));
    assert!(m.open(f, true, false, 1).is_ok());
}

#[test]
fn a_volume_over_its_budget_drops_the_oldest_uncaptured_lines_and_counts_them() {
    let (mut m, rec, vol, f, _fh) = with_open_file();
    let quiet = m.create(vol, os("quiet.log"), 0o644, ME, 0).unwrap().ino;
    append(&m, quiet, b"quiet\n");
    drain(&m, quiet);
    rec.full.store(true, Relaxed);
    let content = lines(0, 100_000);
    append(&m, f, &content);
    m.tap(f).unwrap().drain(Drain::Ready).unwrap();
    let budget = 1 << 20;
    enforce_budget(&m.taps().all(), budget);
    assert!(m.held_bytes() <= budget, "{} held", m.held_bytes());
    rec.full.store(false, Relaxed);
    while m.tap(f).unwrap().drain(Drain::Ready).unwrap() != crate::tap::Progress::Caught {}
    let dropped = rec.sum(|e| if let Event::Dropped(_, n) = e { Some(*n) } else { None });
    let got = rec.appended("app.log");
    assert_eq!(got.len() as u64 + dropped, content.len() as u64, "every byte delivered or counted");
    assert!(content.ends_with(&got), "the newest lines stay, whole");
    assert!(got.starts_with(b"line "));
    assert_eq!(rec.appended("quiet.log"), b"quiet\n");
}

#[test]
fn a_volume_holds_a_bounded_number_of_files() {
    let (mut m, _rec) = model();
    let v = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    for i in 0..8 {
        m.create(v, os(&format!("{i}.log")), 0o644, ME, 0).unwrap();
    }
    assert_eq!(m.create(v, os("one-too-many"), 0o644, ME, 0).unwrap_err(), libc::ENOSPC);
    let zero = m.lookup(v, os("0.log")).unwrap().ino;
    m.unlink(v, os("0.log")).unwrap();
    assert_eq!(m.create(v, os("still-too-many"), 0o644, ME, 0).unwrap_err(), libc::ENOSPC, "still referenced");
    m.forget(zero, 2);
    m.create(v, os("room-again"), 0o644, ME, 0).unwrap();
}

#[test]
fn errors_not_panics() {
    let (mut m, _rec, vol, f, _fh) = with_open_file();
    assert_eq!(m.read(ROOT, 0, 10).unwrap_err(), libc::EISDIR);
    assert_eq!(m.write(ROOT, 0, b"x").unwrap_err(), libc::EISDIR);
    assert_eq!(m.readdir(f).unwrap_err(), libc::ENOTDIR);
    assert_eq!(m.lookup(f, os("x")).unwrap_err(), libc::ENOTDIR);
    assert_eq!(m.getattr(9999).unwrap_err(), libc::ENOENT);
    assert_eq!(m.write(f, u64::MAX - 1, b"xyz").unwrap_err(), libc::EFBIG);
    assert_eq!(m.create(vol, os("a/b"), 0o644, ME, 0).unwrap_err(), libc::EINVAL);
    assert_eq!(m.unlink(vol, os("missing")).unwrap_err(), libc::ENOENT);
}

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` bytes (through passthrough, or with a write request: one or the other for a
    /// file, as the kernel does per inode).
    Append(usize),
    /// The capture reader wakes.
    Drain,
    /// The ring fills up or empties.
    Full(bool),
    /// copytruncate: truncate to 0 (an O_APPEND writer continues at 0).
    Truncate,
    /// `cat` opens and closes the file.
    Reader,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1usize..9000).prop_map(Op::Append),
        3 => Just(Op::Drain),
        1 => any::<bool>().prop_map(Op::Full),
        1 => Just(Op::Truncate),
        1 => Just(Op::Reader),
    ]
}

proptest! {
    /// However writes, drains, a full ring and truncates interleave, every byte written reaches
    /// the stream exactly once, in order, and the given-back memory never shows as content.
    #[test]
    fn every_byte_captured_once(ops in proptest::collection::vec(op(), 1..60), seed in any::<u8>(), requests in any::<bool>()) {
        let (mut m, rec, _vol, f, fh) = with_open_file();
        let byte = |i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
        let mut expected = Vec::new();
        let mut next = 0usize;
        let mut data = |n: usize| -> Vec<u8> { let d: Vec<u8> = (next..next + n).map(byte).collect(); next += n; d };
        for op in ops {
            match op {
                Op::Append(n) if requests => {
                    let d = data(n);
                    let at = m.getattr(f).unwrap().size;
                    m.write(f, at, &d).unwrap();
                    expected.extend(d);
                }
                Op::Append(n) => { let d = data(n); append(&m, f, &d); expected.extend(d); }
                Op::Drain => drain(&m, f),
                Op::Full(full) => rec.full.store(full, Relaxed),
                Op::Truncate => { m.setattr(f, SetAttr { size: Some(0), ..Default::default() }).unwrap(); }
                Op::Reader => { let r = m.open(f, true, false, 3).unwrap(); m.release(r).unwrap(); }
            }
        }
        rec.full.store(false, Relaxed);
        m.release(fh).unwrap();
        prop_assert!(rec.appended("app.log") == expected);
    }
}

/// Holds what a model keeps, as the agent's keeper does.
#[derive(Default)]
struct TestKeeper(Mutex<HashMap<String, File>>);

impl crate::kept::Keeper for TestKeeper {
    fn keep(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.0.lock().unwrap().insert(name.into(), File::from(fd.try_clone_to_owned()?));
        Ok(())
    }
    fn release(&self, name: &str) {
        self.0.lock().unwrap().remove(name);
    }
}

fn keeping() -> (Keeping, Arc<TestKeeper>) {
    let keeper = Arc::new(TestKeeper::default());
    let journal = Arc::new(crate::journal::Journal::new(c"test").unwrap());
    (Keeping { journal, keeper: keeper.clone() }, keeper)
}

/// A worker taking over: the kept journal and files make the model again.
fn take_over(keeping: &Keeping, keeper: &TestKeeper) -> (Model<Recorder>, Recorder) {
    let files = keeper
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(name, f)| Some((kept::file_ino(name)?, f.try_clone().unwrap())))
        .collect();
    let rec = Recorder::default();
    let options = Options { settings: Settings { tail: 0, holes_may_fill: false }, max_files: 8, budget: 64 << 20 };
    (Model::restore(rec.clone(), options, keeping.clone(), files).unwrap(), rec)
}

#[test]
fn a_worker_taking_over_has_the_namespace_handles_and_capture_positions() {
    let (k, keeper) = keeping();
    let rec = Recorder::default();
    let options = Options { settings: Settings { tail: 0, holes_may_fill: false }, max_files: 8, budget: 64 << 20 };
    let mut m = Model::new(rec.clone(), options, ME, Some(k.clone())).unwrap();
    let vol = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let sub = m.mkdir(vol, os("sub"), 0o700, ME).unwrap().ino;
    let f = m.create(sub, os("app.log"), 0o640, Owner { uid: 7, gid: 8 }, 0).unwrap().ino;
    let fh = m.open(f, false, true, 1).unwrap();
    let gone = m.create(vol, os("old.log"), 0o644, ME, 0).unwrap().ino;
    m.unlink(vol, os("old.log")).unwrap();
    m.forget(gone, 1);
    m.commit();
    append(&m, f, b"one\ntw");
    drain(&m, f);
    assert_eq!(rec.appended("sub/app.log"), b"one\ntw");
    assert_eq!(keeper.0.lock().unwrap().len(), 1, "the unlinked file's memory was let go");
    // The worker dies here: nothing of `m` runs again.
    std::mem::forget(m);

    let (mut m2, rec2) = take_over(&k, &keeper);
    assert_eq!(rec2.events()[0], Event::Volume("v".into()));
    let a = m2.lookup(sub, os("app.log")).unwrap();
    assert_eq!((a.ino, a.perm, a.uid, a.gid, a.size), (f, 0o640, 7, 8, 6));
    assert_eq!(m2.lookup(vol, os("old.log")).unwrap_err(), libc::ENOENT);
    assert_eq!(m2.readdir(vol).unwrap().len(), 3, ". .. sub");
    // The partial line is captured again, whole; nothing before it twice.
    append(&m2, f, b"o\n");
    drain(&m2, f);
    assert_eq!(rec2.appended("sub/app.log"), b"two\n");
    // The writer's handle is still good, and new numbers do not collide with old ones.
    m2.release(fh).unwrap();
    let f2 = m2.create(vol, os("new.log"), 0o644, ME, 0).unwrap().ino;
    assert!(f2 > gone);
    m2.commit();

    // Again, after the journal was rewritten many times over.
    for _ in 0..20_000 {
        m2.lookup(sub, os("app.log")).unwrap();
        m2.forget(f, 1);
        m2.commit();
    }
    assert!(k.journal.len() < 4 << 20, "the journal is rewritten: {}", k.journal.len());
    std::mem::forget(m2);
    let (mut m3, rec3) = take_over(&k, &keeper);
    assert_eq!(m3.lookup(vol, os("new.log")).unwrap().ino, f2);
    append(&m3, f, b"three\n");
    drain(&m3, f);
    assert_eq!(rec3.appended("sub/app.log"), b"three\n");
}
