//! The one line framer that every source uses: bytes in, lines out.
//!
//! A line ends at `\n` (which is not kept). A partial line waits for its end, for
//! [`Framer::flush`] (close, fsync, truncate, unlink, exit) or for its age to pass
//! `partial_flush`. Lines longer than `max` are cut into pieces of `max` bytes.
//! Each input byte is copied once: complete lines are slices of one copy of the input, and a
//! partial line is copied once into the pending buffer.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Bytes,
    pub split: bool,
    pub unterminated: bool,
}

#[derive(Debug)]
pub struct Framer {
    max: usize,
    pending: BytesMut,
    /// When the pending partial line started.
    since: Option<Instant>,
    /// The pending line already had pieces cut off it.
    pending_split: bool,
}

impl Framer {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), pending: BytesMut::new(), since: None, pending_split: false }
    }

    /// Bytes of the partial line held.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn push(&mut self, data: &[u8], now: Instant, out: &mut Vec<Frame>) {
        let mut rest = data;
        if !self.pending.is_empty() || self.pending_split {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.extend_pending(&rest[..i], out);
                    self.emit_pending(false, out);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.extend_pending(rest, out);
                    return;
                }
            }
        }
        if let Some(last) = memchr::memrchr(b'\n', rest) {
            let block = Bytes::copy_from_slice(&rest[..last]);
            if memchr::memchr(b'\n', &block).is_none() {
                // One line: the buffer itself, no shared slices to set up.
                self.emit_line(block, out);
            } else {
                let mut start = 0;
                for nl in memchr::memchr_iter(b'\n', &block) {
                    self.emit_line(block.slice(start..nl), out);
                    start = nl + 1;
                }
                self.emit_line(block.slice(start..), out);
            }
            rest = &rest[last + 1..];
        }
        if !rest.is_empty() {
            self.since = Some(now);
            self.extend_pending(rest, out);
        }
    }

    /// Ends the partial line, if any, as a record.
    pub fn flush(&mut self, out: &mut Vec<Frame>) {
        if !self.pending.is_empty() {
            self.emit_pending(true, out);
        }
        self.pending_split = false;
        self.since = None;
    }

    /// Ends the partial line if it has waited `age` or longer.
    pub fn flush_older_than(&mut self, now: Instant, age: Duration, out: &mut Vec<Frame>) {
        if matches!(self.since, Some(t) if now.duration_since(t) >= age) {
            self.flush(out);
        }
    }

    fn emit_line(&self, line: Bytes, out: &mut Vec<Frame>) {
        if line.len() <= self.max {
            out.push(Frame { bytes: line, split: false, unterminated: false });
            return;
        }
        let mut at = 0;
        while at < line.len() {
            let end = (at + self.max).min(line.len());
            out.push(Frame { bytes: line.slice(at..end), split: true, unterminated: false });
            at = end;
        }
    }

    fn extend_pending(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while self.pending.len() + data.len() > self.max {
            let take = self.max - self.pending.len();
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            out.push(Frame { bytes: self.pending.split().freeze(), split: true, unterminated: false });
            self.pending_split = true;
        }
        self.pending.extend_from_slice(data);
    }

    fn emit_pending(&mut self, unterminated: bool, out: &mut Vec<Frame>) {
        // After a cut, an empty remainder means the line ended exactly at a piece boundary.
        if !self.pending.is_empty() || !self.pending_split {
            out.push(Frame { bytes: self.pending.split().freeze(), split: self.pending_split, unterminated });
        }
        self.pending_split = false;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, Instant::now(), &mut out);
        }
        f.flush(&mut out);
        out
    }

    fn texts(frames: &[Frame]) -> Vec<&[u8]> {
        frames.iter().map(|f| &f.bytes[..]).collect()
    }

    #[test]
    fn lines_across_chunks() {
        let out = frames(100, &[b"ab", b"c\nde\n\nf", b"g\n"]);
        assert_eq!(texts(&out), vec![&b"abc"[..], b"de", b"", b"fg"]);
        assert!(out.iter().all(|f| !f.split && !f.unterminated));
    }

    #[test]
    fn partial_line_ends_on_flush_and_timeout() {
        let out = frames(100, &[b"no newline"]);
        assert_eq!(out, vec![Frame { bytes: Bytes::from_static(b"no newline"), split: false, unterminated: true }]);

        let mut f = Framer::new(100);
        let mut out = Vec::new();
        let t0 = Instant::now();
        f.push(b"waiting", t0, &mut out);
        f.flush_older_than(t0 + Duration::from_millis(500), Duration::from_secs(1), &mut out);
        assert!(out.is_empty());
        f.flush_older_than(t0 + Duration::from_secs(1), Duration::from_secs(1), &mut out);
        assert_eq!(texts(&out), vec![&b"waiting"[..]]);
    }

    #[test]
    fn long_lines_are_split_and_marked() {
        let out = frames(4, &[b"0123456789\nab", b"cdefgh\n"]);
        assert_eq!(texts(&out), vec![&b"0123"[..], b"4567", b"89", b"abcd", b"efgh"]);
        assert!(out.iter().all(|f| f.split));
        let out = frames(4, &[b"abcd\n"]);
        assert_eq!(out, vec![Frame { bytes: Bytes::from_static(b"abcd"), split: false, unterminated: false }]);
    }

    #[test]
    fn binary_bytes_pass_unchanged() {
        let out = frames(100, &[&[0, 0xff, 0xfe, b'\r', b'\n']]);
        assert_eq!(texts(&out), vec![&[0u8, 0xff, 0xfe, b'\r'][..]]);
    }

    proptest! {
        /// However the input is chunked, the frames put back together with newlines are the
        /// input, no frame exceeds max, and every line not longer than max is one frame.
        #[test]
        fn framing_is_lossless(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'x'), any::<u8>()], 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..10),
            max in 1usize..40,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= data.len()).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                chunks.push(&data[at..c]);
                at = c;
            }
            let out = frames(max, &chunks);
            prop_assert!(out.iter().all(|f| f.bytes.len() <= max));
            let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
            if data.is_empty() || data.last() == Some(&b'\n') {
                lines.pop();
            }
            // Every byte but the newlines comes out, once, in order.
            let joined: Vec<u8> = out.iter().flat_map(|f| f.bytes.iter().copied()).collect();
            let expected: Vec<u8> = data.iter().copied().filter(|&b| b != b'\n').collect();
            prop_assert_eq!(joined, expected);
            // A line that fits is one whole frame; only longer lines are split.
            let short_lines = lines.iter().filter(|l| l.len() <= max).count();
            prop_assert!(out.iter().filter(|f| !f.split).count() == short_lines);
        }
    }
}
