//! One file's capture: its in-memory content and how far it has been read.
//!
//! The content ([`Backing`]) is the truth: capture reads it in order from `captured` to the end,
//! skipping holes (nothing was written there), and hands the bytes to the file's stream. Bytes
//! already captured are released (their memory given back) except a recent tail that readers
//! such as `tail` want; they then read as zeros, as a hole would.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backing::{Backing, PAGE};
use crate::capture::Stream;
use crate::kept::KeptPosition;
use crate::sync::lock;

/// Most bytes read from a file at once: the records they make wait for the ring at most this
/// much at a time.
const CHUNK: usize = 64 << 10;
/// Released bytes are given back in steps of at least this, not one page at a time.
const RELEASE_STEP: u64 = 256 << 10;
/// How long a hole at the capture point may wait to be filled when the kernel's writeback cache
/// writes pages out of order (a sparse write, from passthrough or plain requests, is final).
pub const HOLE_WAIT: Duration = Duration::from_secs(1);
/// How far past a drop point capture looks for the next line start, so that what follows a
/// drop is whole lines.
const RESYNC: usize = 64 << 10;

/// Settings every file of a mount shares.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Captured bytes kept readable at the end of each file.
    pub tail: u64,
    /// Holes at the capture point may still fill (writeback cache).
    pub holes_may_fill: bool,
}

/// Most bytes one drain reads while the stream is ready, so that one busy file does not keep
/// capture from the others.
const TURN: u64 = 4 << 20;

/// What a drain got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything written so far is captured (or waits in a hole that may still fill).
    Caught,
    /// More is there: this file's turn ended.
    More,
    /// The stream is not ready for more; the rest waits in the file.
    Waiting,
}

/// How far a drain goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// While the stream is ready; writers may still be filling holes.
    Ready,
    /// While the stream is ready; every write has landed (the last writer closed), so holes
    /// are final.
    Landed,
    /// Everything up to the end, holes final, waiting for room as the stream's policy says:
    /// the file is about to change under capture (a truncate of it or of a copy's source) or go
    /// (its last reference, shutdown).
    All,
}

/// Something that happened to the file at an offset: the stream hears of it when capture gets
/// there, so that the bytes before it are told first (without waiting for room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// What came before ends a record (the last writer's close, fsync, unlink).
    End,
    /// The file was renamed to this path.
    Moved(String),
}

struct State<S> {
    stream: S,
    /// Marks by offset, in order.
    marks: VecDeque<(u64, Mark)>,
    /// Every byte below this was handed to the stream, skipped as a hole, or counted.
    captured: u64,
    /// Memory below this was given back.
    released: u64,
    /// The capture position last kept (everything before it is in the ring): memory is
    /// given back only below it, so that a worker taking over can capture the rest again.
    kept_at: u64,
    /// The file is being made as a copy of this one (same offsets): equal bytes are not
    /// captured again.
    copy_of: Option<Arc<Tap<S>>>,
    /// Since when a hole at `captured` has waited to fill.
    hole_since: Option<Instant>,
    /// Known data (no hole) from `captured` up to here, and whether a hole follows (else the
    /// end of the file was there): finding holes scans the file's pages, so it is done once per
    /// stretch of data, not once per read.
    data_until: u64,
    hole_after: bool,
    /// For a file written by requests (no passthrough): the byte ranges written at or above
    /// `captured` (start -> end, apart). Memory comes in pages, so a page the writeback cache
    /// sent before the one below it would read as zeros there; these ranges say exactly what
    /// was written.
    written: Option<BTreeMap<u64, u64>>,
}

/// Where capture may read from `at`: (end of the written stretch there, a gap follows), or the
/// next written byte when `at` is in a gap.
enum Written {
    Until(u64, bool),
    Gap(Option<u64>),
}

fn written_at(ranges: &BTreeMap<u64, u64>, at: u64) -> Written {
    match ranges.range(..=at).next_back() {
        Some((_, &end)) if end > at => Written::Until(end, ranges.range(end..).next().is_some()),
        _ => Written::Gap(ranges.range(at..).next().map(|(&start, _)| start)),
    }
}

/// Adds `[from, to)` to `ranges`, joining what touches it; drops what lies below `floor`.
fn add_written(ranges: &mut BTreeMap<u64, u64>, from: u64, to: u64, floor: u64) {
    let (mut from, mut to) = (from.max(floor), to);
    if from >= to {
        return;
    }
    let touching: Vec<(u64, u64)> = ranges.range(..=to).filter(|(_, &e)| e >= from).map(|(&s, &e)| (s, e)).collect();
    for (s, e) in touching {
        ranges.remove(&s);
        from = from.min(s);
        to = to.max(e);
    }
    ranges.insert(from, to);
    while let Some((&s, &e)) = ranges.first_key_value() {
        if e > floor {
            break;
        }
        ranges.remove(&s);
    }
}

