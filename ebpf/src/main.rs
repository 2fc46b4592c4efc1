//! logtap's eBPF programs: capture what watched processes write to their stdout/stderr pipes,
//! counting only bytes the kernel accepted.
//!
//! A write is a target's output when it reaches one of the target's output pipes, whatever the
//! fd number (`/dev/stdout` reopened, `exec 3>&1`, nginx's access log linked to stdout): the
//! pipe's inode decides (`OUTPUT_PIPES`, filled by user space). A target whose pipes user space
//! does not know (its fds 1/2 were no pipes when it was watched) has its fd 1/2 pipe writes
//! taken as output. Writes to other pipes are counted, not copied.
//!
//! `sys_enter_write[v]` notes a candidate call per thread; `sys_exit_write[v]` copies the bytes
//! the call returned (up to `max_capture`) into the ring buffer in chunks. vmsplice() is copied
//! as a writev(); splice(), tee() and sendfile() into an output pipe carry no user buffer and
//! are counted. Processes are watched by cgroup v2 id or by tgid; children are followed at fork
//! and forgotten at exit. With `containers` on, every cgroup no map names is captured too, as
//! `CONTAINERS_TARGET`, until user space says what it is: so a container's first write is never
//! missed. Every offset (tracepoint fields, kernel structs) comes from user space at load time.
#![no_std]
#![no_main]

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel,
    bpf_probe_read_user, bpf_probe_read_user_buf,
};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf};
use aya_ebpf::programs::TracePointContext;
use logtap_common::{
    EventHeader, Settings, TargetCounters, CHUNK, CONTAINERS_TARGET, EVENT_DATA, EVENT_EXIT, EVENT_WRITE_END, HEADER_LEN,
    MAX_CHUNKS, MAX_IOV, MAX_OUTPUT_PIPES, MAX_TARGETS, PIPE_SHARED, TARGET_EXCLUDED,
};

/// Filled in by user space before load.
#[no_mangle]
static SETTINGS: Settings = Settings {
    enter_write_fd: 0,
    enter_write_buf: 0,
    enter_write_count: 0,
    enter_writev_fd: 0,
    enter_writev_vec: 0,
    enter_writev_vlen: 0,
    exit_write_ret: 0,
    exit_writev_ret: 0,
    enter_vmsplice_fd: 0,
    enter_vmsplice_iov: 0,
    enter_vmsplice_nr_segs: 0,
    exit_vmsplice_ret: 0,
    enter_splice_fd_out: 0,
    enter_tee_fdout: 0,
    enter_sendfile_out_fd: 0,
    exit_splice_ret: 0,
    exit_tee_ret: 0,
    exit_sendfile_ret: 0,
    fork_child_pid: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    file_f_inode: 0,
    inode_i_mode: 0,
    inode_i_ino: 0,
    max_capture: 0,
    containers: 0,
};

/// Watched processes: tgid (and tids of their threads, until they exit) -> target.
#[map]
static WATCH_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);
/// Non-zero while some target is a process: until then no write pays a `WATCH_PIDS` lookup
/// (an array load costs far less than a hash lookup, and every write on the host makes it).
#[map]
static PIDS_WATCHED: Array<u32> = Array::with_max_entries(1, 0);
/// Watched cgroup v2 ids -> target, or `TARGET_EXCLUDED` (user space found no container there).
#[map]
static WATCH_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(65536, 0);

/// The pipes that are targets' stdout or stderr: pipe inode -> target slot, or `PIPE_SHARED`.
#[map]
static OUTPUT_PIPES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_OUTPUT_PIPES, 0);
/// Per target slot: non-zero when `OUTPUT_PIPES` holds its output pipes.
#[map]
static KNOWS_PIPES: Array<u32> = Array::with_max_entries(MAX_TARGETS, 0);

const KIND_WRITE: u32 = 1;
const KIND_WRITEV: u32 = 2;
const KIND_VMSPLICE: u32 = 3;
/// splice(), tee(), sendfile(): counted, nothing to copy.
const KIND_MOVE: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    kind: u32,
    target: u32,
    fd: u32,
    /// Non-zero: the pipe is the target's output (copied); zero: another pipe (counted).
    output: u32,
    /// The buffer (write) or the iovec array (writev).
    ptr: u64,
    /// count or vlen.
    n: u64,
    cgroup: u64,
    /// The pipe's inode.
    pipe: u64,
}

