//! What of a mount outlives the process serving it: each file's memory (its memfd, held by the
//! keeper) and the namespace (inodes, names, lookups, open handles, capture positions), written
//! to a [`Journal`] as it changes. A worker that takes over restores the model from both.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::journal::Journal;

/// Holds file descriptors past this process (the agent's keeper).
pub trait Keeper: Send + Sync + 'static {
    /// Keeps `fd` under `name`, replacing what was kept under it.
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// Lets go of what is kept under `name`.
    fn release(&self, name: &str);
}

/// Where a model keeps itself.
#[derive(Clone)]
pub struct Keeping {
    pub journal: Arc<Journal>,
    pub keeper: Arc<dyn Keeper>,
}

/// The name a file's memory is kept under.
pub fn file_name(ino: u64) -> String {
    format!("file/{ino}")
}

/// The inode a kept name is the memory of.
pub fn file_ino(name: &str) -> Option<u64> {
    name.strip_prefix("file/")?.parse().ok()
}

/// One change of the namespace. A later entry about the same inode or handle replaces an
/// earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// An inode as it is now.
    Node(NodeImage),
    /// The inode is gone.
    Gone {
        ino: u64,
    },
    /// An open handle.
    Open {
        fh: u64,
        ino: u64,
        read: bool,
        write: bool,
        pid: u32,
    },
    Closed {
        fh: u64,
    },
    /// Everything of the file below `pos` is in the ring (or was counted): capture resumes there.
    At {
        ino: u64,
        pos: u64,
    },
    /// The next inode and handle numbers.
    Next {
        ino: u64,
        fh: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeImage {
    pub ino: u64,
    pub parent: u64,
    pub name: Vec<u8>,
    pub dir: bool,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// atime, mtime, ctime: nanoseconds since the epoch.
    pub times: [u64; 3],
    pub lookups: u64,
    pub opens: u32,
    pub writers: u32,
    pub linked: bool,
    /// The process that made the file (its container names the file's records).
    pub creator: u32,
}

pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

pub fn time(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> io::Result<Self> {
        serde_json::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a kept entry: {e}")))
    }
}

/// A file's link to the journal: its capture position goes there.
pub struct KeptPosition {
    pub journal: Arc<Journal>,
    pub ino: u64,
}

impl KeptPosition {
    pub fn write(&self, pos: u64) {
        if let Err(e) = self.journal.append(&Entry::At { ino: self.ino, pos }.encode()) {
            tracing::warn!("cannot keep a volume file's capture position: {e}");
        }
    }
}
