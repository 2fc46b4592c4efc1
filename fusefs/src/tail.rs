//! The bounded recent tail of a file, kept so that `tail`, `cat` and the kernel's page cache
//! (which reads a partly written page back before writing it) see the latest bytes.
//! Older content is gone: it reads as zeros, like a hole.

/// Bytes `[start, start + buf.len())` of the file.
#[derive(Debug, Default)]
pub struct Tail {
    start: u64,
    buf: Vec<u8>,
}

impl Tail {
    pub fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Stores `data` at `offset`. `limit` bounds what is kept; compaction is amortised by
    /// letting the buffer grow a quarter past the limit before the front is dropped.
    pub fn write(&mut self, offset: u64, data: &[u8], limit: usize) {
        if limit == 0 || data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        if offset > self.end() {
            // A hole: zeros up to `offset`, of which at most `limit` are worth keeping.
            self.rebase(self.end().max(offset.saturating_sub(limit as u64)));
            self.buf.resize((offset - self.start) as usize, 0);
        }
        // Part below the window start is older than what we keep.
        let (offset, data) = if offset < self.start {
            if end <= self.start {
                return;
            }
            let skip = (self.start - offset) as usize;
            (self.start, &data[skip..])
        } else {
            (offset, data)
        };
        let at = (offset - self.start) as usize;
        let overlap = (self.buf.len() - at).min(data.len());
        self.buf[at..at + overlap].copy_from_slice(&data[..overlap]);
        self.buf.extend_from_slice(&data[overlap..]);
        if self.buf.len() > limit + limit / 4 {
            let drop = self.buf.len() - limit;
            self.buf.drain(..drop);
            self.start += drop as u64;
        }
    }

    /// Moves the window to start at `start` >= `end()`: what lies between is zeros.
    fn rebase(&mut self, start: u64) {
        let zeros = (start - self.end()) as usize;
        if zeros >= self.buf.len() {
            self.buf.clear();
            self.start = start;
        } else {
            self.buf.resize(self.buf.len() + zeros, 0);
        }
    }

    /// Cuts the tail at `size` (truncate). Below a window that starts past `size`, the old
    /// content is unknown and reads as zeros; later writes there are kept again.
    pub fn truncate(&mut self, size: u64, limit: usize) {
        if size <= self.start {
            self.buf.clear();
            self.start = size.saturating_sub(limit as u64);
            self.buf.resize((size - self.start) as usize, 0);
        } else if size < self.end() {
            self.buf.truncate((size - self.start) as usize);
        }
    }

    /// Fills `out` with bytes `[offset, offset + out.len())`; what is not kept reads as zeros.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        out.fill(0);
        let end = offset + out.len() as u64;
        let from = offset.max(self.start);
        let to = end.min(self.end());
        if from < to {
            let src = &self.buf[(from - self.start) as usize..(to - self.start) as usize];
            let dst = (from - offset) as usize;
            out[dst..dst + src.len()].copy_from_slice(src);
        }
    }

    /// How many bytes are held.
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(t: &Tail, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0xAA; len];
        t.read(offset, &mut out);
        out
    }

    #[test]
    fn keeps_recent_bytes_and_zeroes_old_ones() {
        let mut t = Tail::default();
        t.write(0, b"hello ", 8);
        t.write(6, b"world!", 8);
        assert_eq!(read(&t, 4, 8), b"o world!");
        assert!(t.held() <= 10);
        assert_eq!(read(&t, 0, 2), vec![0, 0]);
    }

    proptest! {
        /// Whatever the write pattern, the last `limit` bytes read back as a plain file would.
        #[test]
        fn matches_a_plain_file_within_the_window(
            writes in proptest::collection::vec((0u64..300, proptest::collection::vec(any::<u8>(), 0..80)), 1..40),
            limit in 8usize..128,
        ) {
            let mut t = Tail::default();
            let mut file: Vec<u8> = Vec::new();
            for (offset, data) in &writes {
                let end = *offset as usize + data.len();
                if file.len() < end { file.resize(end, 0); }
                file[*offset as usize..end].copy_from_slice(data);
                t.write(*offset, data, limit);
            }
            let len = file.len() as u64;
            let from = len.saturating_sub(limit as u64);
            prop_assert_eq!(read(&t, from, (len - from) as usize), file[from as usize..].to_vec());
            prop_assert!(t.held() <= limit + limit / 4 + 80 + 300);
        }
    }
}