/// A call in flight, per thread (pid_tgid).
#[map]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(16384, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// Ring buffer flags (uapi `BPF_RB_*`).
const RB_AVAIL_DATA: u64 = 0;
const RB_NO_WAKEUP: u64 = 1;
const RB_FORCE_WAKEUP: u64 = 2;
/// User space is woken once this much is waiting; below it, its own timer collects the events.
/// A wakeup per small write would cost more than the capture itself.
const WAKEUP_BYTES: u64 = 1 << 20;

#[inline(always)]
fn wakeup() -> u64 {
    if EVENTS.query(RB_AVAIL_DATA) >= WAKEUP_BYTES {
        RB_FORCE_WAKEUP
    } else {
        RB_NO_WAKEUP
    }
}

#[map]
static COUNTERS: PerCpuArray<TargetCounters> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// An event being assembled: header and data, too big for the stack.
#[repr(C)]
struct Scratch {
    header: EventHeader,
    data: [u8; 2 * CHUNK],
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

const S_IFMT: u16 = 0o170000;
const S_IFIFO: u16 = 0o010000;

#[inline(always)]
fn settings() -> Settings {
    // SAFETY: a global that user space rewrites before load; volatile so it is not folded.
    unsafe { core::ptr::read_volatile(&SETTINGS) }
}

#[inline(always)]
fn counters(target: u32) -> Option<&'static mut TargetCounters> {
    // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
    COUNTERS.get_ptr_mut(target).map(|p| unsafe { &mut *p })
}

/// The watch target of the current process, if any, and its cgroup.
#[inline(always)]
fn watched() -> Option<(u32, u64)> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if PIDS_WATCHED.get(0).is_some_and(|w| *w != 0) {
        // SAFETY: map lookups return pointers valid for the program's run.
        if let Some(t) = unsafe { WATCH_PIDS.get(&tgid) } {
            return Some((*t, cgroup));
        }
    }
    match unsafe { WATCH_CGROUPS.get(&cgroup) }.copied() {
        Some(TARGET_EXCLUDED) => None,
        Some(t) => Some((t, cgroup)),
        None if settings().containers != 0 => Some((CONTAINERS_TARGET, cgroup)),
        None => None,
    }
}

/// The inode number of `fd` of the current task if it is a pipe or FIFO:
/// task->files->fdt->fd[fd]->f_inode->{i_mode,i_ino}, with offsets from BTF.
#[inline(always)]
fn pipe_of(s: &Settings, fd: u32) -> Option<u64> {
    // SAFETY: every pointer is read with bpf_probe_read_kernel, which fails safely.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files = bpf_probe_read_kernel(task.add(s.task_files as usize) as *const *const u8).ok()?;
        let fdt = bpf_probe_read_kernel(files.add(s.files_fdt as usize) as *const *const u8).ok()?;
        let fds = bpf_probe_read_kernel(fdt.add(s.fdtable_fd as usize) as *const *const *const u8).ok()?;
        let file = bpf_probe_read_kernel(fds.add(fd as usize)).ok()?;
        if file.is_null() {
            return None;
        }
        let inode = bpf_probe_read_kernel(file.add(s.file_f_inode as usize) as *const *const u8).ok()?;
        let mode = bpf_probe_read_kernel(inode.add(s.inode_i_mode as usize) as *const u16).ok()?;
        if mode & S_IFMT != S_IFIFO {
            return None;
        }
        bpf_probe_read_kernel(inode.add(s.inode_i_ino as usize) as *const u64).ok()
    }
}

/// Whether `target`'s write to `pipe` through `fd` is its output.
#[inline(always)]
fn is_output(target: u32, pipe: u64, fd: u32) -> bool {
    if target == CONTAINERS_TARGET {
        // Which container it is, and so which pipes are its output, user space finds out.
        return true;
    }
    if !KNOWS_PIPES.get(target).is_some_and(|k| *k != 0) {
        return fd == 1 || fd == 2;
    }
    // SAFETY: map lookup.
    matches!(unsafe { OUTPUT_PIPES.get(&pipe) }.copied(), Some(t) if t == target || t == PIPE_SHARED)
}

