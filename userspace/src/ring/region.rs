//! The ring's memory: one memfd, never a disk, that another process can map.
//!
//! Layout of the memfd: one page of [`Shared`] (what a process mapping it needs to find the
//! records not yet acknowledged: the capacity, the head and tail positions, each reader's
//! next and acknowledged positions), then `capacity` bytes of records. The record area is
//! mapped twice, back to back, so that a record running past the end of the area goes on at
//! its start with no wrap in the code: every record, and every span of records, is one slice.
//!
//! A position is a byte offset that only grows; its place in the area is `pos % capacity`.
//! A record is a [`HEADER`]-byte header (length and flags, stream, the stream's sequence,
//! capture time in nanoseconds, all little-endian) and then its bytes, padded to [`ALIGN`].
//! Pages are touched only when records reach them, and given back by [`Region::release`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

pub const HEADER: usize = 24;
pub const ALIGN: usize = 4;
/// Readers whose positions the shared page has room for.
pub const MAX_READERS: usize = 16;
const PAGE: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"LOGTAPR1");
const SPLIT: u32 = 1 << 31;
const UNTERMINATED: u32 = 1 << 30;
/// The longest record: the length field's bits below the flags.
pub const MAX_LEN: usize = (UNTERMINATED - 1) as usize;

/// Space a record of `len` bytes takes.
pub fn footprint(len: usize) -> usize {
    HEADER + len.next_multiple_of(ALIGN)
}

/// A record's header, as stored before its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub split: bool,
    pub unterminated: bool,
    /// The stream's slot in the ring's stream table.
    pub stream: u32,
    pub seq: u64,
    pub at_ns: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER] {
        let mut out = [0; HEADER];
        let flags = if self.split { SPLIT } else { 0 } | if self.unterminated { UNTERMINATED } else { 0 };
        out[0..4].copy_from_slice(&(self.len | flags).to_le_bytes());
        out[4..8].copy_from_slice(&self.stream.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.at_ns.to_le_bytes());
        out
    }

    /// The header at the start of `b` (at least [`HEADER`] bytes).
    pub fn read(b: &[u8]) -> Self {
        let mut h = [0; HEADER];
        h.copy_from_slice(&b[..HEADER]);
        Self::decode(&h)
    }

    pub fn decode(b: &[u8; HEADER]) -> Self {
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0; 8];
            w[..r.len()].copy_from_slice(&b[r]);
            u64::from_le_bytes(w)
        };
        let first = word(0..4) as u32;
        Header {
            len: first & !(SPLIT | UNTERMINATED),
            split: first & SPLIT != 0,
            unterminated: first & UNTERMINATED != 0,
            stream: word(4..8) as u32,
            seq: word(8..16),
            at_ns: word(16..24),
        }
    }

    pub fn footprint(&self) -> usize {
        footprint(self.len as usize)
    }
}

/// The page before the records.
#[repr(C)]
struct Shared {
    magic: u64,
    capacity: u64,
    head: AtomicU64,
    tail: AtomicU64,
    readers: AtomicU64,
    slots: [Slot; MAX_READERS],
}

#[repr(C)]
struct Slot {
    /// The sink's name, NUL-padded.
    name: [u8; 32],
    next: AtomicU64,
    acked: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Shared>() + 16 <= PAGE);

/// Where the shared page holds the ring's generation: a number each ring gets at birth, under
/// which the worker state keeps its streams' origins (0 in a ring from before generations).
const GENERATION_AT: usize = PAGE - 8;
/// Where it holds how far into the BPF ring buffer the records pushed here reach (see
/// [`Region::set_events_mark`]).
const EVENTS_MARK_AT: usize = PAGE - 16;

pub struct Region {
    fd: OwnedFd,
    /// The shared page, then the record area twice.
    base: NonNull<u8>,
    capacity: usize,
}

// SAFETY: the mapping is plain memory; the ring decides who writes which bytes when.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

