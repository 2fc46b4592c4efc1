use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Volume(String),
    VolumeGone(String),
    Stream(String, String),
    Append(String, Vec<u8>),
    Overwritten(String, u64),
    Refused(String, u64),
    End(String),
    Moved(String, String),
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

struct RecStream {
    path: String,
    log: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
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
}

impl Capture for Recorder {
    type Stream = RecStream;
    fn volume_created(&self, volume: &str) {
        self.0.lock().unwrap().push(Event::Volume(volume.into()));
    }
    fn volume_removed(&self, volume: &str) {
        self.0.lock().unwrap().push(Event::VolumeGone(volume.into()));
    }
    fn stream(&self, volume: &str, path: &str, _creator: u32) -> RecStream {
        self.0.lock().unwrap().push(Event::Stream(volume.into(), path.into()));
        RecStream { path: path.into(), log: self.0.clone() }
    }
}

impl Stream for RecStream {
    fn append(&mut self, data: &[u8]) {
        self.log.lock().unwrap().push(Event::Append(self.path.clone(), data.to_vec()));
    }
    fn overwritten(&mut self, bytes: u64) {
        self.log.lock().unwrap().push(Event::Overwritten(self.path.clone(), bytes));
    }
    fn refused(&mut self, bytes: u64) {
        self.log.lock().unwrap().push(Event::Refused(self.path.clone(), bytes));
    }
    fn end_record(&mut self) {
        self.log.lock().unwrap().push(Event::End(self.path.clone()));
    }
    fn moved(&mut self, path: &str) {
        self.log.lock().unwrap().push(Event::Moved(self.path.clone(), path.into()));
        self.path = path.into();
    }
    fn idle(&mut self, _now: Instant) {}
}

const ME: Owner = Owner { uid: 0, gid: 0 };

