//! The thin fuser adapter: kernel requests in, [`Model`] calls, replies out; opens get FUSE
//! passthrough to the file's memory when the kernel allows it. Also the mount's life: the
//! capture reader, the flusher that bounds how long a writeback cache may hold lines (when the
//! user chose it), and the unmount.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tracing::{info, warn};

use crate::capture::{Capture, Serving};
use crate::connection::Connection;
use crate::model::{Attr, FsResult, Kind, Model, Owner, SetAttr};
use crate::reader::{self, ReaderSettings};
use crate::sync::lock;

/// How long the kernel may trust attributes and names it was given.
const TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// FUSE passthrough: apps read and write the files' memory directly (kernel 6.9+, and
    /// CAP_SYS_ADMIN in the initial namespace). Where refused, every write() is a request.
    pub passthrough: bool,
    /// The kernel's writeback cache when there is no passthrough: large write requests instead
    /// of one per write(), at the price of the kernel holding written lines for a while.
    pub writeback_cache: bool,
    /// Largest write request, in bytes (the kernel caps it at 1 MiB).
    pub max_write: u32,
    /// Let other users (containers' users) use the mount; permissions are then checked by the
    /// kernel against each file's mode (`default_permissions`).
    pub allow_other: bool,
    /// How often files are scanned for bytes inotify did not report, partial records checked
    /// for timeouts, and (writeback cache) dirty pages pushed out.
    pub flush_interval: Duration,
}

type Shared<C> = Arc<Mutex<Model<C>>>;

/// Passthrough registrations of the files' memory with the kernel, one per open inode (every
/// open of an inode must share it), dropped with the inode's last open.
#[derive(Default)]
struct Passthrough {
    /// Granted at init and not refused since.
    on: bool,
    by_ino: HashMap<u64, (Arc<BackingId>, usize)>,
}