impl Region {
    /// A region for at least `capacity` bytes of records (rounded up to whole pages).
    pub fn new(capacity: usize, generation: u64) -> io::Result<Self> {
        let capacity = capacity.max(PAGE).next_multiple_of(PAGE);
        // SAFETY: a valid C string; the fd is ours from here.
        let fd = unsafe { libc::memfd_create(c"logtap-ring".as_ptr(), libc::MFD_CLOEXEC) };
        check(fd, "memfd_create for the ring")?;
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = (PAGE + capacity) as libc::off_t;
        // SAFETY: ftruncate on our fd.
        check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }, "sizing the ring's memfd")?;
        let region = Self::map(fd, capacity)?;
        // SAFETY: the page is ours and nobody else has it mapped yet.
        unsafe {
            let p = region.base.as_ptr().cast::<u64>();
            p.write(MAGIC);
            p.add(1).write(capacity as u64);
            region.base.as_ptr().add(GENERATION_AT).cast::<u64>().write(generation);
        }
        Ok(region)
    }

    pub fn generation(&self) -> u64 {
        // SAFETY: the shared page is mapped for the region's life; the word is written once.
        unsafe { self.base.as_ptr().add(GENERATION_AT).cast::<u64>().read() }
    }

    fn events_mark_word(&self) -> &AtomicU64 {
        // SAFETY: an aligned word of the shared page, mapped for the region's life.
        unsafe { &*self.base.as_ptr().add(EVENTS_MARK_AT).cast::<AtomicU64>() }
    }

    /// The BPF ring buffer's events up to `pos` are in this ring as records: a worker that
    /// takes over reads on from there, not from what was given back to the kernel before.
    pub fn set_events_mark(&self, pos: u64) {
        self.events_mark_word().store(pos, Release);
    }

    pub fn events_mark(&self) -> u64 {
        self.events_mark_word().load(Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The memfd: what another process maps to find the records.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn shared(&self) -> &Shared {
        // SAFETY: the first page is mapped for the region's life and laid out as `Shared`.
        unsafe { &*self.base.as_ptr().cast::<Shared>() }
    }

    fn at(&self, pos: u64) -> *mut u8 {
        // SAFETY: `PAGE + pos % capacity` is within the first mapping of the area.
        unsafe { self.base.as_ptr().add(PAGE + (pos % self.capacity as u64) as usize) }
    }

    /// Writes `bytes` at `pos`.
    ///
    /// # Safety
    /// `pos..pos + bytes.len()` is free: no reader is reading it, nothing else is writing it,
    /// and it is at most `capacity` long.
    pub unsafe fn write(&self, pos: u64, bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.capacity);
        // SAFETY: the double mapping makes `capacity` bytes from any place contiguous.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.at(pos), bytes.len()) }
    }

    /// The bytes at `pos..pos + len`.
    ///
    /// # Safety
    /// Nothing writes the span while the slice lives, and `len <= capacity`.
    pub unsafe fn slice(&self, pos: u64, len: usize) -> &[u8] {
        debug_assert!(len <= self.capacity);
        // SAFETY: as for `write`.
        unsafe { std::slice::from_raw_parts(self.at(pos), len) }
    }

    /// The header of the record at `pos`.
    ///
    /// # Safety
    /// A record has been written at `pos` and is not being overwritten.
    pub unsafe fn header(&self, pos: u64) -> Header {
        // SAFETY: as the caller promises.
        Header::read(unsafe { self.slice(pos, HEADER) })
    }

    /// Records where the ring starts and ends, for a process that maps the memfd.
    pub fn publish(&self, head: u64, tail: u64) {
        let s = self.shared();
        s.head.store(head, Relaxed);
        s.tail.store(tail, Relaxed);
    }

    /// Records a reader's positions in its slot (readers past [`MAX_READERS`] have none).
    pub fn publish_reader(&self, index: usize, name: &str, next: u64, acked: u64) {
        let s = self.shared();
        let Some(slot) = s.slots.get(index) else { return };
        if s.readers.load(Relaxed) <= index as u64 {
            let mut padded = [0u8; 32];
            let n = name.len().min(32);
            padded[..n].copy_from_slice(&name.as_bytes()[..n]);
            let at = std::mem::offset_of!(Shared, slots)
                + index * std::mem::size_of::<Slot>()
                + std::mem::offset_of!(Slot, name);
            // SAFETY: the name is written once, through the mapping's own pointer, before the
            // slot is counted in `readers`, by the one ring that owns the region.
            unsafe { self.base.as_ptr().add(at).cast::<[u8; 32]>().write(padded) };
            s.readers.store(index as u64 + 1, Relaxed);
        }
        slot.next.store(next, Relaxed);
        slot.acked.store(acked, Relaxed);
    }

    /// Gives the pages wholly inside `from..to` back to the system: the span holds nothing.
    pub fn release(&self, from: u64, to: u64) {
        let to = to.min(from + self.capacity as u64);
        let start = from.next_multiple_of(PAGE as u64);
        let end = to - to % PAGE as u64;
        if end <= start {
            return;
        }
        // The span may wrap: punch each piece at its place in the area.
        let mut at = start;
        while at < end {
            let place = at % self.capacity as u64;
            let len = (end - at).min(self.capacity as u64 - place);
            // SAFETY: fallocate on our fd, inside the record area.
            unsafe {
                libc::fallocate(
                    self.fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (PAGE as u64 + place) as libc::off_t,
                    len as libc::off_t,
                );
            }
            at += len;
        }
    }

    /// Memory the region holds now (pages touched and not given back), bytes.
    pub fn resident(&self) -> u64 {
        // SAFETY: fstat on our fd into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return 0;
        }
        st.st_blocks as u64 * 512
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; nothing borrows it past the region.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PAGE + 2 * self.capacity) };
    }
}

