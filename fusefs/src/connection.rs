//! The mount's connection to the kernel: a /dev/fuse fd that can outlive the process serving it.
//!
//! The kernel keeps a FUSE mount alive while any process holds its /dev/fuse fd: requests wait
//! in the kernel while nobody reads them. So the agent's keeper holds the fd, and a worker that
//! takes over serves the same connection. The kernel sends INIT once per mount; fuser's session
//! wants to see one before it serves anything. So the mount is made here, the kernel's INIT is
//! kept, and every session (the first and each one after a restart) is initialised from it over
//! a socket pair whose fd then becomes the /dev/fuse fd. Only the first session's answer goes to
//! the kernel; later ones agree with it, being given the same INIT.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::backing::check;

/// `fuse_out_header.error` of a notification asking the kernel to send again every request
/// it handed out and got no answer to (`FUSE_NOTIFY_RESEND`, Linux 6.9).
const NOTIFY_RESEND: i32 = 7;
/// Big enough for any INIT the kernel sends.
const INIT_BUFFER: usize = 64 << 10;

/// A mount's /dev/fuse fd and the INIT its kernel sent.
pub struct Connection {
    pub device: OwnedFd,
    pub init: Vec<u8>,
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a mount argument"))
}

impl Connection {
    /// Mounts a FUSE filesystem at `mountpoint` and reads the kernel's INIT.
    pub fn mount(mountpoint: &Path, allow_other: bool) -> io::Result<Self> {
        let device = File::options().read(true).write(true).open("/dev/fuse")?;
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut data =
            format!("fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions", device.as_raw_fd());
        if allow_other {
            data.push_str(",allow_other");
        }
        let target = cstring(mountpoint.as_os_str().as_bytes())?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
        // SAFETY: valid NUL-terminated strings for the whole call.
        check(unsafe {
            libc::mount(
                c"logtap".as_ptr(),
                target.as_ptr(),
                c"fuse.logtap".as_ptr(),
                flags,
                cstring(data.as_bytes())?.as_ptr().cast(),
            )
        })?;
        let mut init = vec![0; INIT_BUFFER];
        let n = loop {
            match (&device).read(&mut init) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        init.truncate(n);
        Ok(Self { device: device.into(), init })
    }

    /// Starts a session on one end of a socket pair, this side playing the kernel with the
    /// kept INIT; returns the session and its answer.
    pub fn handshake<T>(&self, start: impl FnOnce(OwnedFd) -> io::Result<T>) -> io::Result<(T, Vec<u8>)> {
        let mut fds = [0; 2];
        // SAFETY: fds is an array of two ints.
        check(unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        })?;
        // SAFETY: both fds are fresh and ours.
        let (ours, theirs) = unsafe { (UnixStream::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (&ours).write_all(&self.init)?;
        let session = start(theirs)?;
        let mut answer = vec![0; INIT_BUFFER];
        let n = (&ours).read(&mut answer)?;
        answer.truncate(n);
        Ok((session, answer))
    }

    /// Sends the session's answer to the kernel's INIT (a fresh mount only).
    pub fn answer(&self, answer: &[u8]) -> io::Result<()> {
        File::from(self.device.try_clone()?).write_all(answer)
    }

    /// Makes `fd` (the session's end of the handshake) the /dev/fuse fd from now on.
    pub fn become_device(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: both fds are open; dup2 replaces what `fd` refers to atomically.
        check(unsafe { libc::dup2(self.device.as_raw_fd(), fd.as_raw_fd()) })?;
        Ok(())
    }

    /// Asks the kernel to send again the requests a worker before this one read and never
    /// answered. Linux 6.9+; older kernels refuse it (those requests then wait forever).
    pub fn resend(&self) -> io::Result<()> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&16u32.to_le_bytes());
        header[4..8].copy_from_slice(&NOTIFY_RESEND.to_le_bytes());
        File::from(self.device.try_clone()?).write_all(&header)
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}