struct Adapter<C: Capture> {
    model: Shared<C>,
    options: MountOptions,
    passthrough: Mutex<Passthrough>,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// The kernel sets this bit of a request's id when it sends the request again
/// (`FUSE_NOTIFY_RESEND`): an earlier worker read it and may have done it before it died.
const RESENT: u64 = 1 << 63;

fn resent(req: &Request) -> bool {
    req.unique().0 & RESENT != 0
}

/// A resent request that made a name the earlier worker already made: that name is the answer.
fn made_before<C: Capture>(
    req: &Request,
    m: &mut Model<C>,
    parent: u64,
    name: &OsStr,
    r: FsResult<Attr>,
) -> FsResult<Attr> {
    match r {
        Err(libc::EEXIST) if resent(req) => m.lookup(parent, name),
        r => r,
    }
}

/// A resent request that removed what the earlier worker already removed: done.
fn done_before(req: &Request, r: FsResult<()>) -> FsResult<()> {
    match r {
        Err(libc::ENOENT) if resent(req) => Ok(()),
        r => r,
    }
}

fn owner(req: &Request) -> Owner {
    Owner { uid: req.uid(), gid: req.gid() }
}

fn reply_entry(reply: ReplyEntry, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_attr(reply: ReplyAttr, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.attr(&TTL, &file_attr(&a)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

impl<C: Capture> Adapter<C> {
    fn model(&self) -> MutexGuard<'_, Model<C>> {
        lock(&self.model)
    }

    /// A request that changes the namespace: the change is kept before the kernel hears back.
    fn change<T>(&self, f: impl FnOnce(&mut Model<C>) -> T) -> T {
        let mut model = self.model();
        let r = f(&mut model);
        model.commit();
        r
    }

    /// The backing registration for an open of `ino`, made with `register` on its first open;
    /// `None` without passthrough (never granted, or refused now: from then on, requests).
    fn backing(&self, ino: u64, register: impl FnOnce() -> io::Result<BackingId>) -> Option<Arc<BackingId>> {
        let mut p = lock(&self.passthrough);
        if let Some((id, opens)) = p.by_ino.get_mut(&ino) {
            *opens += 1;
            return Some(id.clone());
        }
        if !p.on {
            return None;
        }
        match register() {
            Ok(id) => {
                let id = Arc::new(id);
                p.by_ino.insert(ino, (id.clone(), 1));
                Some(id)
            }
            Err(e) => {
                p.on = false;
                let why = format!("the kernel refused a passthrough file ({e}); writes are requests from now on");
                warn!("{why}");
                self.model().capture().serving(&Serving::Requests { why });
                None
            }
        }
    }

    fn released(&self, ino: u64) {
        let mut p = lock(&self.passthrough);
        if let Some((_, opens)) = p.by_ino.get_mut(&ino) {
            *opens -= 1;
            if *opens == 0 {
                p.by_ino.remove(&ino);
            }
        }
    }
}

/// Opens that cannot pass through bypass the page cache, so that they stay coherent with
/// passthrough opens of the same file.
fn request_flags(passthrough_asked: bool) -> FopenFlags {
    if passthrough_asked {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

impl<C: Capture> Filesystem for Adapter<C> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let mut why = "passthrough is off in the config".to_string();
        if self.options.passthrough {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                // The files' memory is on no stacked filesystem: one level is enough.
                Ok(()) => match config.set_max_stack_depth(1) {
                    Ok(_) => {
                        self.passthrough.get_mut().unwrap_or_else(|e| e.into_inner()).on = true;
                    }
                    Err(_) => why = "the kernel refused the passthrough stack depth".into(),
                },
                Err(_) => why = "the kernel does not offer FUSE passthrough (Linux 6.9+)".into(),
            }
        }
        let passthrough = self.passthrough.get_mut().unwrap_or_else(|e| e.into_inner()).on;
        let serving = if passthrough {
            Serving::Passthrough
        } else if self.options.writeback_cache && config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE).is_ok() {
            Serving::Writeback { why }
        } else {
            Serving::Requests { why }
        };
        if !passthrough {
            warn!(serving = serving.name(), why = serving.why(), "volumes without passthrough");
        }
        lock(&self.model).capture().serving(&serving);
        if let Err(nearest) = config.set_max_write(self.options.max_write) {
            warn!(asked = self.options.max_write, nearest, "max_write not accepted; using the nearest value");
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.change(|m| m.lookup(parent.0, name)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.change(|m| m.forget(ino.0, nlookup));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.model().getattr(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr { mode, uid, gid, size, atime: atime.map(time), mtime: mtime.map(time) };
        reply_attr(reply, self.change(|m| m.setattr(ino.0, set)));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // FIFOs, sockets and devices have no place in a log directory.
            return reply.error(Errno::EPERM);
        }
        reply_entry(
            reply,
            self.change(|m| {
                let r = m.create(parent.0, name, mode & !umask, owner(req), req.pid());
                made_before(req, m, parent.0, name, r)
            }),
        );
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        reply_entry(
            reply,
            self.change(|m| {
                let r = m.mkdir(parent.0, name, mode & !umask, owner(req));
                made_before(req, m, parent.0, name, r)
            }),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, done_before(req, self.change(|m| m.unlink(parent.0, name))));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, done_before(req, self.change(|m| m.rmdir(parent.0, name))));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE and RENAME_WHITEOUT are not supported.
            return reply.error(Errno::EINVAL);
        }
        reply_empty(
            reply,
            done_before(req, self.change(|m| m.rename(parent.0, name, newparent.0, newname, noreplace))),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let read = flags.acc_mode() != OpenAccMode::O_WRONLY;
        let opened = {
            let mut model = self.model();
            let opened = model.open(ino.0, read, write, req.pid()).and_then(|fh| Ok((fh, model.tap(ino.0)?)));
            model.commit();
            opened
        };
        match opened {
            Ok((fh, tap)) => match self.backing(ino.0, || reply.open_backing(tap.backing())) {
                Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
                None => reply.opened(FileHandle(fh), request_flags(self.options.passthrough)),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let read = flags & libc::O_ACCMODE != libc::O_WRONLY;
        let made = {
            let mut model = self.model();
            let made = model.create(parent.0, name, mode & !umask, owner(req), req.pid());
            let made = made_before(req, &mut model, parent.0, name, made);
            let made = made.and_then(|a| Ok((a, model.open(a.ino, read, write, req.pid())?, model.tap(a.ino)?)));
            model.commit();
            made
        };
        match made {
            Ok((a, fh, tap)) => {
                let attr = file_attr(&a);
                match self.backing(a.ino, || reply.open_backing(tap.backing())) {
                    Some(id) => {
                        reply.created_passthrough(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty(), &id)
                    }
                    None => reply.created(
                        &TTL,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        request_flags(self.options.passthrough),
                    ),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Every write has landed before FLUSH; records end at release.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.change(|m| m.release(fh.0));
        self.released(ino.0);
        reply_empty(reply, r);
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.model().fsync(ino.0));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.model().readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match entry.kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(entry.ino), (i + 1) as u64, kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Captured contents are given back, so space does not run out; report plenty rather
        // than zero, which some loggers take for a full disk.
        let blocks = 1 << 32;
        reply.statfs(blocks, blocks, blocks, 1 << 24, 1 << 24, 4096, crate::model::NAME_MAX as u32, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    // Extended attributes are not kept. ENOSYS tells the kernel once for the whole mount, so it
    // stops asking (it would otherwise look up security.capability on every write).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // isatty() and friends: a log file is not a terminal.
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }
}

/// A mounted logtap filesystem. Dropping it without [`MountedFs::unmount`] leaves the kernel
/// to clean up when the process exits.
pub struct MountedFs<C: Capture> {
    model: Shared<C>,
    mountpoint: PathBuf,
    connection: Connection,
    session: Option<fuser::BackgroundSession>,
    /// The capture reader and (writeback cache) the flusher stop on this.
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

fn umount(path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches a mount that is busy or whose daemon died ("Transport endpoint is not connected").
fn detach(path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to write back the mount's dirty pages now.
fn syncfs(dir: &std::fs::File) {
    // SAFETY: the fd is open for the duration of the call.
    unsafe { libc::syncfs(dir.as_raw_fd()) };
}

/// Mounts `model` at `mountpoint` (made if missing; a dead mount left there is detached first)
/// and starts the capture reader.
pub fn mount<C: Capture>(model: Model<C>, mountpoint: &Path, options: MountOptions) -> io::Result<MountedFs<C>> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!(mountpoint = %mountpoint.display(), "a dead mount was left here by an earlier run; detaching it");
            detach(mountpoint)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(mountpoint)?,
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "mountpoint is not a directory"));
        }
        Ok(_) => {}
    }
    let connection = Connection::mount(mountpoint, options.allow_other)?;
    let fs = serve(model, mountpoint, options, connection, true)?;
    info!(mountpoint = %mountpoint.display(), "volumes mounted");
    Ok(fs)
}

/// Serves a mount an earlier process made and served (its connection was kept): `model` is
/// that process's namespace, restored. Requests it read and did not answer come again.
pub fn resume<C: Capture>(
    model: Model<C>,
    mountpoint: &Path,
    options: MountOptions,
    connection: Connection,
) -> io::Result<MountedFs<C>> {
    let fs = serve(model, mountpoint, options, connection, false)?;
    if let Err(e) = fs.connection.resend() {
        warn!("the kernel did not resend the requests left unanswered (Linux 6.9+ does): {e}");
    }
    info!(mountpoint = %mountpoint.display(), "volumes resumed");
    Ok(fs)
}

fn serve<C: Capture>(
    model: Model<C>,
    mountpoint: &Path,
    options: MountOptions,
    connection: Connection,
    fresh: bool,
) -> io::Result<MountedFs<C>> {
    let (taps, budget) = (model.taps(), model.budget());
    let model = Arc::new(Mutex::new(model));
    let mut config = fuser::Config::default();
    config.acl = if options.allow_other { SessionACL::All } else { SessionACL::Owner };
    // One request loop: requests on a file are handled in the order the kernel sent them.
    config.n_threads = Some(1);
    let adapter = Adapter { model: model.clone(), options: options.clone(), passthrough: Mutex::default() };
    let acl = config.acl;
    let (session, answer) = connection.handshake(|fd| fuser::Session::from_fd(adapter, fd, acl, config))?;
    if fresh {
        connection.answer(&answer)?;
    }
    connection.become_device(session.as_fd())?;
    let session = session.spawn()?;

    let stop = Arc::new(AtomicBool::new(false));
    let settings = ReaderSettings { interval: options.flush_interval, budget };
    let mut threads = vec![reader::spawn(taps, settings, stop.clone())?];
    if options.writeback_cache {
        let stop = stop.clone();
        let dir = std::fs::File::open(mountpoint)?;
        threads.push(std::thread::Builder::new().name("volume-flusher".into()).spawn(move || {
            // A thread apart from the request loop: syncfs waits for the loop to take the pages.
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(options.flush_interval);
                syncfs(&dir);
            }
        })?);
    }
    Ok(MountedFs { model, mountpoint: mountpoint.to_owned(), connection, session: Some(session), stop, threads })
}

impl<C: Capture> MountedFs<C> {
    pub fn model(&self) -> MutexGuard<'_, Model<C>> {
        lock(&self.model)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The connection, for a keeper to hold past this process.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Shutdown begins: (writeback cache) dirty pages are pushed out, every file is sealed
    /// so that later writes fail rather than go unread, and what was written before is
    /// captured, partial records ended.
    pub fn close(&mut self) {
        if let Ok(dir) = std::fs::File::open(&self.mountpoint) {
            syncfs(&dir);
        }
        self.model().close();
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Unmounts (lazily if the mount is still in use) and waits up to `wait` for the request
    /// loop to end.
    pub fn unmount(mut self, wait: Duration) -> io::Result<()> {
        self.close();
        let Some(session) = self.session.take() else { return Ok(()) };
        match umount(&self.mountpoint) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                warn!(mountpoint = %self.mountpoint.display(), "volumes still in use; detaching lazily");
                detach(&self.mountpoint)?;
            }
            Err(e) => return Err(e),
        }
        // Unmounted, the connection ends and so does the request loop.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(session.join());
        });
        if rx.recv_timeout(wait).is_err() {
            warn!("the FUSE request loop did not end in time; leaving it to the kernel");
        }
        info!(mountpoint = %self.mountpoint.display(), "volumes unmounted");
        Ok(())
    }
}