/// A view of a ring's memfd mapped by someone else (a restarted agent, a test): the
/// positions and the records still there.
pub struct View {
    region: Region,
}

/// A reader's positions as the ring last published them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderPositions {
    pub name: String,
    pub next: u64,
    pub acked: u64,
}

impl View {
    /// Maps the ring's memfd `fd` (a duplicate is kept).
    pub fn open(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let fd = fd.try_clone_to_owned()?;
        // SAFETY: reading the first page of a memfd through a fresh mapping.
        let mut head = [0u64; 2];
        let n = unsafe { libc::pread(fd.as_raw_fd(), head.as_mut_ptr().cast(), 16, 0) };
        if n != 16 || head[0] != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a logtap ring"));
        }
        let capacity = head[1] as usize;
        let region = Region::map(fd, capacity)?;
        Ok(Self { region })
    }

    pub fn head(&self) -> u64 {
        self.region.shared().head.load(Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.region.generation()
    }

    pub fn events_mark(&self) -> u64 {
        self.region.events_mark()
    }

    pub fn tail(&self) -> u64 {
        self.region.shared().tail.load(Relaxed)
    }

    pub fn readers(&self) -> Vec<ReaderPositions> {
        let s = self.region.shared();
        let n = (s.readers.load(Relaxed) as usize).min(MAX_READERS);
        s.slots[..n]
            .iter()
            .map(|slot| ReaderPositions {
                name: String::from_utf8_lossy(&slot.name).trim_end_matches('\0').to_string(),
                next: slot.next.load(Relaxed),
                acked: slot.acked.load(Relaxed),
            })
            .collect()
    }

    /// The records from `from` to the tail: position, header and bytes.
    pub fn records(&self, from: u64) -> Vec<(u64, Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = from.max(self.head());
        let tail = self.tail();
        while pos < tail {
            // SAFETY: a quiet ring (the caller's to ensure) holds records from head to tail.
            let h = unsafe { self.region.header(pos) };
            let bytes = unsafe { self.region.slice(pos + HEADER as u64, h.len as usize) }.to_vec();
            out.push((pos, h, bytes));
            pos += h.footprint() as u64;
        }
        out
    }
}

impl Region {
    /// Maps the ring memfd `fd` with `capacity` bytes of records: the page and the area, then
    /// the area again right after it.
    fn map(fd: OwnedFd, capacity: usize) -> io::Result<Self> {
        if capacity == 0 || capacity % PAGE != 0 {
            let message = format!("ring capacity {capacity} is not whole pages");
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        // SAFETY: reserving address space only; the shared mappings replace it below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE + 2 * capacity,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::other(format!("reserving the ring's address space: {e}")));
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        // From here Drop unmaps the reservation, whatever is mapped in it.
        let region = Self { fd, base, capacity };
        region.map_at(0, PAGE + capacity, 0)?;
        region.map_at(PAGE + capacity, capacity, PAGE)?;
        Ok(region)
    }

    fn map_at(&self, at: usize, len: usize, offset: usize) -> io::Result<()> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: `at..at + len` lies in the region's reservation; MAP_FIXED replaces it.
        let p = unsafe {
            libc::mmap(
                self.base.as_ptr().add(at).cast(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::other(format!("mapping the ring's memfd: {e}")));
        }
        Ok(())
    }
}
