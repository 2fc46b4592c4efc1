//! Loading and attaching the eBPF programs, with this kernel's offsets filled in.

use anyhow::{bail, Context};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use logtap_common::{Settings, TargetCounters};

use super::{btf::Btf, tracefs};

/// The programs, built by build.rs from crate `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/logtap.bpf.o"));

pub struct Loaded {
    pub ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    pub pids: HashMap<MapData, u32, u32>,
    pub cgroups: HashMap<MapData, u64, u32>,
    pub counters: PerCpuArray<MapData, TargetCounters>,
    pub output_pipes: HashMap<MapData, u64, u32>,
    pub knows_pipes: Array<MapData, u32>,
    pub pids_watched: Array<MapData, u32>,
}

fn settings(max_capture: u32, containers: bool) -> anyhow::Result<Settings> {
    let btf = Btf::from_file("/sys/kernel/btf/vmlinux").context("kernel BTF is needed to find struct offsets")?;
    let root = tracefs::root()?;
    let f = |cat: &str, name: &str, field: &str| tracefs::field_offset(&root, cat, name, field);
    Ok(Settings {
        enter_write_fd: f("syscalls", "sys_enter_write", "fd")?,
        enter_write_buf: f("syscalls", "sys_enter_write", "buf")?,
        enter_write_count: f("syscalls", "sys_enter_write", "count")?,
        enter_writev_fd: f("syscalls", "sys_enter_writev", "fd")?,
        enter_writev_vec: f("syscalls", "sys_enter_writev", "vec")?,
        enter_writev_vlen: f("syscalls", "sys_enter_writev", "vlen")?,
        exit_write_ret: f("syscalls", "sys_exit_write", "ret")?,
        exit_writev_ret: f("syscalls", "sys_exit_writev", "ret")?,
        enter_vmsplice_fd: f("syscalls", "sys_enter_vmsplice", "fd")?,
        enter_vmsplice_iov: f("syscalls", "sys_enter_vmsplice", "uiov")?,
        enter_vmsplice_nr_segs: f("syscalls", "sys_enter_vmsplice", "nr_segs")?,
        exit_vmsplice_ret: f("syscalls", "sys_exit_vmsplice", "ret")?,
        enter_splice_fd_out: f("syscalls", "sys_enter_splice", "fd_out")?,
        enter_tee_fdout: f("syscalls", "sys_enter_tee", "fdout")?,
        enter_sendfile_out_fd: f("syscalls", "sys_enter_sendfile64", "out_fd")?,
        exit_splice_ret: f("syscalls", "sys_exit_splice", "ret")?,
        exit_tee_ret: f("syscalls", "sys_exit_tee", "ret")?,
        exit_sendfile_ret: f("syscalls", "sys_exit_sendfile64", "ret")?,
        fork_child_pid: f("sched", "sched_process_fork", "child_pid")?,
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdtable_fd: btf.member_offset("fdtable", "fd")?,
        file_f_inode: btf.member_offset("file", "f_inode")?,
        inode_i_mode: btf.member_offset("inode", "i_mode")?,
        inode_i_ino: btf.member_offset("inode", "i_ino")?,
        max_capture,
        containers: u32::from(containers),
    })
}

/// `containers`: also capture every cgroup no watch map names (see `CONTAINERS_TARGET`).
pub fn load(max_capture: u32, ring_buffer_bytes: u32, containers: bool) -> anyhow::Result<Loaded> {
    if OBJECT.is_empty() {
        bail!(
            "this logtap was built without its eBPF programs ({}); build it with `cargo xtask` or LOGTAP_EBPF=require",
            env!("LOGTAP_EBPF_MISSING")
        );
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("loading eBPF programs needs root");
    }
    let settings = settings(max_capture, containers)?;
    let mut ebpf = EbpfLoader::new()
        // No CO-RE relocations to do (offsets come from our own BTF reader above), so aya
        // need not parse the whole kernel BTF: that cost tens of MiB of peak memory.
        .btf(None)
        .override_global("SETTINGS", &settings, true)
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .load(OBJECT)
        .context("the kernel refused the eBPF object")?;
    for (name, category, event) in [
        ("write_enter", "syscalls", "sys_enter_write"),
        ("writev_enter", "syscalls", "sys_enter_writev"),
        ("write_exit", "syscalls", "sys_exit_write"),
        ("writev_exit", "syscalls", "sys_exit_writev"),
        ("vmsplice_enter", "syscalls", "sys_enter_vmsplice"),
        ("vmsplice_exit", "syscalls", "sys_exit_vmsplice"),
        ("splice_enter", "syscalls", "sys_enter_splice"),
        ("splice_exit", "syscalls", "sys_exit_splice"),
        ("tee_enter", "syscalls", "sys_enter_tee"),
        ("tee_exit", "syscalls", "sys_exit_tee"),
        ("sendfile_enter", "syscalls", "sys_enter_sendfile64"),
        ("sendfile_exit", "syscalls", "sys_exit_sendfile64"),
        ("process_fork", "sched", "sched_process_fork"),
        ("process_exit", "sched", "sched_process_exit"),
    ] {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing from the object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a tracepoint"))?;
        program.load().with_context(|| format!("the kernel refused program {name}"))?;
        program.attach(category, event).with_context(|| format!("cannot attach {name} to {category}/{event}"))?;
    }
    // writev_exit continues with writev_more, one iovec per run, through the JUMP table.
    let more: &mut TracePoint = ebpf
        .program_mut("writev_more")
        .context("program writev_more is missing from the object")?
        .try_into()
        .context("program writev_more is not a tracepoint")?;
    more.load().context("the kernel refused program writev_more")?;
    let more_fd =
        more.fd().context("writev_more has no fd")?.try_clone().context("duplicating the fd of writev_more")?;
    let mut jump = ProgramArray::try_from(ebpf.map_mut("JUMP").context("map JUMP is missing")?)?;
    jump.set(0, &more_fd, 0).context("filling the JUMP table")?;
    let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).with_context(|| format!("map {name} is missing"));
    let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?;
    let pids = HashMap::try_from(take(&mut ebpf, "WATCH_PIDS")?)?;
    let cgroups = HashMap::try_from(take(&mut ebpf, "WATCH_CGROUPS")?)?;
    let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
    let output_pipes = HashMap::try_from(take(&mut ebpf, "OUTPUT_PIPES")?)?;
    let knows_pipes = Array::try_from(take(&mut ebpf, "KNOWS_PIPES")?)?;
    let pids_watched = Array::try_from(take(&mut ebpf, "PIDS_WATCHED")?)?;
    Ok(Loaded { ebpf, events, pids, cgroups, counters, output_pipes, knows_pipes, pids_watched })
}
