//! Loading and attaching the eBPF programs, with this kernel's offsets filled in.
//!
//! Under a keeper, the programs' links and the maps user space reads are kept there: the
//! programs stay attached and capture into the BPF ring buffer while no worker runs, and the
//! next worker takes the maps back instead of loading anew ([`Kept`]).

use std::collections::HashMap as Fds;
use std::hash::{Hash, Hasher};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{bail, Context};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, ProgramArray};
use aya::programs::{links::FdLink, TracePoint};
use aya::{Ebpf, EbpfLoader};
use logtap_common::{Settings, TargetCounters};
use logtap_fusefs::kept::Keeper;
use tracing::{info, warn};

use super::{btf::Btf, events::Events, tracefs};

/// The programs, built by build.rs from crate `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/logtap.bpf.o"));

pub struct Loaded {
    /// The programs, attached while it lives; `None` when the keeper holds their links.
    pub ebpf: Option<Ebpf>,
    /// Whether the maps are the last worker's: the targets they name are its.
    pub resumed: bool,
    /// Whether `events` is the last worker's BPF ring buffer (the ring's mark is of it).
    pub kept_events: bool,
    /// Bytes the last worker's programs captured that were not read: they were replaced by
    /// programs of another event layout.
    pub unread_bytes: u64,
    /// What the last worker's programs captured up to when this worker's took over, to be
    /// read first (they were replaced by programs of the same event layout).
    pub earlier: Option<Events>,
    pub events: Events,
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

/// The programs' tracepoints.
const PROGRAMS: [(&str, &str, &str); 14] = [
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
];

/// The maps kept: those user space reads, and JUMP, which the kernel empties when no process
/// holds it (the programs' own reference does not count).
const MAPS: [&str; 8] =
    ["EVENTS", "WATCH_PIDS", "WATCH_CGROUPS", "COUNTERS", "OUTPUT_PIPES", "KNOWS_PIPES", "PIDS_WATCHED", "JUMP"];

/// Names under the keeper start with this.
pub const KEPT_PREFIX: &str = "bpf/";

/// What the keeper holds of the programs: the fds it handed over (those named `bpf/...`), and
/// where this worker keeps its own.
pub struct Kept {
    keeper: Arc<dyn Keeper>,
    fds: Fds<String, OwnedFd>,
    /// Every name handed over, also those taken from `fds` since.
    handed: Vec<String>,
}

impl Kept {
    pub fn new(keeper: Arc<dyn Keeper>, fds: Fds<String, OwnedFd>) -> Self {
        let handed = fds.keys().cloned().collect();
        Self { keeper, fds, handed }
    }

    /// The last worker's maps, if it kept all of them for these very programs and settings.
    fn take(&mut self, fingerprint: &str) -> Option<Fds<&'static str, OwnedFd>> {
        let name = |map: &str| format!("{KEPT_PREFIX}{fingerprint}/map/{map}");
        let links =
            PROGRAMS.iter().all(|(p, ..)| self.fds.contains_key(&format!("{KEPT_PREFIX}{fingerprint}/link/{p}")));
        if !links || !MAPS.iter().all(|m| self.fds.contains_key(&name(m))) {
            return None;
        }
        MAPS.iter().map(|m| Some((*m, self.fds.remove(&name(m))?))).collect()
    }

    /// The maps of other programs or settings than `fingerprint`'s, kept whole, with their
    /// fingerprint.
    fn take_other(&mut self, fingerprint: &str) -> Option<(String, Fds<&'static str, OwnedFd>)> {
        let others: std::collections::BTreeSet<String> = self
            .fds
            .keys()
            .filter_map(|n| n.strip_prefix(KEPT_PREFIX)?.split_once('/').map(|(f, _)| f.to_string()))
            .filter(|f| f != fingerprint)
            .collect();
        others.into_iter().find_map(|f| Some((f.clone(), self.take(&f)?)))
    }