/// Notes a call of a watched process to a pipe: `ptr_n` are the offsets of the buffer (or
/// iovec array) and its length, for calls whose bytes are copied.
#[inline(always)]
fn enter(ctx: &TracePointContext, kind: u32, fd_at: u32, ptr_n: Option<(u32, u32)>) -> Result<(), i64> {
    // Who writes first: most writes on a host are by processes no target watches.
    let Some((target, cgroup)) = watched() else { return Ok(()) };
    // SAFETY: offsets come from the tracepoint's format file.
    let fd: u64 = unsafe { ctx.read_at(fd_at as usize) }.map_err(|e| e as i64)?;
    let fd = fd as u32;
    let s = settings();
    let Some(pipe) = pipe_of(&s, fd) else { return Ok(()) };
    let output = u32::from(is_output(target, pipe, fd));
    let (ptr, n) = match ptr_n {
        // SAFETY: as above.
        Some((ptr_at, n_at)) => unsafe {
            (ctx.read_at::<u64>(ptr_at as usize).map_err(|e| e as i64)?, ctx.read_at::<u64>(n_at as usize).map_err(|e| e as i64)?)
        },
        None => (0, 0),
    };
    let p = Pending { kind, target, fd, output, ptr, n, cgroup, pipe };
    PENDING.insert(&bpf_get_current_pid_tgid(), &p, 0)?;
    Ok(())
}

/// Losses of one call, added to the target's counters at the end.
#[derive(Default)]
struct Loss {
    events: u64,
    bytes: u64,
}

/// Copies `len` bytes at user address `base` into the ring buffer, as chunks whose offsets in
/// the write start at `start`. Returns the bytes copied. Offsets inside the loop are constants
/// per iteration, which keeps the verifier's work small.
#[inline(always)]
fn emit_segment(scratch: &mut Scratch, p: &Pending, total: u64, base: u64, len: u64, start: u64, loss: &mut Loss) -> u64 {
    let id = bpf_get_current_pid_tgid();
    let mut copied = 0;
    for i in 0..MAX_CHUNKS {
        let off = i as u64 * CHUNK as u64;
        if off >= len {
            break;
        }
        let mut n = len - off;
        if n > CHUNK as u64 {
            n = CHUNK as u64;
        }
        // A bound the verifier can see: at most 2*CHUNK - 1, within `data`.
        let n = (n as usize) & (2 * CHUNK - 1);
        scratch.header = EventHeader {
            kind: EVENT_DATA,
            target: p.target,
            tgid: (id >> 32) as u32,
            tid: id as u32,
            fd: p.fd,
            len: n as u32,
            total,
            offset: start + off,
            cgroup: p.cgroup,
            pipe: p.pipe,
        };
        // SAFETY: user memory read through the helper into our buffer.
        if unsafe { bpf_probe_read_user_buf((base + off) as *const u8, &mut scratch.data[..n]) }.is_err() {
            break;
        }
        // SAFETY: header and data are contiguous in the repr(C) struct.
        let bytes = unsafe { core::slice::from_raw_parts(scratch as *const Scratch as *const u8, HEADER_LEN + n) };
        if EVENTS.output::<[u8]>(bytes, wakeup()).is_err() {
            loss.events += 1;
            loss.bytes += n as u64;
        }
        copied += n as u64;
    }
    copied
}

/// The call in flight for this thread, if it is of `kind` and wrote something, with what it
/// returned.
#[inline(always)]
fn finished(ctx: &TracePointContext, kind: u32, ret_at: u32) -> Option<(Pending, u64)> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: map lookup.
    let p = unsafe { PENDING.get(&id) }.copied()?;
    let _ = PENDING.remove(&id);
    if p.kind != kind {
        return None;
    }
    // SAFETY: offset from the tracepoint's format file.
    let ret: i64 = unsafe { ctx.read_at(ret_at as usize) }.ok()?;
    if ret <= 0 {
        // EAGAIN, EINTR, EPIPE...: nothing was written.
        return None;
    }
    Some((p, ret as u64))
}

/// A finished call to a pipe that is not the target's output is counted here, and nothing of
/// it is copied.
#[inline(always)]
fn counted_as_other(p: &Pending, total: u64) -> bool {
    if p.output != 0 {
        return false;
    }
    if let Some(c) = counters(p.target) {
        c.other_pipe_bytes += total;
    }
    true
}

