//! State that outlives the process that made it: an append-only journal in a memfd.
//!
//! The agent's keeper holds the memfd; a worker appends an entry for every change before it
//! answers the request that made it, and the next worker replays the entries to take over. No
//! disk: the memfd is memory, and it lives as long as some process holds it.
//!
//! Layout: an 8-byte magic and the offset where the current image starts, then entries, each a
//! little-endian `u32` length and that many bytes. A rewrite (compaction) puts a fresh image
//! after the end, switches the offset in one 8-byte write and gives the old entries' memory
//! back: a worker killed at any point leaves either the old image or the new one.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::sync::lock;

const MAGIC: u64 = 0x6c6f_6774_6170_6a31; // "logtapj1"
/// Magic and image offset.
const TOP: u64 = 16;
/// Punched ranges are whole pages.
const PAGE: u64 = 4096;

pub struct Journal {
    file: File,
    at: Mutex<Ends>,
}

#[derive(Clone, Copy)]
struct Ends {
    /// Where the current image starts.
    base: u64,
    /// Where the next entry goes.
    end: u64,
}

impl Journal {
    /// An empty journal in a fresh memfd named `name`.
    pub fn new(name: &std::ffi::CStr) -> io::Result<Self> {
        // SAFETY: a valid C string; known flags.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.write_all_at(&MAGIC.to_le_bytes(), 0)?;
        file.write_all_at(&TOP.to_le_bytes(), 8)?;
        Ok(Self { file, at: Mutex::new(Ends { base: TOP, end: TOP }) })
    }

    /// A journal kept by an earlier process; its entries are read with [`Journal::entries`].
    pub fn open(file: File) -> io::Result<Self> {
        let mut top = [0u8; TOP as usize];
        file.read_exact_at(&mut top, 0)?;
        let (magic, base) = (word(&top[..8]), word(&top[8..]));
        if magic != MAGIC || base < TOP {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a logtap journal"));
        }
        let journal = Self { file, at: Mutex::new(Ends { base, end: base }) };
        let end = journal.scan(|_| {})?;
        lock(&journal.at).end = end;
        Ok(journal)
    }

    /// Calls `f` with every entry of the current image, in order; returns where they end.
    fn scan(&self, mut f: impl FnMut(Vec<u8>)) -> io::Result<u64> {
        let size = self.file.metadata()?.len();
        let mut at = lock(&self.at).base;
        let mut len = [0u8; 4];
        while at + 4 <= size {
            self.file.read_exact_at(&mut len, at)?;
            let n = u32::from_le_bytes(len) as u64;
            if n == 0 || at + 4 + n > size {
                break;
            }
            let mut entry = vec![0; n as usize];
            self.file.read_exact_at(&mut entry, at + 4)?;
            f(entry);
            at += 4 + n;
        }
        Ok(at)
    }

    pub fn entries(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        self.scan(|e| out.push(e))?;
        Ok(out)
    }

    /// Appends one entry: once this returns, a process that takes over sees it.
    pub fn append(&self, entry: &[u8]) -> io::Result<()> {
        let mut at = lock(&self.at);
        at.end = self.put(at.end, entry)?;
        Ok(())
    }

    fn put(&self, at: u64, entry: &[u8]) -> io::Result<u64> {
        let n = u32::try_from(entry.len()).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut buf = Vec::with_capacity(4 + entry.len());
        buf.extend_from_slice(&n.to_le_bytes());
        buf.extend_from_slice(entry);
        // One write per entry: a process killed between two leaves whole entries only.
        self.file.write_all_at(&buf, at)?;
        Ok(at + buf.len() as u64)
    }

    /// Bytes of entries since the current image began.
    pub fn len(&self) -> u64 {
        let at = lock(&self.at);
        at.end - at.base
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces everything with `image`: the entries that say the same as all before.
    pub fn rewrite(&self, image: &[Vec<u8>]) -> io::Result<()> {
        let mut at = lock(&self.at);
        let start = at.end.next_multiple_of(PAGE);
        let mut end = start;
        for entry in image {
            end = self.put(end, entry)?;
        }
        // The end of the new image must read as no entry, whatever was there before.
        self.file.write_all_at(&[0; 4], end)?;
        self.file.write_all_at(&start.to_le_bytes(), 8)?;
        let (from, to) = (at.base.next_multiple_of(PAGE), start);
        if to > from {
            // SAFETY: fallocate on an fd we own.
            unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    from as i64,
                    (to - from) as i64,
                )
            };
        }
        *at = Ends { base: start, end };
        Ok(())
    }

    /// Memory the journal holds.
    pub fn held(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }
}

fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap_or_default())
}

impl AsFd for Journal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn reopen(j: &Journal) -> Journal {
        // SAFETY: dup of an fd we hold.
        let fd = unsafe { libc::dup(j.file.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd.
        Journal::open(unsafe { File::from_raw_fd(fd) }).unwrap()
    }

    #[test]
    fn entries_survive_a_reopen_and_a_rewrite_keeps_only_the_image() {
        let j = Journal::new(c"test").unwrap();
        for i in 0..1000u32 {
            j.append(format!("entry {i}").as_bytes()).unwrap();
        }
        let again = reopen(&j);
        assert_eq!(again.entries().unwrap().len(), 1000);
        assert_eq!(again.entries().unwrap()[999], b"entry 999");
        again.append(b"after").unwrap();
        assert_eq!(reopen(&again).entries().unwrap().last().unwrap(), b"after");

        j.rewrite(&[b"image".to_vec()]).unwrap();
        let after = reopen(&j);
        assert_eq!(after.entries().unwrap(), vec![b"image".to_vec()]);
        after.append(b"next").unwrap();
        assert_eq!(reopen(&after).entries().unwrap(), vec![b"image".to_vec(), b"next".to_vec()]);
        assert!(after.held() < 3 * PAGE, "the old entries' memory was given back: {}", after.held());
    }

    #[test]
    fn a_file_that_is_no_journal_is_refused() {
        // SAFETY: a valid C string.
        let fd = unsafe { libc::memfd_create(c"x".as_ptr(), 0) };
        // SAFETY: fresh fd.
        let f = unsafe { File::from_raw_fd(fd) };
        f.write_all_at(&[7; 64], 0).unwrap();
        assert!(Journal::open(f).is_err());
    }
}
