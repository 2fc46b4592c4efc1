//! Facts of the host the agent asks the kernel for: cgroups, processes' pipes, the host name,
//! and HTTP over a Unix socket (the control socket's clients, the container runtime's API).

pub mod cgroups;
pub mod http;

/// The machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The inodes of the pipes process `pid` has on fd 1 and fd 2 (`None` for an fd that is no
/// pipe, or a process that is gone).
pub fn output_pipes(pid: u32) -> (Option<u64>, Option<u64>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let ino = |fd: u32| {
        let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
        m.file_type().is_fifo().then(|| m.ino())
    };
    (ino(1), ino(2))
}