/// Of a finished write to the target's output, the bytes to copy.
#[inline(always)]
fn to_copy(p: &Pending, total: u64) -> Option<u64> {
    if counted_as_other(p, total) {
        return None;
    }
    let max = settings().max_capture as u64;
    Some(if total > max { max } else { total })
}

#[inline(always)]
fn account(p: &Pending, total: u64, sent: u64, loss: &Loss) {
    if let Some(c) = counters(p.target) {
        c.writes += 1;
        c.bytes += total;
        c.truncated_bytes += total - sent;
        c.lost_events += loss.events;
        c.lost_bytes += loss.bytes;
    }
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU map value, ours for the program's run.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[tracepoint]
pub fn write_enter(ctx: TracePointContext) -> u32 {
    let s = settings();
    let _ = enter(&ctx, KIND_WRITE, s.enter_write_fd, Some((s.enter_write_buf, s.enter_write_count)));
    0
}

#[tracepoint]
pub fn writev_enter(ctx: TracePointContext) -> u32 {
    let s = settings();
    let _ = enter(&ctx, KIND_WRITEV, s.enter_writev_fd, Some((s.enter_writev_vec, s.enter_writev_vlen)));
    0
}

/// vmsplice() into a pipe takes an iovec array from user memory, as writev() does.
#[tracepoint]
pub fn vmsplice_enter(ctx: TracePointContext) -> u32 {
    let s = settings();
    let _ = enter(&ctx, KIND_VMSPLICE, s.enter_vmsplice_fd, Some((s.enter_vmsplice_iov, s.enter_vmsplice_nr_segs)));
    0
}

#[tracepoint]
pub fn splice_enter(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, KIND_MOVE, settings().enter_splice_fd_out, None);
    0
}

#[tracepoint]
pub fn tee_enter(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, KIND_MOVE, settings().enter_tee_fdout, None);
    0
}

#[tracepoint]
pub fn sendfile_enter(ctx: TracePointContext) -> u32 {
    let _ = enter(&ctx, KIND_MOVE, settings().enter_sendfile_out_fd, None);
    0
}

/// Bytes moved into a pipe by splice(), tee() or sendfile(): counted, as there is no user
/// buffer to copy them from.
#[inline(always)]
fn moved(ctx: &TracePointContext, ret_at: u32) {
    let Some((p, total)) = finished(ctx, KIND_MOVE, ret_at) else { return };
    if counted_as_other(&p, total) {
        return;
    }
    if let Some(c) = counters(p.target) {
        c.writes += 1;
        c.bytes += total;
        c.spliced_bytes += total;
    }
}

#[tracepoint]
pub fn splice_exit(ctx: TracePointContext) -> u32 {
    moved(&ctx, settings().exit_splice_ret);
    0
}

#[tracepoint]
pub fn tee_exit(ctx: TracePointContext) -> u32 {
    moved(&ctx, settings().exit_tee_ret);
    0
}

#[tracepoint]
pub fn sendfile_exit(ctx: TracePointContext) -> u32 {
    moved(&ctx, settings().exit_sendfile_ret);
    0
}

#[tracepoint]
pub fn write_exit(ctx: TracePointContext) -> u32 {
    let Some((p, total)) = finished(&ctx, KIND_WRITE, settings().exit_write_ret) else { return 0 };
    let Some(want) = to_copy(&p, total) else { return 0 };
    let Some(scratch) = scratch() else { return 0 };
    let mut loss = Loss::default();
    let sent = emit_segment(scratch, &p, total, p.ptr, want, 0, &mut loss);
    account(&p, total, sent, &loss);
    0
}

/// A writev() being copied: one iovec per program run, the next run reached by a tail call,
/// so that each run is as simple for the verifier as a write().
#[repr(C)]
#[derive(Clone, Copy)]
struct Writev {
    p: Pending,
    total: u64,
    want: u64,
    sent: u64,
    next: u64,
    lost_events: u64,
    lost_bytes: u64,
}

