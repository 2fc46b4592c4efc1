//! The BPF ring buffer, read from its mapping. Unlike aya's `RingBuf`, reading an event does not
//! give its space back to the kernel: [`Events::commit`] does, once what was read is in the
//! shared ring. The consumer position lives in the map, which the keeper holds: a worker
//! killed between reading events and pushing their records leaves them for the next one to read
//! again, instead of losing them.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyhow::{bail, Context};
use aya::maps::MapData;

/// The kernel's record header (`struct bpf_ringbuf_hdr`): a length word with two flag bits,
/// then the page offset of the header (the kernel's, not ours).
const HEADER: usize = 8;
const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: i32, offset: usize) -> anyhow::Result<Self> {
        // SAFETY: a new shared mapping of the map's fd; the kernel checks length and offset.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset as libc::off_t) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the BPF ring buffer");
        }
        let ptr = NonNull::new(p.cast::<u8>()).context("mmap returned null")?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub struct Events {
    map: MapData,
    /// The consumer page: the position up to which the kernel may reuse space.
    consumer: Mapping,
    /// The producer page, then the data pages twice (a record that wraps reads straight on).
    producer: Mapping,
    page: usize,
    mask: usize,
    /// Read up to here; committed up to the consumer position.
    read: usize,
    /// Events from here on are not read (another reader has them).
    stop: Option<usize>,
    /// While programs of two workers were attached at once, both captured the same writes:
    /// the old buffer keeps copies of what it read from `.0` on; the new one drops events before
    /// `.0` that match a copy, once per copy.
    copies: Option<(usize, Copies)>,
}

/// Events as bytes, with how many times each was seen.
pub type Copies = std::collections::HashMap<Vec<u8>, u32>;

// SAFETY: the mappings are owned by this reader and used through `&mut self` only.
unsafe impl Send for Events {}

impl Events {
    pub fn new(map: MapData) -> anyhow::Result<Self> {
        let size = map.info().context("the BPF ring buffer's size")?.max_entries() as usize;
        // SAFETY: sysconf cannot fail for the page size.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if !size.is_power_of_two() || size < page {
            bail!("the BPF ring buffer's size {size} is not a power-of-two number of pages");
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let mut events = Self { map, consumer, producer, page, mask: size - 1, read: 0, stop: None, copies: None };
        events.read = events.consumer_pos().load(Ordering::Acquire);
        Ok(events)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the position, a word the kernel reads atomically.
        unsafe { &*self.consumer.ptr.as_ptr().cast::<AtomicUsize>() }
    }

    fn producer_pos(&self) -> usize {
        // SAFETY: the producer page starts with the position the kernel publishes.
        unsafe { &*self.producer.ptr.as_ptr().cast::<AtomicUsize>() }.load(Ordering::Acquire)
    }

    /// The next event after those read, if one is whole; its space stays the kernel's to keep
    /// until [`commit`](Self::commit).
    pub fn next(&mut self) -> Option<&[u8]> {
        loop {
            if self.read == self.producer_pos() || self.stop.is_some_and(|stop| self.read >= stop) {
                return None;
            }
            let at = self.page + (self.read & self.mask);
            // SAFETY: `at` lies in the first copy of the data pages; the header is 8-aligned.
            let word = unsafe { &*self.producer.ptr.as_ptr().add(at).cast::<AtomicU32>() };
            let len = word.load(Ordering::Acquire);
            if len & BUSY != 0 {
                // Still being written: later events wait behind it, in order.
                return None;
            }
            let data = (len & !(BUSY | DISCARD)) as usize;
            let pos = self.read;
            self.read += (HEADER + data).next_multiple_of(8);
            if len & DISCARD != 0 {
                continue;
            }
            // SAFETY: the data follows its header; the second copy of the data pages holds
            // whatever runs past the end of the first (no event is larger than the buffer).
            let event = unsafe { std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(at + HEADER), data) };
            match (&mut self.copies, self.stop) {
                // The old buffer: keep a copy of what both captured.
                (Some((from, copies)), Some(_)) if pos >= *from => *copies.entry(event.to_vec()).or_default() += 1,
                // The new one: what the old buffer delivered already is dropped.
                (Some((until, copies)), None) if pos < *until => {
                    if let Some(n) = copies.get_mut(event).filter(|n| **n > 0) {
                        *n -= 1;
                        continue;
                    }
                }
                _ => {}
            }
            return Some(event);
        }
    }

    /// Where the kernel has written up to.
    pub fn head(&self) -> usize {
        self.producer_pos()
    }

    /// The events up to `stop` only (what comes later is the programs' that replaced these),
    /// keeping copies of those from `from` on (both captured them).
    pub fn replaced(mut self, from: usize, stop: usize) -> Self {
        self.stop = Some(stop);
        self.copies = Some((from, Copies::new()));
        self
    }

    /// The copies a replaced buffer kept.
    pub fn take_copies(&mut self) -> Copies {
        self.copies.take().map(|(_, c)| c).unwrap_or_default()
    }

    /// Events before `until` that match a copy [`add_copies`](Self::add_copies) gives were
    /// delivered from the replaced programs' buffer: they are dropped, once per copy.
    pub fn drop_copies_before(&mut self, until: usize) {
        self.copies = Some((until, Copies::new()));
    }

    pub fn add_copies(&mut self, copies: Copies) {
        if let Some((_, mine)) = self.copies.as_mut() {
            for (event, n) in copies {
                *mine.entry(event).or_default() += n;
            }
        }
    }

    /// Where reading is, as the ring marks it: `None` for a reader that stops early (an
    /// earlier worker's buffer, not the one the ring's mark is of).
    pub fn mark(&self) -> Option<u64> {
        self.stop.is_none().then_some(self.read as u64)
    }

    /// Reads on from `pos`: what lies before it is pushed already (a worker died before it gave
    /// it back). Ignored unless it lies between what is read and what the kernel wrote.
    pub fn skip_to(&mut self, pos: u64) {
        let pos = pos as usize;
        let ahead = pos.wrapping_sub(self.read);
        if ahead > 0 && ahead <= self.producer_pos().wrapping_sub(self.read) {
            tracing::info!(bytes = ahead, "BPF ring buffer events already pushed by the last worker are skipped");
            self.read = pos;
        }
    }

    /// Bytes the kernel holds that were not read.
    pub fn unread(&self) -> usize {
        self.producer_pos().wrapping_sub(self.read)
    }

    /// Gives the kernel back the space of every event read.
    pub fn commit(&mut self) {
        self.consumer_pos().store(self.read, Ordering::Release);
    }
}

impl Events {
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for Events {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