pub struct Tap<S> {
    backing: Backing,
    /// The volume (top-level directory inode) the file belongs to: budgets are per volume.
    pub volume: u64,
    settings: Settings,
    state: Mutex<State<S>>,
    /// Memory the content holds, and bytes not captured yet, as of the last look: budgets sum
    /// them without taking each file's lock.
    held: AtomicU64,
    behind: AtomicU64,
    /// `released`, for copies being compared with this file.
    released: AtomicU64,
    kept: Option<KeptPosition>,
}

/// Length of the common prefix.
fn same_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<S: Stream> Tap<S> {
    /// A file whose content is `backing`, captured from `from` on (0 for a new file; a file
    /// taken over from an earlier worker resumes where that one's position was kept).
    pub fn new(
        volume: u64,
        stream: S,
        settings: Settings,
        backing: Backing,
        from: u64,
        kept: Option<KeptPosition>,
    ) -> Arc<Self> {
        // What was given back below `from` is holes now; capture skips them.
        let released = from / PAGE * PAGE;
        Arc::new(Self {
            backing,
            volume,
            settings,
            state: Mutex::new(State {
                stream,
                marks: VecDeque::new(),
                captured: from,
                released,
                kept_at: from,
                copy_of: None,
                hole_since: None,
                data_until: from,
                hole_after: false,
                written: None,
            }),
            held: AtomicU64::new(0),
            behind: AtomicU64::new(0),
            released: AtomicU64::new(released),
            kept,
        })
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    pub fn size(&self) -> u64 {
        self.backing.size().unwrap_or(0)
    }

    /// How far the file was captured.
    pub fn position(&self) -> u64 {
        lock(&self.state).captured
    }

    /// The capture position last kept.
    pub fn kept_at(&self) -> u64 {
        lock(&self.state).kept_at
    }

    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }

    pub fn behind(&self) -> u64 {
        self.behind.load(Relaxed)
    }

    /// The file is being written as a copy of `source`.
    pub fn copy_of(&self, source: Arc<Tap<S>>) {
        lock(&self.state).copy_of = Some(source);
    }

    pub fn is_copy_of(&self, source: &Arc<Tap<S>>) -> bool {
        lock(&self.state).copy_of.as_ref().is_some_and(|s| Arc::ptr_eq(s, source))
    }

    /// The source is about to change: what was copied so far is settled, the rest is new.
    pub fn settle_copy(&self) -> io::Result<()> {
        if lock(&self.state).copy_of.is_none() {
            return Ok(());
        }
        self.drain(Drain::All)?;
        lock(&self.state).copy_of = None;
        Ok(())
    }

    /// Captures what is there.
    pub fn drain(&self, how: Drain) -> io::Result<Progress> {
        let mut st = lock(&self.state);
        let done = self.drain_locked(&mut st, how);
        self.keep_position(&mut st);
        self.keep_tail(&mut st);
        if how == Drain::All {
            st.stream.flush();
        }
        done
    }

    fn drain_locked(&self, st: &mut State<S>, how: Drain) -> io::Result<Progress> {
        let mut buf = Vec::new();
        let mut theirs = Vec::new();
        let turn_ends = st.captured + TURN;
        let mut after_hole = false;
        loop {
            if how != Drain::All && !st.stream.ready() {
                return Ok(Progress::Waiting);
            }
            Self::apply_marks(st);
            let size = self.backing.size()?;
            if st.captured >= size {
                st.hole_since = None;
                return Ok(Progress::Caught);
            }
            if how != Drain::All && st.captured >= turn_ends {
                return Ok(Progress::More);
            }
            if let Some(ranges) = &st.written {
                match written_at(ranges, st.captured) {
                    Written::Until(end, gap) => {
                        st.data_until = end.min(size);
                        st.hole_after = gap;
                    }
                    Written::Gap(next) => {
                        if how == Drain::Ready && self.settings.holes_may_fill {
                            let since = *st.hole_since.get_or_insert_with(Instant::now);
                            if since.elapsed() < HOLE_WAIT {
                                return Ok(Progress::Caught);
                            }
                        }
                        st.hole_since = None;
                        st.captured = next.map_or(size, |n| n.min(size));
                        continue;
                    }
                }
            } else if st.captured >= st.data_until {
                // Memory below `released` was given back: the pages from there on tell.
                let (whole, end) = self.backing.whole_from(st.released)?;
                if whole && end > st.captured {
                    st.data_until = end.min(size);
                    st.hole_after = false;
                    continue;
                }
                match self.backing.data_from(st.captured)? {
                    Some(e) if e.start <= st.captured => {
                        st.data_until = e.end.min(size);
                        st.hole_after = e.end < size;
                    }
                    next => {
                        // Nothing was written between here and the next data (or the end).
                        if how == Drain::Ready && self.settings.holes_may_fill {
                            let since = *st.hole_since.get_or_insert_with(Instant::now);
                            if since.elapsed() < HOLE_WAIT {
                                return Ok(Progress::Caught);
                            }
                        }
                        st.hole_since = None;
                        st.captured = next.map_or(size, |e| e.start.min(size));
                        after_hole = true;
                        continue;
                    }
                }
            }
            // Reads stop at the next mark, so that it is told between the right bytes.
            let from = st.captured;
            let to = st.marks.front().map_or(st.data_until, |(at, _)| st.data_until.min(*at));
            let hole_next = st.hole_after && to == st.data_until;
            st.hole_since = None;
            let len = ((to - from) as usize).min(CHUNK);
            buf.resize(len, 0);
            let n = self.backing.read_full(&mut buf, from)?;
            if n == 0 {
                return Ok(Progress::Caught);
            }
            // Memory comes in pages: the rest of a page next to a hole reads as zeros that
            // nobody wrote. They are the hole's, not content.
            let mut start = 0;
            let exact = st.written.is_some();
            if after_hole && !exact {
                let in_page = (PAGE - from % PAGE) as usize;
                start = buf[..n.min(in_page)].iter().take_while(|&&b| b == 0).count();
                after_hole = false;
            }
            let mut end = n;
            if hole_next && !exact && from + n as u64 == to {
                let in_page = (to - (to - 1) / PAGE * PAGE) as usize;
                end -= buf[start..n].iter().rev().take(in_page).take_while(|&&b| b == 0).count();
            }
            let at = from + start as u64;
            let mut data = &buf[start..end];
            if let Some(source) = &st.copy_of {
                // What the source gave back was captured; the copier read it before (or as
                // zeros after): those bytes of the copy are copied bytes, unseen.
                theirs.resize(data.len(), 0);
                let m = source.backing.read_full(&mut theirs, at)?;
                // Read after: whatever was given back while we read is included.
                let gone = source.released.load(SeqCst).saturating_sub(at).min(m as u64) as usize;
                theirs[..gone].copy_from_slice(&data[..gone]);
                let mut same = same_prefix(data, &theirs[..m]);
                if same < data.len() {
                    // A copy that goes its own way within a line: that whole line is its own.
                    same = data[..same].iter().rposition(|&b| b == b'\n').map_or(0, |nl| nl + 1);
                }
                if same > 0 {
                    st.stream.copied(same as u64);
                }
                if same < data.len() {
                    // The copy goes its own way from here: what follows is new content.
                    st.copy_of = None;
                }
                data = &data[same..];
            }
            if !data.is_empty() {
                st.stream.append(data);
            }
            st.captured = from + n as u64;
            // Kept chunk by chunk: a worker killed now captures again at most this chunk.
            self.keep_position(st);
            if how == Drain::All {
                st.stream.flush();
            }
        }
    }

    fn apply_marks(st: &mut State<S>) {
        while st.marks.front().is_some_and(|(at, _)| *at <= st.captured) {
            match st.marks.pop_front() {
                Some((_, Mark::End)) => st.stream.end_record(),
                Some((_, Mark::Moved(path))) => st.stream.moved(&path),
                None => {}
            }
        }
    }

    /// `mark` happened now, at the end of what was written: told once capture gets there.
    pub fn mark(&self, mark: Mark) -> io::Result<()> {
        let mut st = lock(&self.state);
        let at = self.backing.size()?;
        let how = if mark == Mark::End { Drain::Landed } else { Drain::Ready };
        st.marks.push_back((at, mark));
        self.drain_locked(&mut st, how)?;
        self.keep_position(&mut st);
        Ok(())
    }

    /// Keeps how far the file's bytes are safe in the ring: what the stream still holds
    /// (a partial line, records waiting for room) is captured again by a worker taking over.
    fn keep_position(&self, st: &mut State<S>) {
        let Some(kept) = &self.kept else {
            st.kept_at = st.captured;
            return;
        };
        let at = match st.stream.unsettled() {
            Some(unsettled) => st.captured.saturating_sub(unsettled),
            // Truncated below the kept position: nothing before the new size is left to take.
            None if st.kept_at > st.captured => st.captured,
            None => return,
        };
        if at != st.kept_at {
            st.kept_at = at;
            kept.write(at);
        }
    }

    /// Gives back captured bytes older than the kept tail.
    fn keep_tail(&self, st: &mut State<S>) {
        let keep_from = st.captured.saturating_sub(self.settings.tail).min(st.kept_at) / PAGE * PAGE;
        if keep_from >= st.released + RELEASE_STEP {
            self.release(st, keep_from);
        }
        self.look(st);
    }

    fn release(&self, st: &mut State<S>, to: u64) {
        let from = st.released;
        let to = to / PAGE * PAGE;
        if to <= from {
            return;
        }
        // Said before it is done: a copy being compared must never see zeros it is not told of.
        self.released.store(to, SeqCst);
        match self.backing.release(from, to) {
            Ok(()) => st.released = to,
            Err(e) => {
                self.released.store(from, SeqCst);
                tracing::warn!("cannot give back a volume file's captured memory: {e}");
            }
        }
    }

    fn look(&self, st: &mut State<S>) {
        let (size, held) = self.backing.usage().unwrap_or((0, 0));
        if self.held.swap(held, Relaxed) != held {
            st.stream.held(held);
        }
        self.behind.store(size.saturating_sub(st.captured), Relaxed);
    }

    /// The volume is over its budget: the kept tail goes first.
    pub fn release_tail(&self) {
        let mut st = lock(&self.state);
        let to = st.kept_at.min(st.captured);
        self.release(&mut st, to);
        self.look(&mut st);
    }

    /// The volume is over its budget and capture is behind: up to `bytes` of the oldest
    /// uncaptured content are dropped (counted), then capture resumes at the next line.
    /// Returns the bytes dropped.
    pub fn drop_oldest(&self, bytes: u64) -> u64 {
        let mut st = lock(&self.state);
        let size = self.size();
        let mut to = (st.captured + bytes).min(size);
        if to <= st.captured {
            return 0;
        }
        let mut look = vec![0; RESYNC];
        if let Ok(n) = self.backing.read_full(&mut look, to) {
            if let Some(nl) = look[..n].iter().position(|&c| c == b'\n') {
                to += nl as u64 + 1;
            }
        }
        let dropped = to - st.captured;
        st.stream.end_record();
        st.stream.dropped(dropped);
        st.captured = to;
        Self::apply_marks(&mut st);
        st.copy_of = None;
        self.keep_position(&mut st);
        let to = st.kept_at.min(to);
        self.release(&mut st, to);
        self.look(&mut st);
        dropped
    }

    /// Writes `data` at `offset` for a write request (no passthrough). Bytes below the capture
    /// point that change are counted as overwritten: they are not captured again.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        {
            let mut st = lock(&self.state);
            let end = offset + data.len() as u64;
            if offset < st.captured && st.released < end {
                let from = offset.max(st.released);
                let to = end.min(st.captured);
                let mut had = vec![0; (to - from) as usize];
                let n = self.backing.read_full(&mut had, from)?;
                let mine = &data[(from - offset) as usize..(to - offset) as usize];
                let changed = had[..n].iter().zip(mine).filter(|(a, b)| a != b).count();
                if changed > 0 {
                    st.stream.overwritten(to - from);
                }
            }
            if st.written.is_none() {
                // Whatever is there already (passthrough writes before a fallback) was written.
                let before = self.backing.size()?;
                let mut ranges = BTreeMap::new();
                if before > st.captured {
                    ranges.insert(st.captured, before);
                }
                st.written = Some(ranges);
            }
            self.backing.write_at(data, offset)?;
            let floor = st.captured;
            if let Some(ranges) = &mut st.written {
                add_written(ranges, offset, end, floor);
            }
        }
        self.drain(Drain::Ready).map(|_| ())
    }

    /// A truncate: what was written before it is captured first.
    pub fn truncate(&self, size: u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        let _ = self.drain_locked(&mut st, Drain::All);
        // Whatever could not be read is gone with the truncate: what was marked is told now.
        st.captured = st.captured.max(st.marks.back().map_or(0, |(at, _)| *at));
        Self::apply_marks(&mut st);
        st.stream.flush();
        self.backing.set_len(size)?;
        st.data_until = 0;
        if let Some(ranges) = &mut st.written {
            // Nothing at or past the new size is written any more.
            ranges.retain(|&s, _| s < size);
            for e in ranges.values_mut() {
                *e = (*e).min(size);
            }
        }
        if size < st.captured {
            // copytruncate and O_TRUNC: what came before is complete, capture restarts.
            st.stream.end_record();
            st.captured = size;
        }
        self.keep_position(&mut st);
        st.released = st.released.min(size / PAGE * PAGE);
        self.released.store(st.released, SeqCst);
        st.copy_of = None;
        self.look(&mut st);
        Ok(())
    }

    /// Runs `f` on the stream, under the file's lock.
    pub fn with_stream<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut lock(&self.state).stream)
    }

    /// The file goes (the last reference, shutdown): everything is captured now, as the
    /// stream's policy allows, and what was written so far ends a record.
    pub fn finish(&self) -> io::Result<()> {
        let done = self.drain(Drain::All);
        self.with_stream(|s| {
            s.end_record();
            s.flush();
        });
        done.map(|_| ())
    }
}