#[map]
static WRITEV: PerCpuArray<Writev> = PerCpuArray::with_max_entries(1, 0);
/// Slot 0: `writev_more`, set by user space.
#[map]
static JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[inline(always)]
fn writev_step(ctx: &TracePointContext) {
    let (Some(st), Some(scratch)) = (WRITEV.get_ptr_mut(0), scratch()) else { return };
    // SAFETY: per-CPU map value, ours for the program's run (tail calls stay on this CPU).
    let st = unsafe { &mut *st };
    if st.sent < st.want && st.next < st.p.n && st.next < MAX_IOV as u64 {
        // SAFETY: user memory read through the helper.
        let iov = unsafe { bpf_probe_read_user((st.p.ptr as *const Iovec).wrapping_add(st.next as usize)) };
        if let Ok(iov) = iov {
            let mut len = st.want - st.sent;
            if len > iov.len {
                len = iov.len;
            }
            let mut loss = Loss::default();
            st.sent += emit_segment(scratch, &st.p, st.total, iov.base, len, st.sent, &mut loss);
            st.lost_events += loss.events;
            st.lost_bytes += loss.bytes;
            st.next += 1;
            if st.sent < st.want && st.next < st.p.n && st.next < MAX_IOV as u64 {
                // SAFETY: a tail call into our own program; it does not return when it succeeds.
                unsafe { JUMP.tail_call(ctx, 0) };
            }
        }
    }
    if st.sent < st.want {
        // User space waits for `want` bytes: tell it the write ends here.
        let id = bpf_get_current_pid_tgid();
        if let Some(mut e) = EVENTS.reserve::<EventHeader>(0) {
            e.write(EventHeader {
                kind: EVENT_WRITE_END,
                target: st.p.target,
                tgid: (id >> 32) as u32,
                tid: id as u32,
                fd: st.p.fd,
                len: 0,
                total: st.total,
                offset: st.sent,
                cgroup: st.p.cgroup,
                pipe: st.p.pipe,
            });
            e.submit(wakeup());
        } else {
            st.lost_events += 1;
        }
    }
    account(&st.p, st.total, st.sent, &Loss { events: st.lost_events, bytes: st.lost_bytes });
}

/// A finished writev() or vmsplice(): its iovecs are copied one per program run.
#[inline(always)]
fn iovecs_exit(ctx: &TracePointContext, kind: u32, ret_at: u32) {
    let Some((p, total)) = finished(ctx, kind, ret_at) else { return };
    let Some(want) = to_copy(&p, total) else { return };
    let Some(st) = WRITEV.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU map value, ours for the program's run.
    unsafe { *st = Writev { p, total, want, sent: 0, next: 0, lost_events: 0, lost_bytes: 0 } };
    writev_step(ctx);
}

#[tracepoint]
pub fn writev_exit(ctx: TracePointContext) -> u32 {
    iovecs_exit(&ctx, KIND_WRITEV, settings().exit_writev_ret);
    0
}

#[tracepoint]
pub fn vmsplice_exit(ctx: TracePointContext) -> u32 {
    iovecs_exit(&ctx, KIND_VMSPLICE, settings().exit_vmsplice_ret);
    0
}

/// The next iovec of a writev(); reached only by tail call from `writev_exit`.
#[tracepoint]
pub fn writev_more(ctx: TracePointContext) -> u32 {
    writev_step(&ctx);
    0
}

/// A watched process's children (and threads) are watched too.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: map lookup.
    if let Some(target) = unsafe { WATCH_PIDS.get(&tgid) }.copied() {
        // SAFETY: offset from the tracepoint's format file.
        if let Ok(child) = unsafe { ctx.read_at::<u32>(settings().fork_child_pid as usize) } {
            let _ = WATCH_PIDS.insert(&child, &target, 0);
        }
    }
    0
}

/// A watched task exits: forget it; a whole process tells user space to end its lines.
#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let _ = PENDING.remove(&id);
    let target = match unsafe { WATCH_PIDS.get(&tid) }.copied() {
        Some(t) => {
            let _ = WATCH_PIDS.remove(&tid);
            // SAFETY: helper without arguments.
            Some((t, unsafe { bpf_get_current_cgroup_id() }))
        }
        None => watched(),
    };
    if let (Some((target, cgroup)), true) = (target, tgid == tid) {
        if let Some(mut e) = EVENTS.reserve::<EventHeader>(0) {
            e.write(EventHeader { kind: EVENT_EXIT, target, tgid, tid, fd: 0, len: 0, total: 0, offset: 0, cgroup, pipe: 0 });
            e.submit(wakeup());
        }
    }
    let _ = ctx;
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