    /// Lets go of what an earlier worker kept that this one does not use (other programs or
    /// settings, or none: their programs detach). True if there was any.
    fn release_others(&self, fingerprint: Option<&str>) -> bool {
        let mine = fingerprint.map(|f| format!("{KEPT_PREFIX}{f}/"));
        let others: Vec<&String> =
            self.handed.iter().filter(|n| mine.as_ref().is_none_or(|m| !n.starts_with(m.as_str()))).collect();
        for name in &others {
            self.keeper.release(name);
        }
        !others.is_empty()
    }

    /// Pipe capture is off now: the last worker's programs go.
    pub fn release(self) {
        self.release_others(None);
    }

    fn keep(&self, name: String, fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()> {
        self.keeper.keep(&name, fd).with_context(|| format!("the keeper did not take {name}"))
    }
}

/// Names the programs and their settings: a kept set is reused only by a worker that would load
/// the same.
fn fingerprint(settings: &Settings, ring_buffer_bytes: u32) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    OBJECT.hash(&mut h);
    format!("{settings:?}").hash(&mut h);
    ring_buffer_bytes.hash(&mut h);
    format!("e{}-{:016x}", logtap_common::EVENT_LAYOUT, h.finish())
}

/// A new fd for a link (aya's `FdLink` does not lend its own).
fn link_fd(link: &FdLink) -> anyhow::Result<OwnedFd> {
    let id = link.info().context("reading a link's id")?.id();
    // bpf_attr for BPF_LINK_GET_FD_BY_ID: link_id, next_id, open_flags.
    let attr: [u32; 3] = [id, 0, 0];
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    // SAFETY: the attr is valid for its size; the kernel returns a new fd or -1.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_LINK_GET_FD_BY_ID");
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn events(map: Map) -> anyhow::Result<Events> {
    match map {
        Map::RingBuf(data) => Events::new(data),
        _ => bail!("map EVENTS is no ring buffer"),
    }
}

fn map_of(fd: OwnedFd, name: &str) -> anyhow::Result<Map> {
    let data = MapData::from_fd(fd).with_context(|| format!("the kept map {name}"))?;
    Map::from_map_data(data).with_context(|| format!("the kept map {name}"))
}

/// `containers`: also capture every cgroup no watch map names (see `CONTAINERS_TARGET`).
/// `kept`: what the keeper holds of an earlier worker's programs, and where to keep this one's.
pub fn load(max_capture: u32, ring_buffer_bytes: u32, containers: bool, kept: Option<Kept>) -> anyhow::Result<Loaded> {
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
    let fingerprint = fingerprint(&settings, ring_buffer_bytes);
    let mut kept = kept;
    if let Some(k) = kept.as_mut() {
        if let Some(maps) = k.take(&fingerprint) {
            let loaded = from_kept(maps)?;
            k.release_others(Some(&fingerprint));
            info!("the eBPF programs kept attached by the keeper are taken over");
            return Ok(loaded);
        }
    }
    // Other programs or settings than the last worker's: its watch maps are copied into the
    // new programs' before they attach, and what its programs captured up to then is read first.
    let last = kept.as_mut().and_then(|k| k.take_other(&fingerprint)).map(|(f, maps)| (f, from_kept(maps)));
    let last = match last {
        Some((f, Ok(old))) => Some((f, old)),
        Some((_, Err(e))) => {
            warn!("the last worker's eBPF maps cannot be read (its targets are watched again from their definitions): {e:#}");
            None
        }
        None => None,
    };
    let mut ebpf = EbpfLoader::new()
        // No CO-RE relocations to do (offsets come from our own BTF reader above), so aya
        // need not parse the whole kernel BTF: that cost tens of MiB of peak memory.
        .btf(None)
        .override_global("SETTINGS", &settings, true)
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .load(OBJECT)
        .context("the kernel refused the eBPF object")?;
    // From where the old buffer is now until all are attached, both workers' programs may
    // capture a write.
    let last = last.map(|(f, old)| {
        let copied = copy_watch(&old, &mut ebpf);
        let from = old.events.head();
        (f, old, copied, from)
    });
    let mut links = Vec::new();
    for (name, category, event) in PROGRAMS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing from the object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a tracepoint"))?;
        program.load().with_context(|| format!("the kernel refused program {name}"))?;
        let link =
            program.attach(category, event).with_context(|| format!("cannot attach {name} to {category}/{event}"))?;
        if kept.is_some() {
            let link = FdLink::try_from(program.take_link(link)?).with_context(|| format!("the link of {name}"))?;
            links.push((name, link_fd(&link)?));
        }
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
    let events = events(ebpf.take_map("EVENTS").context("map EVENTS is missing")?)?;
    // Where each buffer is once all are attached: the old one is read up to here, the new one
    // holds what both captured before its own mark.
    let (old_until, new_until) = (last.as_ref().map(|(_, old, ..)| old.events.head()), events.head());
    if let Some(k) = &kept {
        // Links last: a set is reused only when it is whole.
        for name in MAPS {
            if name == "EVENTS" {
                k.keep(format!("{KEPT_PREFIX}{fingerprint}/map/{name}"), events.fd())?;
                continue;
            }
            let fd = ebpf.map(name).with_context(|| format!("map {name} is missing"))?;
            let fd = match fd {
                Map::RingBuf(d) | Map::HashMap(d) | Map::PerCpuArray(d) | Map::Array(d) | Map::ProgramArray(d) => {
                    d.fd().as_fd()
                }
                _ => bail!("map {name} is of an unexpected type"),
            };
            k.keep(format!("{KEPT_PREFIX}{fingerprint}/map/{name}"), fd)?;
        }
        for (name, fd) in &links {
            k.keep(format!("{KEPT_PREFIX}{fingerprint}/link/{name}"), fd.as_fd())?;
        }
    }
    let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).with_context(|| format!("map {name} is missing"));
    let mut loaded = Loaded {
        events,
        pids: HashMap::try_from(take(&mut ebpf, "WATCH_PIDS")?)?,
        cgroups: HashMap::try_from(take(&mut ebpf, "WATCH_CGROUPS")?)?,
        counters: PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?,
        output_pipes: HashMap::try_from(take(&mut ebpf, "OUTPUT_PIPES")?)?,
        knows_pipes: Array::try_from(take(&mut ebpf, "KNOWS_PIPES")?)?,
        pids_watched: Array::try_from(take(&mut ebpf, "PIDS_WATCHED")?)?,
        ebpf: Some(ebpf),
        resumed: false,
        kept_events: false,
        unread_bytes: 0,
        earlier: None,
    };
    if let (Some((theirs, old, copied, from)), Some(old_until)) = (last, old_until) {
        match copied {
            Ok(()) if layout(&theirs) == layout(&fingerprint) => {
                loaded.resumed = true;
                loaded.earlier = Some(old.events.replaced(from, old_until));
                loaded.events.drop_copies_before(new_until);
                info!("other eBPF programs or settings than the last worker's: loaded anew with its watch maps; its events are read first");
            }
            Ok(()) => {
                loaded.resumed = true;
                loaded.unread_bytes = old.events.unread() as u64;
                warn!(
                    unread_bytes = loaded.unread_bytes,
                    "the last worker's eBPF programs had another event layout: loaded anew with its watch maps; \
                     what the old ones captured while no worker ran is not read"
                );
            }
            Err(e) => warn!("the last worker's watch maps cannot be copied (its targets are watched again from their definitions): {e:#}"),
        }
    }
    if let Some(k) = &kept {
        k.release_others(Some(&fingerprint));
    }
    Ok(loaded)
}

