//! The filesystem's namespace: inodes, names, handles and attributes.
//!
//! No FUSE here: the adapter in `fuse.rs` turns kernel requests into these calls, and unit
//! tests drive them directly. Errors are plain errno values.
//!
//! Layout: the root holds only directories, the volumes. Inside a volume, files and nested
//! directories behave like a log directory on any filesystem. Each file's content lives in
//! memory ([`Tap`]); capture reads it from there. What changes a file under capture (truncate,
//! rename, unlink, the last close) captures what was written before it first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use std::time::SystemTime;

use crate::backing::Backing;
use crate::capture::{Capture, Stream};
use crate::kept::{self, Entry, Keeping, KeptPosition, NodeImage};
use crate::name::Name;
use crate::reader::{enforce_budget, Taps};
use crate::tap::{Mark, Settings, Tap};

pub const ROOT: u64 = 1;
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

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub settings: Settings,
    /// Most regular files one volume may hold (each costs a file descriptor of the agent).
    pub max_files: usize,
    /// Memory one volume's files may hold.
    pub budget: u64,
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
    /// The process that made the file (0 when unknown, and for directories).
    creator: u32,
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
            creator: 0,
            body,
        }
    }

    fn image(&self, ino: u64) -> NodeImage {
        NodeImage {
            ino,
            parent: self.parent,
            name: self.name.as_bytes().to_vec(),
            dir: matches!(self.body, Body::Dir(_)),
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            times: [self.atime, self.mtime, self.ctime].map(kept::nanos),
            lookups: self.lookups,
            opens: self.opens,
            writers: self.writers,
            linked: self.linked,
            creator: self.creator,
        }
    }
}

enum Body<S> {
    Dir(BTreeMap<OsString, u64>),
    File(Arc<Tap<S>>),
}

/// One open of a file (the kernel's file handle): which inode, what it may do, and who opened
/// it (a process reading one file while it makes another is making a copy).
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    read: bool,
    write: bool,
    pid: u32,
}

pub struct Model<C: Capture> {
    capture: C,
    nodes: HashMap<u64, Node<C::Stream>>,
    next_ino: u64,
    /// Open handles by id; a reader's close must not end a writer's line.
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    options: Options,
    /// Regular files per volume.
    files: HashMap<u64, usize>,
    taps: Arc<Taps<C::Stream>>,
    closing: bool,
    /// Where the namespace is kept past this process, and what changed since it was last told.
    keeping: Option<Keeping>,
    dirty: BTreeSet<u64>,
    dirty_handles: BTreeSet<u64>,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

fn io_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
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

/// A journal holding more than this beyond the image it would be rewritten as is rewritten.
const REWRITE_AFTER: u64 = 1 << 20;

impl<C: Capture> Model<C> {
    /// An empty namespace; with `keeping`, every change is kept there.
    pub fn new(capture: C, options: Options, root_owner: Owner, keeping: Option<Keeping>) -> std::io::Result<Self> {
        let root = Node::new(ROOT, OsStr::new(""), 0o755, root_owner, Body::Dir(BTreeMap::new()));
        let mut model = Self {
            capture,
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_handle: 1,
            options,
            files: HashMap::new(),
            taps: Taps::new()?,
            closing: false,
            keeping,
            dirty: BTreeSet::from([ROOT]),
            dirty_handles: BTreeSet::new(),
        };
        model.commit();
        Ok(model)
    }

