//! The filesystem as a pure model: inodes, names, offsets and captured high-water marks.
//!
//! No FUSE here: the adapter in `fuse.rs` turns kernel requests into these calls, and unit and
//! property tests drive them directly. Errors are plain errno values.
//!
//! Layout: the root holds only directories, the volumes. Inside a volume, files and nested
//! directories behave like a log directory on any filesystem, except that file contents are
//! handed to the file's [`Stream`] and only a bounded tail is kept.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant, SystemTime};

use crate::capture::{Capture, Stream};
use crate::name::Name;
use crate::tail::Tail;

pub const ROOT: u64 = 1;
/// How long data beyond a gap waits for the gap to fill before the gap counts as a hole.
/// The kernel's writeback sends pages out of order at times; the flusher's syncfs (every
/// flush_interval) sends the missing ones well within this.
pub const GAP_HOLD: Duration = Duration::from_secs(1);
/// Most bytes held beyond gaps per file; past it, the gaps count as holes.
const GAP_HOLD_BYTES: usize = 16 << 20;
/// Longest name of a file or directory, as on most Linux filesystems.
pub const NAME_MAX: usize = 255;

/// An errno value.
pub type Errno = i32;
pub type FsResult<T> = Result<T, Errno>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Changes asked by `setattr` (chmod, chown, truncate, utimes).
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// Who makes a new inode.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug)]
pub struct Options {
    /// Bytes of recent content kept per file for reads.
    pub tail_bytes: usize,
}

struct Node<S> {
    parent: u64,
    name: OsString,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Kernel references (lookups not yet forgotten).
    lookups: u64,
    /// Open file handles, and those of them that may write.
    opens: u32,
    writers: u32,
    /// Still has a name (false after unlink/rmdir or being replaced by rename).
    linked: bool,
    body: Body<S>,
}

impl<S> Node<S> {
    /// A new inode with one kernel reference (the entry reply that announces it).
    fn new(parent: u64, name: &OsStr, perm: u32, owner: Owner, body: Body<S>) -> Self {
        let now = SystemTime::now();
        Node {
            parent,
            name: name.to_owned(),
            perm: (perm & 0o7777) as u16,
            uid: owner.uid,
            gid: owner.gid,
            atime: now,
            mtime: now,
            ctime: now,
            lookups: 1,
            opens: 0,
            writers: 0,
            linked: true,
            body,
        }
    }
}

enum Body<S> {
    Dir(BTreeMap<OsString, u64>),
    File(File<S>),
}

struct File<S> {
    /// Logical size, as `stat` shows it.
    size: u64,
    /// Every byte below this offset has been handed to the stream once.
    captured: u64,
    /// Writes that start beyond `captured`, by offset: held until the gap fills, or until the
    /// gap proves to be a hole (fsync, close, truncate, shutdown, or GAP_HOLD passing).
    ahead: BTreeMap<u64, Vec<u8>>,
    ahead_since: Option<Instant>,
    tail: Tail,
    stream: S,
}

impl<S: Stream> File<S> {
    fn ahead_bytes(&self) -> usize {
        self.ahead.values().map(Vec::len).sum()
    }

    /// Hands over what lies at `offset`: the part beyond `captured` is new, the rest was seen.
    fn take(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        let fresh_from = offset.max(self.captured).min(end);
        if fresh_from > offset {
            self.stream.overwritten(fresh_from - offset);
        }
        if end > fresh_from {
            self.stream.append(&data[(fresh_from - offset) as usize..]);
            self.captured = end;
        }
    }

    /// Takes the held writes that now touch `captured`. With `holes`, the gaps before them are
    /// holes (nothing was written there) and everything held is taken.
    fn take_ahead(&mut self, holes: bool) {
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() > self.captured && !holes {
                break;
            }
            let (offset, data) = entry.remove_entry();
            // A hole is not emitted: nothing was written there.
            self.captured = self.captured.max(offset);
            self.take(offset, &data);
        }
        if self.ahead.is_empty() {
            self.ahead_since = None;
        }
    }
}

/// One open of a file (the kernel's file handle): which inode, and whether it may write.
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    write: bool,
}

pub struct Model<C: Capture> {
    capture: C,
    nodes: HashMap<u64, Node<C::Stream>>,
    next_ino: u64,
    /// Open handles by id; a reader's close must not end a writer's line.
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    options: Options,
    closing: bool,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

fn check_name(name: &OsStr) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

impl<C: Capture> Model<C> {
    pub fn new(capture: C, options: Options, root_owner: Owner) -> Self {
        let root = Node::new(ROOT, OsStr::new(""), 0o755, root_owner, Body::Dir(BTreeMap::new()));
        Self {
            capture,
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_handle: 1,
            options,
            closing: false,
        }
    }

