//! A volume file's content in memory: a memfd, never a disk.
//!
//! With FUSE passthrough the kernel reads and writes it directly for the app; without, the
//! request loop writes it. Either way capture reads it by offset, so it is the one truth about
//! what was written. A memfd rather than a file on a tmpfs mount: only memfds take seals, and
//! `F_SEAL_FUTURE_WRITE` is how shutdown makes later writes fail (`EPERM`) instead of landing
//! where nobody reads them any more.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};

/// Page size of the memory behind a memfd: holes are punched in whole pages.
pub const PAGE: u64 = 4096;

#[derive(Debug)]
pub struct Backing {
    file: File,
}

pub(crate) fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Where data starts at or after `offset`, and where it ends (the next hole or the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub end: u64,
}

impl Backing {
    pub fn new() -> io::Result<Self> {
        // SAFETY: a valid C string; the flags are known.
        let fd = check(unsafe {
            libc::memfd_create(c"logtap-volume-file".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        // SAFETY: fd was just made and is owned by nobody else.
        Ok(Self { file: unsafe { File::from_raw_fd(fd) } })
    }

    /// Content an earlier worker wrote (its memfd was kept).
    pub fn adopt(file: File) -> Self {
        Self { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The size, and the bytes of memory the content holds (holes and released pages hold none).
    pub fn usage(&self) -> io::Result<(u64, u64)> {
        let m = self.file.metadata()?;
        Ok((m.len(), m.blocks() * 512))
    }

    /// Whether every page from `from` to the end holds memory: then there is no hole there,
    /// known without seeking, which takes the file's lock and so holds up its writers.
    pub fn whole_from(&self, from: u64) -> io::Result<(bool, u64)> {
        let m = self.file.metadata()?;
        let pages = m.len().div_ceil(PAGE).saturating_sub(from / PAGE);
        Ok((m.blocks() * 512 >= pages * PAGE, m.len()))
    }

    pub fn read_at(&self, out: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(out, offset)
    }

    /// Reads exactly `out.len()` bytes, or fewer only at the end of the file.
    pub fn read_full(&self, out: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < out.len() {
            match self.file.read_at(&mut out[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    pub fn set_len(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }

    /// The first data at or after `offset`, `None` if only holes follow (or it is the end).
    pub fn data_from(&self, offset: u64) -> io::Result<Option<Extent>> {
        let fd = self.file.as_raw_fd();
        let at = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: lseek on an fd we own.
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
        }
        // SAFETY: as above; a data offset always has a hole (or the end) after it.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Extent { start: start as u64, end: end as u64 }))
    }

    /// Gives the memory of `[from, to)` back; the range then reads as zeros. Whole pages only:
    /// the range is shrunk to page bounds.
    pub fn release(&self, from: u64, to: u64) -> io::Result<()> {
        let from = from.next_multiple_of(PAGE);
        let to = to / PAGE * PAGE;
        if to <= from {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: fallocate on an fd we own.
        check(unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
        })?;
        Ok(())
    }

    /// From now on every write fails with `EPERM`, through any open file, passthrough included.
    /// A write that returned before this is in the content.
    pub fn seal(&self) -> io::Result<()> {
        // SAFETY: fcntl on an fd we own.
        check(unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) })?;
        Ok(())
    }
}

impl AsFd for Backing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_released_pages_read_as_zeros_and_a_seal_stops_writes() {
        let b = Backing::new().unwrap();
        b.write_at(b"head\n", 0).unwrap();
        b.write_at(b"after a hole\n", 3 * PAGE).unwrap();
        assert_eq!(b.data_from(0).unwrap(), Some(Extent { start: 0, end: PAGE }));
        assert_eq!(b.data_from(10).unwrap(), Some(Extent { start: 10, end: PAGE }));
        assert_eq!(b.data_from(PAGE).unwrap().unwrap().start, 3 * PAGE);
        assert_eq!(b.data_from(b.size().unwrap()).unwrap(), None);

        let big = vec![b'x'; 4 * PAGE as usize];
        b.write_at(&big, 0).unwrap();
        b.release(100, 3 * PAGE + 5).unwrap();
        let mut out = vec![1u8; 4 * PAGE as usize];
        assert_eq!(b.read_full(&mut out, 0).unwrap(), out.len());
        assert!(out[..PAGE as usize].iter().all(|&c| c == b'x'), "a partial page is kept");
        assert!(out[PAGE as usize..3 * PAGE as usize].iter().all(|&c| c == 0));
        assert!(b.usage().unwrap().1 <= 2 * PAGE + PAGE);

        b.seal().unwrap();
        assert_eq!(b.write_at(b"late", 0).unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
}
