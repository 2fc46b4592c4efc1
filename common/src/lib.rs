//! The one definition of what crosses between logtap's eBPF programs and user space: the
//! event layout in the BPF ring buffer, the per-target counters, the settings user space
//! resolves at load time (tracepoint field offsets, kernel struct offsets from BTF).
#![no_std]

/// Bytes of write() data carried by one event.
pub const CHUNK: usize = 4096;
/// Most chunks of one buffer (so `max_capture` is at most 64 KiB); the rest is counted as
/// truncated.
pub const MAX_CHUNKS: u32 = 16;
/// Most iovecs of one writev() followed; bytes in later iovecs are counted as truncated.
pub const MAX_IOV: u32 = 8;
/// Most watch targets at once (index of the per-target counters).
pub const MAX_TARGETS: u32 = 4096;
/// The target of writes from a cgroup that is in no watch map while `Settings::containers` is
/// on: user space decides what the cgroup is (a container, or nothing to capture).
pub const CONTAINERS_TARGET: u32 = MAX_TARGETS - 1;
/// A `WATCH_CGROUPS` value: this cgroup is not captured (user space found it is no container).
pub const TARGET_EXCLUDED: u32 = u32::MAX;
/// An `OUTPUT_PIPES` value: the pipe is the output of more than one target (each target's
/// writes to it are captured; user space names the stream).
pub const PIPE_SHARED: u32 = u32::MAX;
/// Most output pipes known at once, over all targets (`OUTPUT_PIPES` entries).
pub const MAX_OUTPUT_PIPES: u32 = 65536;

/// A data event: a piece of what one write()/writev() put into a watched pipe.
pub const EVENT_DATA: u32 = 1;
/// A watched process exited (its last partial lines end).
pub const EVENT_EXIT: u32 = 2;
/// A write ended short of what its data events announced (a writev with more iovecs than
/// are followed): `offset` is what was copied; the record ends there.
pub const EVENT_WRITE_END: u32 = 3;

/// Header of every event in the ring buffer; `len` bytes of data follow a data event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub target: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    /// Bytes of data that follow.
    pub len: u32,
    /// What the write() returned: bytes the kernel accepted.
    pub total: u64,
    /// Where this chunk starts within the write.
    pub offset: u64,
    /// The writer's cgroup v2 id (for `CONTAINERS_TARGET`: which container it is).
    pub cgroup: u64,
    /// The inode of the pipe written to: which stream it is (stdout or stderr, or another
    /// pipe) whatever fd number the write used (`echo >&2` in a shell writes through fd 1).
    pub pipe: u64,
}

pub const HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// The version of the event layout (the header, the kinds): bump it with any change to them. A
/// worker reads the events an earlier worker's programs left only if they share it.
pub const EVENT_LAYOUT: u32 = 1;

/// Counters per target, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetCounters {
    /// write()/writev() calls to a watched pipe that returned.
    pub writes: u64,
    /// Bytes those calls wrote (their return values).
    pub bytes: u64,
    /// Bytes beyond `max_capture` not copied.
    pub truncated_bytes: u64,
    /// Events the ring buffer had no room for, and their data bytes.
    pub lost_events: u64,
    pub lost_bytes: u64,
    /// Bytes written to pipes that are not the target's output (a pipeline inside a container,
    /// an `exec` session), counted and not copied.
    pub other_pipe_bytes: u64,
    /// Bytes that splice(), tee() or sendfile() moved into the target's output: they pass no
    /// user buffer that the programs could copy, so they are counted as lost.
    pub spliced_bytes: u64,
}

/// Settings user space resolves at load time: field offsets from the tracepoints' format
/// files and kernel struct offsets from BTF, so that no layout is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub enter_write_fd: u32,
    pub enter_write_buf: u32,
    pub enter_write_count: u32,
    pub enter_writev_fd: u32,
    pub enter_writev_vec: u32,
    pub enter_writev_vlen: u32,
    pub exit_write_ret: u32,
    pub exit_writev_ret: u32,
    pub enter_vmsplice_fd: u32,
    pub enter_vmsplice_iov: u32,
    pub enter_vmsplice_nr_segs: u32,
    pub exit_vmsplice_ret: u32,
    pub enter_splice_fd_out: u32,
    pub enter_tee_fdout: u32,
    pub enter_sendfile_out_fd: u32,
    pub exit_splice_ret: u32,
    pub exit_tee_ret: u32,
    pub exit_sendfile_ret: u32,
    pub fork_child_pid: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub file_f_inode: u32,
    pub inode_i_mode: u32,
    pub inode_i_ino: u32,
    /// Bytes copied per write at most.
    pub max_capture: u32,
    /// Non-zero: capture every cgroup that no watch map names, as `CONTAINERS_TARGET`.
    pub containers: u32,
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding beyond what repr(C) of u32/u64 fields gives.
unsafe impl aya::Pod for Settings {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for TargetCounters {}