/// The maps a worker kept.
fn from_kept(mut maps: Fds<&'static str, OwnedFd>) -> anyhow::Result<Loaded> {
    let mut take = |name: &str| maps.remove(name).context(name.to_string()).and_then(|fd| map_of(fd, name));
    Ok(Loaded {
        ebpf: None,
        resumed: true,
        kept_events: true,
        earlier: None,
        unread_bytes: 0,
        events: events(take("EVENTS")?)?,
        pids: HashMap::try_from(take("WATCH_PIDS")?)?,
        cgroups: HashMap::try_from(take("WATCH_CGROUPS")?)?,
        counters: PerCpuArray::try_from(take("COUNTERS")?)?,
        output_pipes: HashMap::try_from(take("OUTPUT_PIPES")?)?,
        knows_pipes: Array::try_from(take("KNOWS_PIPES")?)?,
        pids_watched: Array::try_from(take("PIDS_WATCHED")?)?,
    })
}

/// Copies the targets of `old`'s maps into the maps of programs loaded but not attached yet
/// (the types are checked: a map whose key or value changed size is refused).
fn copy_watch(old: &Loaded, ebpf: &mut Ebpf) -> anyhow::Result<()> {
    fn to<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Map> {
        ebpf.map_mut(name).with_context(|| format!("map {name} is missing"))
    }
    let mut pipes: HashMap<_, u64, u32> = HashMap::try_from(to(ebpf, "OUTPUT_PIPES")?)?;
    for (k, v) in old.output_pipes.iter().filter_map(Result::ok) {
        pipes.insert(k, v, 0).context("copying OUTPUT_PIPES")?;
    }
    let mut knows: Array<_, u32> = Array::try_from(to(ebpf, "KNOWS_PIPES")?)?;
    for slot in 0..logtap_common::MAX_TARGETS {
        knows.set(slot, old.knows_pipes.get(&slot, 0)?, 0).context("copying KNOWS_PIPES")?;
    }
    let mut counters: PerCpuArray<_, TargetCounters> = PerCpuArray::try_from(to(ebpf, "COUNTERS")?)?;
    for slot in 0..logtap_common::MAX_TARGETS {
        counters.set(slot, old.counters.get(&slot, 0)?, 0).context("copying COUNTERS")?;
    }
    let mut pids: HashMap<_, u32, u32> = HashMap::try_from(to(ebpf, "WATCH_PIDS")?)?;
    for (k, v) in old.pids.iter().filter_map(Result::ok) {
        pids.insert(k, v, 0).context("copying WATCH_PIDS")?;
    }
    let mut cgroups: HashMap<_, u64, u32> = HashMap::try_from(to(ebpf, "WATCH_CGROUPS")?)?;
    for (k, v) in old.cgroups.iter().filter_map(Result::ok) {
        cgroups.insert(k, v, 0).context("copying WATCH_CGROUPS")?;
    }
    let mut watched: Array<_, u32> = Array::try_from(to(ebpf, "PIDS_WATCHED")?)?;
    watched.set(0, old.pids_watched.get(&0, 0)?, 0).context("copying PIDS_WATCHED")?;
    Ok(())
}