    /// The namespace an earlier worker kept in `keeping`, with the memory of each of its files
    /// (`files`, by inode). Capture of each file resumes at its kept position.
    pub fn restore(
        capture: C,
        options: Options,
        keeping: Keeping,
        mut files: HashMap<u64, File>,
    ) -> std::io::Result<Self> {
        let mut images: BTreeMap<u64, NodeImage> = BTreeMap::new();
        let mut handles = HashMap::new();
        let mut positions = HashMap::new();
        let (mut next_ino, mut next_handle) = (ROOT + 1, 1);
        for entry in keeping.journal.entries()? {
            match Entry::decode(&entry)? {
                Entry::Node(n) => {
                    next_ino = next_ino.max(n.ino + 1);
                    images.insert(n.ino, n);
                }
                Entry::Gone { ino } => {
                    next_ino = next_ino.max(ino + 1);
                    images.remove(&ino);
                    positions.remove(&ino);
                }
                Entry::Open { fh, ino, read, write, pid } => {
                    next_handle = next_handle.max(fh + 1);
                    handles.insert(fh, Handle { ino, read, write, pid });
                }
                Entry::Closed { fh } => {
                    next_handle = next_handle.max(fh + 1);
                    handles.remove(&fh);
                }
                Entry::At { ino, pos } => {
                    positions.insert(ino, pos);
                }
                Entry::Next { ino, fh } => {
                    next_ino = next_ino.max(ino);
                    next_handle = next_handle.max(fh);
                }
            }
        }
        if !images.get(&ROOT).is_some_and(|r| r.dir) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the kept namespace has no root"));
        }
        let mut model = Self {
            capture,
            nodes: HashMap::new(),
            next_ino,
            handles,
            next_handle,
            options,
            files: HashMap::new(),
            taps: Taps::new()?,
            closing: false,
            keeping: Some(keeping.clone()),
            dirty: BTreeSet::new(),
            dirty_handles: BTreeSet::new(),
        };
        for n in images.values() {
            let [atime, mtime, ctime] = n.times.map(kept::time);
            let node = Node {
                parent: n.parent,
                name: OsString::from_vec(n.name.clone()),
                perm: n.perm,
                uid: n.uid,
                gid: n.gid,
                atime,
                mtime,
                ctime,
                lookups: n.lookups,
                opens: n.opens,
                writers: n.writers,
                linked: n.linked,
                creator: n.creator,
                // A file's content is joined below, once every directory is in place.
                body: Body::Dir(BTreeMap::new()),
            };
            model.nodes.insert(n.ino, node);
        }
        for n in images.values().filter(|n| n.linked && n.ino != ROOT) {
            if let Ok(entries) = model.entries_mut(n.parent) {
                entries.insert(OsString::from_vec(n.name.clone()), n.ino);
            }
        }
        for volume in model.volumes() {
            model.capture.volume_created(&volume);
        }
        for n in images.values().filter(|n| !n.dir) {
            let (volume_ino, (volume, path)) = match (model.volume_of(n.ino), model.location(n.ino)) {
                (Ok(v), Ok(l)) => (v, l),
                _ => {
                    tracing::warn!(ino = n.ino, "a kept volume file is in no volume; it is dropped");
                    model.nodes.remove(&n.ino);
                    continue;
                }
            };
            let backing = match files.remove(&n.ino) {
                Some(f) => Backing::adopt(f),
                None => {
                    tracing::warn!(volume, path, "a kept volume file's memory was not kept; it starts empty");
                    model.new_backing(n.ino)?
                }
            };
            let stream = model.capture.stream(&volume, &path, n.creator);
            let from = positions.get(&n.ino).copied().unwrap_or(0);
            let kept = Some(KeptPosition { journal: keeping.journal.clone(), ino: n.ino });
            let tap = Tap::new(volume_ino, stream, model.options.settings, backing, from, kept);
            if let Some(node) = model.nodes.get_mut(&n.ino) {
                node.body = Body::File(tap.clone());
            }
            *model.files.entry(volume_ino).or_default() += 1;
            model.taps.add(n.ino, tap);
        }
        for name in files.into_keys() {
            // Memory of files that were gone before the journal said so.
            keeping.keeper.release(&kept::file_name(name));
        }
        Ok(model)
    }