    pub fn capture(&self) -> &C {
        &self.capture
    }

    fn node(&self, ino: u64) -> FsResult<&Node<C::Stream>> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> FsResult<&mut Node<C::Stream>> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: u64) -> FsResult<&BTreeMap<OsString, u64>> {
        match &self.node(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> FsResult<&mut BTreeMap<OsString, u64>> {
        match &mut self.node_mut(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> FsResult<u64> {
        self.entries(parent)?.get(name).copied().ok_or(libc::ENOENT)
    }

    fn attr_of(&self, ino: u64, node: &Node<C::Stream>) -> Attr {
        let (kind, size, nlink) = match &node.body {
            Body::Dir(entries) => {
                let subdirs = entries
                    .values()
                    .filter(|c| matches!(self.nodes.get(c).map(|n| &n.body), Some(Body::Dir(_))))
                    .count();
                (Kind::Dir, 4096, 2 + subdirs as u32)
            }
            Body::File(f) => (Kind::File, f.size, u32::from(node.linked)),
        };
        Attr {
            ino,
            kind,
            size,
            perm: node.perm,
            uid: node.uid,
            gid: node.gid,
            nlink,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(self.attr_of(ino, self.node(ino)?))
    }

    /// The volume (top-level directory name) and the path inside it of `ino`.
    fn location(&self, ino: u64) -> FsResult<(String, String)> {
        let mut parts: Vec<&OsStr> = Vec::new();
        let mut at = ino;
        loop {
            let node = self.node(at)?;
            if at == ROOT {
                return Err(libc::EINVAL);
            }
            if node.parent == ROOT {
                let volume = node.name.to_string_lossy().into_owned();
                let path = parts.iter().rev().map(|p| p.to_string_lossy()).collect::<Vec<_>>().join("/");
                return Ok((volume, path));
            }
            parts.push(&node.name);
            at = node.parent;
        }
    }

    /// The top-level directory that holds `ino` (ROOT for the root itself).
    fn volume_of(&self, ino: u64) -> FsResult<u64> {
        let mut at = ino;
        while at != ROOT {
            let parent = self.node(at)?.parent;
            if parent == ROOT {
                return Ok(at);
            }
            at = parent;
        }
        Ok(ROOT)
    }

    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let ino = self.child(parent, name)?;
        let node = self.node_mut(ino)?;
        node.lookups += 1;
        self.getattr(ino)
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.reap(ino);
    }

    /// Drops an inode that has no name, no kernel reference and no open handle.
    fn reap(&mut self, ino: u64) {
        let gone = matches!(self.nodes.get(&ino), Some(n) if !n.linked && n.lookups == 0 && n.opens == 0);
        if gone && ino != ROOT {
            self.nodes.remove(&ino);
        }
    }

    fn insert(&mut self, parent: u64, name: &OsStr, perm: u32, owner: Owner, body: Body<C::Stream>) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.nodes.insert(ino, Node::new(parent, name, perm, owner, body));
        if let Ok(entries) = self.entries_mut(parent) {
            entries.insert(name.to_owned(), ino);
        }
        if let Ok(p) = self.node_mut(parent) {
            p.mtime = now;
            p.ctime = now;
        }
        ino
    }

    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32, owner: Owner) -> FsResult<Attr> {
        check_name(name)?;
        if self.closing {
            return Err(libc::ESHUTDOWN);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        if parent == ROOT {
            let volume = name.to_str().ok_or(libc::EINVAL)?;
            Name::parse(volume).map_err(|_| libc::EINVAL)?;
        }
        let ino = self.insert(parent, name, mode, owner, Body::Dir(BTreeMap::new()));
        if parent == ROOT {
            self.capture.volume_created(&name.to_string_lossy());
        }
        self.getattr(ino)
    }

    /// Makes a regular file (`create` and `mknod` with S_IFREG; `create` then opens it).
    /// `creator` is the pid of the process that asked (0 when unknown).
    pub fn create(&mut self, parent: u64, name: &OsStr, mode: u32, owner: Owner, creator: u32) -> FsResult<Attr> {
        check_name(name)?;
        if self.closing {
            return Err(libc::ESHUTDOWN);
        }
        if parent == ROOT {
            // The root holds volumes only.
            return Err(libc::EPERM);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        let (volume, dir_path) = self.location(parent)?;
        let name_str = name.to_string_lossy();
        let path = if dir_path.is_empty() { name_str.into_owned() } else { format!("{dir_path}/{name_str}") };
        let stream = self.capture.stream(&volume, &path, creator);
        let body = Body::File(File {
            size: 0,
            captured: 0,
            ahead: BTreeMap::new(),
            ahead_since: None,
            tail: Tail::default(),
            stream,
        });
        let made = self.insert(parent, name, mode, owner, body);
        debug_assert_eq!(made, ino);
        self.getattr(ino)
    }

    /// Opens a file; the handle id goes to the kernel and comes back with `release`.
    pub fn open(&mut self, ino: u64, write: bool) -> FsResult<u64> {
        let closing = self.closing;
        let node = self.node_mut(ino)?;
        match node.body {
            Body::Dir(_) => return Err(libc::EISDIR),
            Body::File(_) if write && closing => return Err(libc::ESHUTDOWN),
            Body::File(_) => {
                node.opens += 1;
                node.writers += u32::from(write);
            }
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, Handle { ino, write });
        Ok(fh)
    }

    /// The kernel closed handle `fh`. When it was the last one that could write, the kernel
    /// has written every dirty page: a gap left is a hole, and what was written so far ends a
    /// record. A reader's close (`cat`, `tail`, logrotate's copy) changes nothing.
    pub fn release(&mut self, fh: u64) -> FsResult<()> {
        let Handle { ino, write } = self.handles.remove(&fh).ok_or(libc::EBADF)?;
        let node = self.node_mut(ino)?;
        node.opens = node.opens.saturating_sub(1);
        if write {
            node.writers = node.writers.saturating_sub(1);
            if node.writers == 0 {
                if let Body::File(f) = &mut node.body {
                    f.take_ahead(true);
                    f.stream.end_record();
                }
            }
        }
        self.reap(ino);
        Ok(())
    }

    pub fn fsync(&mut self, ino: u64) -> FsResult<()> {
        if let Body::File(f) = &mut self.node_mut(ino)?.body {
            f.take_ahead(true);
            f.stream.end_record();
        }
        Ok(())
    }

    pub fn read(&mut self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let node = self.node_mut(ino)?;
        let Body::File(f) = &node.body else {
            return Err(libc::EISDIR);
        };
        let len = f.size.saturating_sub(offset).min(u64::from(size)) as usize;
        let mut out = vec![0; len];
        f.tail.read(offset, &mut out);
        node.atime = SystemTime::now();
        Ok(out)
    }

    /// Writes `data` at `offset`: bytes beyond the captured high-water mark go to the stream,
    /// bytes below it are counted as overwritten (the writeback cache re-sends partly
    /// written pages from the page start).
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let closing = self.closing;
        let tail_limit = self.options.tail_bytes;
        let node = self.node_mut(ino)?;
        let Body::File(f) = &mut node.body else {
            return Err(libc::EISDIR);
        };
        let len = u32::try_from(data.len()).map_err(|_| libc::EFBIG)?;
        let end = offset.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        if closing {
            f.stream.refused(data.len() as u64);
            return Err(libc::ESHUTDOWN);
        }
        if offset > f.captured && f.ahead_bytes() + data.len() > GAP_HOLD_BYTES {
            f.take_ahead(true);
        }
        if offset > f.captured {
            // Beyond a gap: writeback sent this page before an earlier one, or the writer
            // seeked past the end. Hold it until the gap fills or proves to be a hole.
            let held = f.ahead.entry(offset).or_default();
            if data.len() > held.len() {
                f.stream.overwritten(held.len() as u64);
                *held = data.to_vec();
            } else {
                f.stream.overwritten(data.len() as u64);
            }
            f.ahead_since.get_or_insert_with(Instant::now);
        } else {
            f.take(offset, data);
            f.take_ahead(false);
        }
        f.tail.write(offset, data, tail_limit);
        f.size = f.size.max(end);
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        Ok(len)
    }

    pub fn setattr(&mut self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        let closing = self.closing;
        let tail_limit = self.options.tail_bytes;
        let node = self.node_mut(ino)?;
        let now = SystemTime::now();
        if let Some(size) = set.size {
            let Body::File(f) = &mut node.body else {
                return Err(libc::EISDIR);
            };
            if closing {
                return Err(libc::ESHUTDOWN);
            }
            // What was held beyond gaps was written before the truncate.
            f.take_ahead(true);
            if size < f.captured {
                // copytruncate and O_TRUNC: what came before is complete, capture restarts.
                f.stream.end_record();
                f.captured = size;
            }
            f.tail.truncate(size, tail_limit);
            f.size = size;
            node.mtime = now;
        }
        if let Some(mode) = set.mode {
            node.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            node.uid = uid;
        }
        if let Some(gid) = set.gid {
            node.gid = gid;
        }
        if let Some(atime) = set.atime {
            node.atime = atime;
        }
        if let Some(mtime) = set.mtime {
            node.mtime = mtime;
        }
        node.ctime = now;
        self.getattr(ino)
    }

    /// Removes the name; the inode lives on while it is open or referenced.
    fn unlink_node(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        self.entries_mut(parent)?.remove(name);
        let now = SystemTime::now();
        if let Ok(p) = self.node_mut(parent) {
            p.mtime = now;
            p.ctime = now;
        }
        let node = self.node_mut(ino)?;
        node.linked = false;
        node.ctime = now;
        if let Body::File(f) = &mut node.body {
            f.stream.end_record();
        }
        self.reap(ino);
        Ok(())
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(libc::EISDIR);
        }
        self.unlink_node(parent, name, ino)
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        match &self.node(ino)?.body {
            Body::File(_) => return Err(libc::ENOTDIR),
            Body::Dir(entries) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
            Body::Dir(_) => {}
        }
        self.unlink_node(parent, name, ino)?;
        if parent == ROOT {
            self.capture.volume_removed(&name.to_string_lossy());
        }
        Ok(())
    }

    /// rename(2), including over an existing name. Renaming across volumes is EXDEV (a file's
    /// volume is part of its records' identity); volumes themselves are not renamed.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        check_name(newname)?;
        let ino = self.child(parent, name)?;
        if parent == ROOT || newparent == ROOT {
            return Err(libc::EPERM);
        }
        if self.volume_of(parent)? != self.volume_of(newparent)? {
            return Err(libc::EXDEV);
        }
        let is_dir = matches!(self.node(ino)?.body, Body::Dir(_));
        if is_dir {
            // A directory cannot move below itself.
            let mut at = newparent;
            while at != ROOT {
                if at == ino {
                    return Err(libc::EINVAL);
                }
                at = self.node(at)?.parent;
            }
        }
        if let Some(&target) = self.entries(newparent)?.get(newname) {
            if target == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (&self.node(target)?.body, is_dir) {
                (Body::Dir(_), false) => return Err(libc::EISDIR),
                (Body::File(_), true) => return Err(libc::ENOTDIR),
                (Body::Dir(entries), true) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.unlink_node(newparent, newname, target)?;
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(newparent)?.insert(newname.to_owned(), ino);
        let now = SystemTime::now();
        for dir in [parent, newparent] {
            if let Ok(d) = self.node_mut(dir) {
                d.mtime = now;
                d.ctime = now;
            }
        }
        let node = self.node_mut(ino)?;
        node.parent = newparent;
        node.name = newname.to_owned();
        node.ctime = now;
        self.tell_moved(ino)
    }

    /// Tells the streams at and below `ino` their new paths.
    fn tell_moved(&mut self, ino: u64) -> FsResult<()> {
        let children: Vec<u64> = match &self.node(ino)?.body {
            Body::Dir(entries) => entries.values().copied().collect(),
            Body::File(_) => {
                let (_, path) = self.location(ino)?;
                if let Body::File(f) = &mut self.node_mut(ino)?.body {
                    f.stream.moved(&path);
                }
                return Ok(());
            }
        };
        for child in children {
            self.tell_moved(child)?;
        }
        Ok(())
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let Body::Dir(entries) = &node.body else {
            return Err(libc::ENOTDIR);
        };
        let mut out = vec![
            DirEntry { ino, kind: Kind::Dir, name: ".".into() },
            DirEntry { ino: node.parent, kind: Kind::Dir, name: "..".into() },
        ];
        for (name, &child) in entries {
            let kind = match self.nodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir(_)) => Kind::Dir,
                _ => Kind::File,
            };
            out.push(DirEntry { ino: child, kind, name: name.clone() });
        }
        Ok(out)
    }

    /// Lets held gaps and partial records time out.
    pub fn tick(&mut self, now: Instant) {
        for node in self.nodes.values_mut() {
            if let Body::File(f) = &mut node.body {
                if f.ahead_since.is_some_and(|t| now.duration_since(t) >= GAP_HOLD) {
                    f.take_ahead(true);
                }
                f.stream.idle(now);
            }
        }
    }

    /// Shutdown has begun: every partial record ends now, and writes are refused from here on.
    pub fn close(&mut self) {
        self.closing = true;
        for node in self.nodes.values_mut() {
            if let Body::File(f) = &mut node.body {
                f.take_ahead(true);
                f.stream.end_record();
            }
        }
    }

    /// The volumes, by name.
    pub fn volumes(&self) -> Vec<String> {
        self.entries(ROOT).map(|e| e.keys().map(|k| k.to_string_lossy().into_owned()).collect()).unwrap_or_default()
    }

    /// Bytes held in file tails, over all files.
    pub fn tail_bytes_held(&self) -> usize {
        self.nodes
            .values()
            .map(|n| match &n.body {
                Body::File(f) => f.tail.held(),
                Body::Dir(_) => 0,
            })
            .sum()
    }

    /// Inodes in memory (named or still referenced).
    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests;