/// The event layout a fingerprint names.
fn layout(fingerprint: &str) -> &str {
    fingerprint.split_once('-').map_or("", |(l, _)| l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Released(Mutex<Vec<String>>);

    impl Keeper for Released {
        fn keep(&self, _: &str, _: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
            Ok(())
        }
        fn release(&self, name: &str) {
            self.0.lock().unwrap().push(name.to_string());
        }
    }

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn a_kept_set_is_taken_only_whole_and_the_others_are_let_go() {
        let released = Arc::new(Released::default());
        let mut fds = Fds::new();
        for (p, ..) in PROGRAMS {
            fds.insert(format!("bpf/old/link/{p}"), fd());
        }
        for m in MAPS {
            fds.insert(format!("bpf/old/map/{m}"), fd());
            // A worker killed while it kept its set: maps, no links yet.
            fds.insert(format!("bpf/torn/map/{m}"), fd());
        }
        let mut kept = Kept::new(released.clone(), fds);
        assert!(kept.take("new").is_none());
        assert!(kept.take("torn").is_none(), "a set without its links is not reused");
        let (fingerprint, old) = kept.take_other("new").expect("the whole set of other settings");
        assert_eq!((fingerprint.as_str(), old.len()), ("old", MAPS.len()));
        assert!(kept.release_others(Some("new")));
        let mut let_go = released.0.lock().unwrap().clone();
        let_go.sort();
        // The old set's maps too, though taken to be copied.
        let mut want: Vec<String> = PROGRAMS.iter().map(|(p, ..)| format!("bpf/old/link/{p}")).collect();
        want.extend(MAPS.iter().flat_map(|m| [format!("bpf/old/map/{m}"), format!("bpf/torn/map/{m}")]));
        want.sort();
        assert_eq!(let_go, want);
    }
}