    /// Memory for file `ino`'s content, kept by the keeper (when there is one) from now on.
    fn new_backing(&self, ino: u64) -> std::io::Result<Backing> {
        let backing = Backing::new()?;
        if let Some(k) = &self.keeping {
            if let Err(e) = k.keeper.keep(&kept::file_name(ino), backing.as_fd()) {
                tracing::warn!("the keeper did not take a volume file's memory; a restart would lose it: {e}");
            }
        }
        Ok(backing)
    }

    /// Tells the journal what changed since the last call; rewrites it when it has grown well
    /// past what it says.
    pub fn commit(&mut self) {
        let Some(k) = &self.keeping else {
            self.dirty.clear();
            self.dirty_handles.clear();
            return;
        };
        let mut entries = Vec::new();
        for ino in std::mem::take(&mut self.dirty) {
            entries.push(match self.nodes.get(&ino) {
                Some(n) => Entry::Node(n.image(ino)),
                None => Entry::Gone { ino },
            });
        }
        for fh in std::mem::take(&mut self.dirty_handles) {
            entries.push(match self.handles.get(&fh) {
                Some(h) => Entry::Open { fh, ino: h.ino, read: h.read, write: h.write, pid: h.pid },
                None => Entry::Closed { fh },
            });
        }
        let journal = k.journal.clone();
        for e in entries {
            if let Err(e) = journal.append(&e.encode()) {
                tracing::warn!("cannot keep a change of the volumes' namespace: {e}");
            }
        }
        let image_size = (self.nodes.len() + self.handles.len()) as u64 * 256;
        if journal.len() > REWRITE_AFTER + 4 * image_size {
            if let Err(e) = journal.rewrite(&self.image()) {
                tracing::warn!("cannot rewrite the volumes' journal: {e}");
            }
        }
    }

    /// Everything the journal needs to say, as few entries.
    fn image(&self) -> Vec<Vec<u8>> {
        let mut out = vec![Entry::Next { ino: self.next_ino, fh: self.next_handle }.encode()];
        for (&ino, n) in &self.nodes {
            out.push(Entry::Node(n.image(ino)).encode());
            if let Body::File(t) = &n.body {
                out.push(Entry::At { ino, pos: t.kept_at() }.encode());
            }
        }
        for (&fh, h) in &self.handles {
            out.push(Entry::Open { fh, ino: h.ino, read: h.read, write: h.write, pid: h.pid }.encode());
        }
        out
    }

    pub fn budget(&self) -> u64 {
        self.options.budget
    }

    /// Every file's capture, for the capture reader.
    pub fn taps(&self) -> Arc<Taps<C::Stream>> {
        self.taps.clone()
    }

    /// The content of file `ino`.
    pub fn tap(&self, ino: u64) -> FsResult<Arc<Tap<C::Stream>>> {
        match &self.node(ino)?.body {
            Body::File(t) => Ok(t.clone()),
            Body::Dir(_) => Err(libc::EISDIR),
        }
    }

    pub fn capture(&self) -> &C {
        &self.capture
    }

    fn node(&self, ino: u64) -> FsResult<&Node<C::Stream>> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    /// A node to change: the change is kept at the next commit.
    fn node_mut(&mut self, ino: u64) -> FsResult<&mut Node<C::Stream>> {
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        self.dirty.insert(ino);
        Ok(node)
    }