fn model(tail: usize) -> (Model<Recorder>, Recorder) {
    let rec = Recorder::default();
    (Model::new(rec.clone(), Options { tail_bytes: tail }, ME), rec)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A model with volume `v` and a file `v/app.log` open for writing; returns (model, recorder,
/// file ino).
fn with_file() -> (Model<Recorder>, Recorder, u64) {
    let (m, rec, file, _fh) = with_open_file();
    (m, rec, file)
}

/// [`with_file`] with the writer's handle.
fn with_open_file() -> (Model<Recorder>, Recorder, u64, u64) {
    let (mut m, rec) = model(4096);
    let vol = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let file = m.create(vol, os("app.log"), 0o644, ME, 0).unwrap().ino;
    let fh = m.open(file, true).unwrap();
    (m, rec, file, fh)
}

#[test]
fn volumes_are_validated_and_announced() {
    let (mut m, rec) = model(4096);
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
fn appends_are_captured_once_and_resends_counted() {
    let (mut m, rec, f) = with_file();
    m.write(f, 0, b"hello\n").unwrap();
    // The writeback cache re-sends the page from its start with more bytes.
    m.write(f, 0, b"hello\nworld\n").unwrap();
    assert_eq!(rec.appended("app.log"), b"hello\nworld\n");
    assert!(rec.events().contains(&Event::Overwritten("app.log".into(), 6)));
    assert_eq!(m.getattr(f).unwrap().size, 12);
    assert_eq!(m.read(f, 0, 100).unwrap(), b"hello\nworld\n");
}

#[test]
fn pages_written_back_out_of_order_are_captured_in_order() {
    let (mut m, rec, f) = with_file();
    m.write(f, 0, b"line one\npart").unwrap();
    // The next page arrives before the rest of the first one (seen with the writeback cache).
    m.write(f, 19, b"line three\n").unwrap();
    assert_eq!(rec.appended("app.log"), b"line one\npart");
    m.write(f, 0, b"line one\npart two\n\0").unwrap();
    assert_eq!(rec.appended("app.log"), b"line one\npart two\n\0line three\n");
    assert_eq!(m.getattr(f).unwrap().size, 30);
}

#[test]
fn a_gap_that_never_fills_is_a_hole_after_the_hold() {
    let (mut m, rec, f) = with_file();
    m.write(f, 0, b"a\n").unwrap();
    m.write(f, 100, b"b\n").unwrap();
    m.tick(Instant::now());
    assert_eq!(rec.appended("app.log"), b"a\n", "held within GAP_HOLD");
    m.tick(Instant::now() + GAP_HOLD);
    assert_eq!(rec.appended("app.log"), b"a\nb\n");
}

#[test]
fn truncate_restarts_capture_and_ends_the_record() {
    let (mut m, rec, f) = with_file();
    m.write(f, 0, b"one\ntw").unwrap();
    m.setattr(f, SetAttr { size: Some(0), ..Default::default() }).unwrap();
    m.write(f, 0, b"three\n").unwrap();
    assert_eq!(rec.appended("app.log"), b"one\ntwthree\n");
    let events = rec.events();
    let end = events.iter().position(|e| *e == Event::End("app.log".into())).unwrap();
    let three = events.iter().position(|e| *e == Event::Append("app.log".into(), b"three\n".to_vec())).unwrap();
    assert!(end < three, "the record ends at the truncate: {events:?}");
    assert_eq!(m.read(f, 0, 100).unwrap(), b"three\n");
}

#[test]
fn a_hole_is_not_emitted() {
    let (mut m, rec, f) = with_file();
    m.write(f, 0, b"abc\n").unwrap();
    m.setattr(f, SetAttr { size: Some(0), ..Default::default() }).unwrap();
    // A writer without O_APPEND keeps its offset after copytruncate: the gap may still fill
    // (writeback reorders pages), so the data waits until the gap proves to be a hole.
    m.write(f, 4, b"def\n").unwrap();
    assert_eq!(rec.appended("app.log"), b"abc\n");
    m.fsync(f).unwrap();
    assert_eq!(rec.appended("app.log"), b"abc\ndef\n");
    assert_eq!(m.read(f, 0, 8).unwrap(), b"\0\0\0\0def\n");
}

#[test]
fn rename_keeps_the_stream_and_tells_the_new_path() {
    let (mut m, rec, f) = with_file();
    let vol = m.lookup(ROOT, os("v")).unwrap().ino;
    m.write(f, 0, b"a\n").unwrap();
    m.rename(vol, os("app.log"), vol, os("app.log.1"), false).unwrap();
    m.write(f, 2, b"b\n").unwrap();
    assert!(rec.events().contains(&Event::Moved("app.log".into(), "app.log.1".into())));
    assert_eq!(rec.appended("app.log.1"), b"b\n");
    assert_eq!(m.lookup(vol, os("app.log")).unwrap_err(), libc::ENOENT);
    assert_eq!(m.lookup(vol, os("app.log.1")).unwrap().ino, f);
}

#[test]
fn rename_over_an_existing_file_unlinks_it() {
    let (mut m, rec, f) = with_file();
    let vol = m.lookup(ROOT, os("v")).unwrap().ino;
    let g = m.create(vol, os("new.log"), 0o644, ME, 0).unwrap().ino;
    m.write(g, 0, b"partial").unwrap();
    m.rename(vol, os("app.log"), vol, os("new.log"), false).unwrap();
    assert!(rec.events().contains(&Event::End("new.log".into())));
    assert_eq!(m.lookup(vol, os("new.log")).unwrap().ino, f);
    assert_eq!(m.rename(vol, os("new.log"), vol, os("new.log"), true), Ok(()));
}

#[test]
fn rename_rules() {
    let (mut m, _rec, _f) = with_file();
    let v = m.lookup(ROOT, os("v")).unwrap().ino;
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
    let (mut m, rec) = model(4096);
    let v = m.mkdir(ROOT, os("v"), 0o755, ME).unwrap().ino;
    let d = m.mkdir(v, os("d"), 0o755, ME).unwrap().ino;
    m.create(d, os("x.log"), 0o644, ME, 0).unwrap();
    m.rename(v, os("d"), v, os("e"), false).unwrap();
    let events = rec.events();
    assert!(events.contains(&Event::Stream("v".into(), "d/x.log".into())));
    assert!(events.contains(&Event::Moved("d/x.log".into(), "e/x.log".into())));
}

#[test]
fn unlinked_open_file_lives_until_released_and_forgotten() {
    let (mut m, rec, f, fh) = with_open_file();
    let vol = m.lookup(ROOT, os("v")).unwrap().ino;
    m.write(f, 0, b"tail without newline").unwrap();
    m.unlink(vol, os("app.log")).unwrap();
    assert!(rec.events().contains(&Event::End("app.log".into())));
    // Still writable through the open handle.
    m.write(f, 20, b"!\n").unwrap();
    assert_eq!(m.getattr(f).unwrap().nlink, 0);
    m.release(fh).unwrap();
    assert!(m.getattr(f).is_ok(), "the kernel still holds a lookup");
    m.forget(f, 1);
    assert_eq!(m.getattr(f).unwrap_err(), libc::ENOENT);
}

#[test]
fn a_readers_close_does_not_end_the_writers_line() {
    let (mut m, rec, f, writer) = with_open_file();
    m.write(f, 0, b"first half ").unwrap();
    let reader = m.open(f, false).unwrap();
    assert_eq!(m.read(f, 0, 100).unwrap(), b"first half ");
    m.release(reader).unwrap();
    assert!(!rec.events().contains(&Event::End("app.log".into())), "{:?}", rec.events());
    // A gap held for an out-of-order page stays held too: the reader's close proves nothing.
    m.write(f, 4096, b"later page").unwrap();
    let reader = m.open(f, false).unwrap();
    m.release(reader).unwrap();
    assert_eq!(rec.appended("app.log"), b"first half ");
    m.write(f, 11, b"second half\n").unwrap();
    assert_eq!(rec.appended("app.log"), b"first half second half\n");
    // The last writer's close ends what is left; a handle is released once.
    m.release(writer).unwrap();
    assert_eq!(rec.events().last(), Some(&Event::End("app.log".into())));
    assert_eq!(m.release(writer), Err(libc::EBADF));
}

#[test]
fn records_end_when_the_last_of_several_writers_closes() {
    let (mut m, rec, f, first) = with_open_file();
    let second = m.open(f, true).unwrap();
    m.write(f, 0, b"partial").unwrap();
    m.release(first).unwrap();
    assert!(!rec.events().contains(&Event::End("app.log".into())));
    m.release(second).unwrap();
    assert!(rec.events().contains(&Event::End("app.log".into())));
}

#[test]
fn closing_refuses_writes_and_counts_them() {
    let (mut m, rec, f) = with_file();
    m.write(f, 0, b"partial").unwrap();
    m.close();
    assert!(rec.events().contains(&Event::End("app.log".into())));
    assert_eq!(m.write(f, 7, b"more\n"), Err(libc::ESHUTDOWN));
    assert!(rec.events().contains(&Event::Refused("app.log".into(), 5)));
    let vol = m.lookup(ROOT, os("v")).unwrap().ino;
    assert_eq!(m.create(vol, os("n"), 0o644, ME, 0).unwrap_err(), libc::ESHUTDOWN);
    assert_eq!(m.open(f, true), Err(libc::ESHUTDOWN));
    assert!(m.open(f, false).is_ok());
}

#[test]
fn errors_not_panics() {
    let (mut m, _rec, f) = with_file();
    assert_eq!(m.read(ROOT, 0, 10).unwrap_err(), libc::EISDIR);
    assert_eq!(m.write(ROOT, 0, b"x").unwrap_err(), libc::EISDIR);
    assert_eq!(m.readdir(f).unwrap_err(), libc::ENOTDIR);
    assert_eq!(m.lookup(f, os("x")).unwrap_err(), libc::ENOTDIR);
    assert_eq!(m.getattr(9999).unwrap_err(), libc::ENOENT);
    assert_eq!(m.write(f, u64::MAX - 1, b"xyz").unwrap_err(), libc::EFBIG);
    let vol = m.lookup(ROOT, os("v")).unwrap().ino;
    assert_eq!(m.create(vol, os("a/b"), 0o644, ME, 0).unwrap_err(), libc::EINVAL);
    assert_eq!(m.unlink(vol, os("missing")).unwrap_err(), libc::ENOENT);
}

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` bytes of the true content.
    Append(usize),
    /// Append `n` bytes as two writes, the second half first (writeback reordering pages).
    Reordered(usize),
    /// Re-send from `back` bytes below the end of what was written (writeback page re-send).
    Resend(usize),
    /// copytruncate: truncate to 0 (an O_APPEND writer continues at 0).
    Truncate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1usize..300).prop_map(Op::Append),
        2 => (2usize..300).prop_map(Op::Reordered),
        3 => (1usize..300).prop_map(Op::Resend),
        1 => Just(Op::Truncate),
    ]
}

proptest! {
    /// However writes arrive (appends, page re-sends that overlap what was captured,
    /// truncates), every byte written reaches the stream exactly once, in order.
    #[test]
    fn every_byte_captured_once(ops in proptest::collection::vec(op(), 1..60), seed in any::<u8>()) {
        let (mut m, rec, f) = with_file();
        let byte = |i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed);
        let mut expected = Vec::new();
        // Content of the file since the last truncate.
        let mut content: Vec<u8> = Vec::new();
        let mut overwritten = 0u64;
        for op in ops {
            match op {
                Op::Append(n) => {
                    let start = content.len();
                    let data: Vec<u8> = (0..n).map(|i| byte(expected.len() + i)).collect();
                    m.write(f, start as u64, &data).unwrap();
                    content.extend_from_slice(&data);
                    expected.extend_from_slice(&data);
                }
                Op::Reordered(n) => {
                    let start = content.len();
                    let data: Vec<u8> = (0..n).map(|i| byte(expected.len() + i)).collect();
                    let half = n / 2;
                    m.write(f, (start + half) as u64, &data[half..]).unwrap();
                    m.write(f, start as u64, &data[..half]).unwrap();
                    content.extend_from_slice(&data);
                    expected.extend_from_slice(&data);
                }
                Op::Resend(back) => {
                    let from = content.len().saturating_sub(back);
                    let extra: Vec<u8> = (0..back / 2).map(|i| byte(expected.len() + i)).collect();
                    let mut data = content[from..].to_vec();
                    data.extend_from_slice(&extra);
                    m.write(f, from as u64, &data).unwrap();
                    overwritten += (content.len() - from) as u64;
                    content.extend_from_slice(&extra);
                    expected.extend_from_slice(&extra);
                }
                Op::Truncate => {
                    m.setattr(f, SetAttr { size: Some(0), ..Default::default() }).unwrap();
                    content.clear();
                }
            }
            prop_assert_eq!(m.getattr(f).unwrap().size, content.len() as u64);
        }
        prop_assert_eq!(rec.appended("app.log"), expected);
        let counted: u64 = rec.events().iter().map(|e| match e { Event::Overwritten(_, n) => *n, _ => 0 }).sum();
        prop_assert_eq!(counted, overwritten);
        let tail_from = content.len().saturating_sub(4096);
        prop_assert_eq!(m.read(f, tail_from as u64, 8192).unwrap(), content[tail_from..].to_vec());
    }
}
