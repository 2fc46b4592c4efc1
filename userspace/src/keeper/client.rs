//! A worker's end of its keeper's socket.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use super::wire::{self, Handover, Message};
use super::{SOCKET_ENV, SOCKET_FD};

pub struct KeeperLink {
    socket: OwnedFd,
}

/// What a worker was handed.
pub struct TakeOver {
    pub fds: HashMap<String, OwnedFd>,
    pub handover: Handover,
}

impl KeeperLink {
    /// The keeper this worker was started by, if any.
    pub fn from_env() -> Option<Self> {
        let fd: i32 = std::env::var(SOCKET_ENV).ok()?.parse().ok()?;
        if fd != SOCKET_FD {
            return None;
        }
        std::env::remove_var(SOCKET_ENV);
        // SAFETY: the keeper left its socket at this fd for us; nothing else owns it. It must
        // not reach processes this one starts.
        let socket = unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            OwnedFd::from_raw_fd(fd)
        };
        Some(Self { socket })
    }

    /// Everything the keeper holds, and how the worker before this one ended.
    pub fn take_over(&self) -> io::Result<TakeOver> {
        wire::send(self.socket.as_fd(), &Message::Hello, None)?;
        let mut fds = HashMap::new();
        loop {
            match wire::recv(self.socket.as_fd())? {
                Some((Message::Kept { name }, Some(fd))) => {
                    fds.insert(name, fd);
                }
                Some((Message::Ready(handover), _)) => return Ok(TakeOver { fds, handover }),
                Some((m, _)) => tracing::warn!(?m, "an unexpected message from the keeper"),
                None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the keeper went away")),
            }
        }
    }

    pub fn serving(&self) -> io::Result<()> {
        wire::send(self.socket.as_fd(), &Message::Serving, None)
    }

    pub fn upgrade(&self, binary: &str, keeper: bool) -> io::Result<()> {
        wire::send(self.socket.as_fd(), &Message::Upgrade { binary: binary.into(), keeper }, None)
    }
}

impl logtap_fusefs::kept::Keeper for KeeperLink {
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        wire::send(self.socket.as_fd(), &Message::Keep { name: name.into() }, Some(fd))
    }

    fn release(&self, name: &str) {
        if let Err(e) = wire::send(self.socket.as_fd(), &Message::Release { name: name.into() }, None) {
            tracing::warn!(name, "cannot tell the keeper to let go: {e}");
        }
    }
}
