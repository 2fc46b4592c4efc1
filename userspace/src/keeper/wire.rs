//! The keeper's socket: messages of one datagram each (a `SOCK_SEQPACKET` pair), a JSON body
//! and at most one file descriptor passed with it (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// Largest message body.
const MAX_BODY: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Worker: what is kept, please (answered with `Kept` for each, then `Ready`).
    Hello,
    /// Keeper: one kept fd, with its name.
    Kept { name: String },
    /// Keeper: everything kept was sent.
    Ready(Handover),
    /// Worker: keep this fd (sent with it) under `name`.
    Keep { name: String },
    /// Worker: let go of `name`.
    Release { name: String },
    /// Worker: everything is up (the mount served, the control socket bound). A worker that
    /// exits before saying so did not start.
    Serving,
    /// Worker: start `binary` as the next worker and stop this one; with `keeper`, the keeper
    /// first re-executes itself into it.
    Upgrade {
        binary: String,
        #[serde(default)]
        keeper: bool,
    },
}

/// What the keeper tells a worker it starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    pub keeper_pid: u32,
    /// Workers started before this one.
    pub restarts: u64,
    /// When the worker before this one exited (nanoseconds since the epoch), 0 for the first.
    pub exited_at_ns: u64,
    /// How it exited, for the log and the stats ("killed by signal 9", "exit status 101").
    pub exit: String,
}

pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is an array of two ints.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

const CMSG_SPACE: usize = 64;

#[repr(C)]
union Control {
    buf: [u8; CMSG_SPACE],
    _align: libc::cmsghdr,
}

pub fn send(socket: BorrowedFd<'_>, message: &Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() };
    let mut control = Control { buf: [0; CMSG_SPACE] };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: the control buffer has room for one fd's header and data.
        unsafe {
            msg.msg_control = control.buf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg is fully set up.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The next message and the fd that came with it; `None` when the other end is gone.
pub fn recv(socket: BorrowedFd<'_>) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_BODY];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
    let mut control = Control { buf: [0; CMSG_SPACE] };
    // SAFETY: as in send.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: the union's buffer is plain bytes.
    msg.msg_control = unsafe { control.buf.as_mut_ptr().cast() };
    msg.msg_controllen = CMSG_SPACE;
    let n = loop {
        // SAFETY: msg points at buffers that live through the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned();
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 && fd.is_none() {
        return Ok(None);
    }
    let message = serde_json::from_slice(&body[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a keeper message: {e}")))?;
    Ok(Some((message, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_message_carries_an_fd_across() {
        let (a, b) = socketpair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"kept").unwrap();
        send(a.as_fd(), &Message::Keep { name: "file/7".into() }, Some(f.as_fd())).unwrap();
        send(a.as_fd(), &Message::Hello, None).unwrap();
        let (m, fd) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(m, Message::Keep { name: "file/7".into() });
        let mut got = std::fs::File::from(fd.unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "kept");
        let (m, fd) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(m, Message::Hello);
        assert!(fd.is_none());
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
    }
}