    /// A node whose times change (reads, writes): not worth a journal entry each.
    fn node_times(&mut self, ino: u64) -> FsResult<&mut Node<C::Stream>> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: u64) -> FsResult<&BTreeMap<OsString, u64>> {
        match &self.node(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            Body::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> FsResult<&mut BTreeMap<OsString, u64>> {
        match &mut self.node_times(dir)?.body {
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
            Body::File(t) => (Kind::File, t.size(), u32::from(node.linked)),
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

    /// Drops an inode that has no name, no kernel reference and no open handle; a file's last
    /// bytes are captured first.
    fn reap(&mut self, ino: u64) {
        let gone = matches!(self.nodes.get(&ino), Some(n) if !n.linked && n.lookups == 0 && n.opens == 0);
        if !gone || ino == ROOT {
            return;
        }
        self.dirty.insert(ino);
        if let Some(Node { body: Body::File(tap), .. }) = self.nodes.remove(&ino) {
            self.taps.remove(ino);
            if let Some(k) = &self.keeping {
                k.keeper.release(&kept::file_name(ino));
            }
            if let Some(n) = self.files.get_mut(&tap.volume) {
                *n = n.saturating_sub(1);
            }
            if let Err(e) = tap.finish() {
                tracing::warn!("cannot read a removed volume file's last bytes: {e}");
            }
        }
    }

    fn insert(&mut self, parent: u64, name: &OsStr, perm: u32, owner: Owner, body: Body<C::Stream>) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.nodes.insert(ino, Node::new(parent, name, perm, owner, body));
        self.dirty.insert(ino);
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
        let volume_ino = self.volume_of(parent)?;
        if self.files.get(&volume_ino).copied().unwrap_or(0) >= self.options.max_files {
            return Err(libc::ENOSPC);
        }
        let (volume, dir_path) = self.location(parent)?;
        let name_str = name.to_string_lossy();
        let path = if dir_path.is_empty() { name_str.into_owned() } else { format!("{dir_path}/{name_str}") };
        let ino = self.next_ino;
        let backing = self.new_backing(ino).map_err(|e| {
            tracing::warn!("cannot make the memory for a volume file: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })?;
        let stream = self.capture.stream(&volume, &path, creator);
        let kept = self.keeping.as_ref().map(|k| KeptPosition { journal: k.journal.clone(), ino });
        let tap = Tap::new(volume_ino, stream, self.options.settings, backing, 0, kept);
        let ino = self.insert(parent, name, mode, owner, Body::File(tap.clone()));
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.creator = creator;
        }
        *self.files.entry(volume_ino).or_default() += 1;
        self.taps.add(ino, tap);
        self.note_copy(ino, creator);
        self.getattr(ino)
    }

    /// A file made or opened for writing by a process that is reading another file of the same
    /// volume is (probably) a copy of it, as logrotate's `copytruncate` and `cp` make: its bytes
    /// are compared with that file's at the same offsets, and equal ones are not captured again.
    fn note_copy(&self, ino: u64, pid: u32) {
        if pid == 0 {
            return;
        }
        let Ok(copy) = self.tap(ino) else { return };
        let source = self
            .handles
            .values()
            .filter(|h| h.pid == pid && h.read && h.ino != ino)
            .find_map(|h| self.tap(h.ino).ok().filter(|t| t.volume == copy.volume));
        if let Some(source) = source {
            copy.copy_of(source);
        }
    }

    /// Opens a file by process `pid` (0 when unknown); the handle id goes to the kernel and
    /// comes back with `release`.
    pub fn open(&mut self, ino: u64, read: bool, write: bool, pid: u32) -> FsResult<u64> {
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
        if write {
            self.note_copy(ino, pid);
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, Handle { ino, read, write, pid });
        self.dirty_handles.insert(fh);
        Ok(fh)
    }

    /// The kernel closed handle `fh`. When it was the last one that could write, every write
    /// has landed: a hole left is final, and what was written so far ends a record. A reader's
    /// close (`cat`, `tail`, logrotate's copy) changes nothing.
    pub fn release(&mut self, fh: u64) -> FsResult<()> {
        let Handle { ino, write, .. } = self.handles.remove(&fh).ok_or(libc::EBADF)?;
        self.dirty_handles.insert(fh);
        let node = self.node_mut(ino)?;
        node.opens = node.opens.saturating_sub(1);
        if write {
            node.writers = node.writers.saturating_sub(1);
            if node.writers == 0 {
                if let Body::File(t) = &node.body {
                    // A copy is complete when its writer closes it.
                    t.settle_copy().map_err(io_errno)?;
                    t.mark(Mark::End).map_err(io_errno)?;
                }
            }
        }
        self.reap(ino);
        Ok(())
    }

    pub fn fsync(&mut self, ino: u64) -> FsResult<()> {
        if let Body::File(t) = &self.node(ino)?.body {
            t.mark(Mark::End).map_err(io_errno)?;
        }
        Ok(())
    }

    /// Reads through the agent (no passthrough): released bytes read as zeros.
    pub fn read(&mut self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let node = self.node_times(ino)?;
        let Body::File(t) = &node.body else {
            return Err(libc::EISDIR);
        };
        let len = t.size().saturating_sub(offset).min(u64::from(size)) as usize;
        let mut out = vec![0; len];
        let n = t.backing().read_full(&mut out, offset).map_err(io_errno)?;
        out.truncate(n);
        node.atime = SystemTime::now();
        Ok(out)
    }

    /// A write request (no passthrough): into the file's memory, then captured.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let t = self.tap(ino)?;
        let len = u32::try_from(data.len()).map_err(|_| libc::EFBIG)?;
        offset.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        if self.closing {
            t.with_stream(|s| s.refused(data.len() as u64));
            return Err(libc::ESHUTDOWN);
        }
        t.write(offset, data).map_err(io_errno)?;
        let budget = self.options.budget;
        if t.behind() > budget / 4 {
            // Requests can come faster than the capture reader looks: a file this far behind
            // holds its volume to the budget here too.
            let group: Vec<_> = self.taps.all().into_iter().filter(|o| o.volume == t.volume).collect();
            enforce_budget(&group, budget);
        }
        let now = SystemTime::now();
        let node = self.node_times(ino)?;
        node.mtime = now;
        node.ctime = now;
        Ok(len)
    }

    pub fn setattr(&mut self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        let now = SystemTime::now();
        if let Some(size) = set.size {
            let tap = self.tap(ino)?;
            if self.closing {
                return Err(libc::ESHUTDOWN);
            }
            // Copies being made of this file are settled while it still holds what they copied.
            for copy in self.copies_of(&tap) {
                copy.settle_copy().map_err(io_errno)?;
            }
            tap.truncate(size).map_err(io_errno)?;
            self.node_mut(ino)?.mtime = now;
        }
        let node = self.node_mut(ino)?;
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

    fn copies_of(&self, source: &Arc<Tap<C::Stream>>) -> Vec<Arc<Tap<C::Stream>>> {
        self.nodes
            .values()
            .filter_map(|n| match &n.body {
                Body::File(t) if t.is_copy_of(source) => Some(t.clone()),
                _ => None,
            })
            .collect()
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
        if let Body::File(t) = &node.body {
            t.mark(Mark::End).map_err(io_errno)?;
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
            Body::File(t) => {
                let (_, path) = self.location(ino)?;
                t.mark(Mark::Moved(path)).map_err(io_errno)?;
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

    /// Shutdown has begun: every file is sealed (later writes fail with EPERM, passthrough or
    /// not; new opens for writing get ESHUTDOWN), then what was written before is captured and
    /// every partial record ends.
    pub fn close(&mut self) {
        self.closing = true;
        let taps = self.taps.all();
        for t in &taps {
            if let Err(e) = t.backing().seal() {
                tracing::warn!("cannot seal a volume file against writes: {e}");
            }
        }
        for t in &taps {
            if let Err(e) = t.finish() {
                tracing::warn!("cannot read a volume file's last bytes: {e}");
            }
        }
    }

    /// The volumes, by name.
    pub fn volumes(&self) -> Vec<String> {
        self.entries(ROOT).map(|e| e.keys().map(|k| k.to_string_lossy().into_owned()).collect()).unwrap_or_default()
    }

    /// Memory the files' contents hold, over all files.
    pub fn held_bytes(&self) -> u64 {
        self.taps.all().iter().map(|t| t.held()).sum()
    }

    /// Inodes in memory (named or still referenced).
    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests;
