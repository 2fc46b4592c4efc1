//! cgroup v2 ids and paths: which directory a writer's cgroup id is, and whether that directory
//! is a container's (`libpod-<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`, `<id>`).
//! This is how a write is known to be a container's before the runtime has said a word.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` (unified) or
/// `/sys/fs/cgroup/unified` (hybrid), read from this process's mount table.
pub fn v2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    v2_root_in(&mounts).context("no cgroup2 filesystem is mounted")
}

fn v2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The cgroup v2 id of a directory: its inode number.
pub fn id_of(path: &Path) -> anyhow::Result<u64> {
    let m = std::fs::metadata(path).with_context(|| format!("no cgroup at {}", path.display()))?;
    if !m.is_dir() {
        bail!("{} is not a cgroup directory", path.display());
    }
    Ok(m.ino())
}

/// The cgroup v2 id of this process (so that the agent never captures its own output).
pub fn own_id(root: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).context("this process has no cgroup v2 entry")?;
    id_of(&root.join(rel.trim_start_matches('/')))
}

/// The container a process runs in, from its cgroup path.
pub fn container_of_process(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // HIERARCHY:CONTROLLERS:PATH; any hierarchy names the container's cgroup.
    text.lines().find_map(|l| l.splitn(3, ':').nth(2).and_then(container_id))
}

/// Paths of cgroups by id. Built by walking the hierarchy, walked again when an id is missing
/// (a cgroup made since); a cgroup removed before it is looked up is not found.
pub struct Index {
    root: PathBuf,
    by_id: HashMap<u64, String>,
}

/// cgroups deeper than this are not walked (containers sit 1 to 5 levels down).
const MAX_DEPTH: usize = 8;

impl Index {
    pub fn new(root: PathBuf) -> Self {
        Self { root, by_id: HashMap::new() }
    }

    /// The path of cgroup `id` relative to the root (`/` separated, no leading slash).
    pub fn path_of(&mut self, id: u64) -> Option<&str> {
        if !self.by_id.contains_key(&id) {
            self.walk();
        }
        self.by_id.get(&id).map(String::as_str)
    }

    /// The ids of every cgroup that exists now (after a fresh walk).
    pub fn live_ids(&mut self) -> std::collections::HashSet<u64> {
        self.walk();
        self.by_id.keys().copied().collect()
    }

    /// The process of cgroup `rel` that is pid 1 of its pid namespace: a container's init,
    /// whose stdout and stderr are the runtime's log pipes.
    pub fn init_process(&self, rel: &str) -> Option<u32> {
        let procs = std::fs::read_to_string(self.root.join(rel).join("cgroup.procs")).ok()?;
        procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).find(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status.lines().find_map(|l| l.strip_prefix("NSpid:")).and_then(|ids| ids.split_whitespace().last())
                == Some("1")
        })
    }

    fn walk(&mut self) {
        self.by_id.clear();
        let mut stack = vec![(self.root.clone(), String::new(), 0)];
        while let Some((dir, rel, depth)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            self.by_id.insert(meta.ino(), rel.clone());
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                    stack.push((e.path(), child, depth + 1));
                }
            }
        }
    }
}

/// The container id a cgroup path names: the deepest component holding a run of exactly 64
/// hex digits (`libpod-<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`, `<id>`).
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        let bytes = component.as_bytes();
        let mut run = 0;
        for (i, b) in bytes.iter().enumerate() {
            if b.is_ascii_hexdigit() && !b.is_ascii_uppercase() {
                run += 1;
                continue;
            }
            if run == 64 {
                return Some(component[i - 64..i].to_string());
            }
            run = 0;
        }
        (run == 64).then(|| component[bytes.len() - 64..].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "44d2417d27a0f3c19b531e23f54916f56acab3305528dd416bfda548840cf7c8";

    #[test]
    fn container_ids_from_runtime_layouts() {
        for path in [
            format!("libpod_parent/libpod-{ID}"),
            format!("machine.slice/libpod-{ID}.scope"),
            format!("machine.slice/libpod-{ID}.scope/container"),
            format!("system.slice/docker-{ID}.scope"),
            format!("docker/{ID}"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        for path in ["", "libpod_parent/conmon", "system.slice/cron.service", "user.slice/user-0.slice"] {
            assert_eq!(container_id(path), None, "{path}");
        }
        // 65 hex digits or upper case are not an id.
        assert_eq!(container_id(&format!("x/{ID}0")), None);
        assert_eq!(container_id(&format!("x/{}", ID.to_uppercase())), None);
        // The deepest id wins (a pod sandbox above its container).
        let other = "a".repeat(64);
        assert_eq!(container_id(&format!("pod-{other}/ctr-{ID}")).as_deref(), Some(ID));
    }

    #[test]
    fn the_v2_mount_is_found_in_hybrid_and_unified_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_root_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "25 20 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(v2_root_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(v2_root_in("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn the_index_finds_this_process_cgroup() {
        let root = v2_root().unwrap();
        let own = own_id(&root).unwrap();
        let mut index = Index::new(root);
        assert!(index.path_of(own).is_some());
        assert!(index.path_of(u64::MAX).is_none());
        // This test runs on the host, in no container.
        assert_eq!(container_of_process(std::process::id()), None);
    }
}
