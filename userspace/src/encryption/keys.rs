//! Tenant keys: a directory of files named `TENANT.KEYID.key`, each 32 random bytes readable by
//! its owner only. The greatest key id of a tenant (in byte order) seals its records; the
//! others stay for decryption. `logtap keys new` makes ids that sort by creation time.
//!
//! The directory is watched: a key added, replaced or removed counts within a moment, without
//! a restart. A file that is not a usable key is refused with its reason, and its tenant is
//! never sent in clear (see [`KeySet::unusable`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tracing::{error, info, warn};
use zeroize::Zeroizing;

use crate::api::{EncryptionSnapshot, RefusedKeySnapshot, TenantKeysSnapshot};

pub const KEY_BYTES: usize = 32;
const SUFFIX: &str = ".key";
/// Longest key id.
const ID_MAX: usize = 64;
/// Key files read at most; a directory with more is refused beyond them (an operator's error,
/// and the agent's memory stays bounded).
const MAX_FILES: usize = 65536;
/// How often the directory is read again even without a change notice (filesystems that
/// send none).
const RESCAN: Duration = Duration::from_secs(10);

/// One tenant's key. The secret is wiped from memory when the last holder drops it.
pub struct TenantKey {
    pub tenant: Arc<str>,
    pub id: Arc<str>,
    secret: Zeroizing<[u8; KEY_BYTES]>,
}

impl TenantKey {
    pub fn new(tenant: &str, id: &str, secret: [u8; KEY_BYTES]) -> Self {
        Self { tenant: tenant.into(), id: id.into(), secret: Zeroizing::new(secret) }
    }

    pub fn secret(&self) -> &[u8; KEY_BYTES] {
        &self.secret
    }
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantKey({}.{})", self.tenant, self.id)
    }
}

/// A file of the directory that is not a usable key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub file: PathBuf,
    pub reason: String,
}

/// The keys of a directory as read at one moment.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Per tenant, its keys by id.
    tenants: BTreeMap<String, BTreeMap<String, Arc<TenantKey>>>,
    pub refused: Vec<Refused>,
    /// Tenants with a refused key file.
    refused_tenants: BTreeSet<String>,
}

/// Tenant and key id of a key file's name, `TENANT.KEYID.key`; the tenant may hold dots, the
/// id may not.
pub fn parse_name(name: &str) -> Result<(&str, &str), String> {
    let stem = name.strip_suffix(SUFFIX).ok_or_else(|| format!("the name does not end in {SUFFIX}"))?;
    let (tenant, id) = stem.rsplit_once('.').ok_or("the name is not TENANT.KEYID.key")?;
    logtap_fusefs::Name::parse(tenant).map_err(|e| format!("invalid tenant {tenant:?}: {e}"))?;
    check_id(id)?;
    Ok((tenant, id))
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty() && id.len() <= ID_MAX && id.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid key id {id:?}: 1 to {ID_MAX} of ASCII letters, digits, '_' and '-'"))
    }
}

/// Reads one key file: a regular file (symlinks are followed, as in a Kubernetes secret
/// volume) of exactly 32 bytes, owned by the reader or root, with no access for group or
/// others: anyone else who could read it could read every record it seals.
pub fn read_key(path: &Path) -> Result<[u8; KEY_BYTES], String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "its mode is {mode:04o}: a key file must not be readable or writable by group or others (chmod 600)"
        ));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!("it is owned by uid {}, neither root nor this user ({me})", meta.uid()));
    }
    if meta.len() != KEY_BYTES as u64 {
        return Err(format!("it is {} bytes long; a key is exactly {KEY_BYTES} random bytes", meta.len()));
    }
    let mut secret = [0u8; KEY_BYTES];
    file.read_exact(&mut secret).map_err(|e| format!("cannot read it: {e}"))?;
    Ok(secret)
}

impl KeySet {
    /// Reads every key file of `dir`. Only an unreadable directory is an error; each unusable
    /// file is refused with its reason. Names starting with '.' are skipped (temporary files,
    /// a Kubernetes secret volume's `..data`).
    pub fn load(dir: &Path) -> anyhow::Result<KeySet> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read the key directory {}", dir.display()))?;
        let mut set = KeySet::default();
        let mut seen = 0;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read the key directory {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                set.refused.push(Refused { file: entry.path(), reason: "the name is not UTF-8".into() });
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let (tenant, id) = match parse_name(name) {
                Ok(parsed) => parsed,
                Err(reason) => {
                    set.refused.push(Refused { file: path, reason });
                    continue;
                }
            };
            seen += 1;
            let read = if seen > MAX_FILES {
                Err(format!("the directory holds more than {MAX_FILES} keys"))
            } else {
                read_key(&path)
            };
            match read {
                Ok(secret) => {
                    let key = Arc::new(TenantKey::new(tenant, id, secret));
                    set.tenants.entry(tenant.to_string()).or_default().insert(id.to_string(), key);
                }
                Err(reason) => {
                    set.refused_tenants.insert(tenant.to_string());
                    set.refused.push(Refused { file: path, reason });
                }
            }
        }
        set.refused.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(set)
    }

    /// Per tenant, its key ids with their bytes.
    fn contents(&self) -> BTreeMap<&str, Vec<(&str, &[u8; KEY_BYTES])>> {
        self.tenants
            .iter()
            .map(|(t, keys)| (t.as_str(), keys.iter().map(|(id, k)| (id.as_str(), k.secret())).collect()))
            .collect()
    }

    /// The key that seals `tenant`'s records now: its greatest key id.
    pub fn sealing(&self, tenant: &str) -> Option<&Arc<TenantKey>> {
        self.tenants.get(tenant).and_then(|keys| keys.values().next_back())
    }

    pub fn get(&self, tenant: &str, id: &str) -> Option<&Arc<TenantKey>> {
        self.tenants.get(tenant).and_then(|keys| keys.get(id))
    }

    /// A tenant with a key file that was refused: meant to be sealed, so never sent in clear.
    pub fn unusable(&self, tenant: &str) -> bool {
        self.refused_tenants.contains(tenant)
    }

    pub fn snapshot(&self, dir: &Path, reloads: u64) -> EncryptionSnapshot {
        EncryptionSnapshot {
            keys: dir.display().to_string(),
            tenants: self
                .tenants
                .iter()
                .map(|(tenant, keys)| TenantKeysSnapshot {
                    tenant: tenant.clone(),
                    sealing_key: self.sealing(tenant).map(|k| k.id.to_string()).unwrap_or_default(),
                    key_ids: keys.keys().cloned().collect(),
                })
                .collect(),
            refused: self
                .refused
                .iter()
                .map(|r| RefusedKeySnapshot { file: r.file.display().to_string(), reason: r.reason.clone() })
                .collect(),
            reloads_total: reloads,
        }
    }
}

/// A new key id: the UTC time to the microsecond, then random hex (ids of one tenant sort by
/// creation).
fn new_id() -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%S%6f");
    format!("{now}-{:06x}", crate::values::random_u64() & 0xff_ffff)
}

/// Fills `out` from the kernel's random pool.
pub fn random_bytes(out: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < out.len() {
        // SAFETY: the slice is valid for its length.
        let got = unsafe { libc::getrandom(out[at..].as_mut_ptr().cast(), out.len() - at, 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        at += got as usize;
    }
    Ok(())
}

/// Makes a new key for `tenant` in `dir` (created mode 0700 if missing) and returns its id
/// and file. Written under a hidden name and renamed: the watching agent never reads half a key.
pub fn new_key(dir: &Path, tenant: &str) -> anyhow::Result<(String, PathBuf)> {
    logtap_fusefs::Name::parse(tenant).map_err(|e| anyhow::anyhow!("invalid tenant {tenant:?}: {e}"))?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let id = new_id();
    let name = format!("{tenant}.{id}{SUFFIX}");
    let path = dir.join(&name);
    let temp = dir.join(format!(".{name}.tmp"));
    let mut secret = Zeroizing::new([0u8; KEY_BYTES]);
    random_bytes(&mut secret[..]).context("cannot get random bytes")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("cannot create {}", temp.display()))?;
    file.write_all(&secret[..])
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temp.display()))?;
    std::fs::rename(&temp, &path).with_context(|| format!("cannot rename {} to {}", temp.display(), path.display()))?;
    Ok((id, path))
}

/// The key directory as the agent uses it: the set read last, read again on every change.
pub struct Keys {
    dir: PathBuf,
    current: RwLock<Arc<KeySet>>,
    reloads: AtomicU64,
}

impl Keys {
    /// Reads `dir`; an unreadable directory is an error (the agent does not start), refused
    /// files are logged with their reasons.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Keys>> {
        let set = KeySet::load(dir)?;
        log_refused(&set);
        info!(keys = %dir.display(), tenants = set.tenants.len(), refused = set.refused.len(), "tenant keys read");
        Ok(Arc::new(Keys { dir: dir.to_path_buf(), current: RwLock::new(Arc::new(set)), reloads: AtomicU64::new(0) }))
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn snapshot(&self) -> EncryptionSnapshot {
        self.current().snapshot(&self.dir, self.reloads.load(Relaxed))
    }

    /// Reads the directory again. A directory gone unreadable keeps the keys read last.
    pub fn reload(&self) {
        let set = match KeySet::load(&self.dir) {
            Ok(set) => set,
            Err(e) => return warn!("{e:#}; keeping the keys read before"),
        };
        let old = self.current();
        // A key file rewritten under the same name counts as a change too.
        let (before, after) = (old.contents(), set.contents());
        if before == after && old.refused == set.refused {
            return;
        }
        for (tenant, _) in after.iter().filter(|(t, k)| before.get(*t) != Some(*k)) {
            if let Some(k) = set.sealing(tenant) {
                info!(tenant, key_id = %k.id, "tenant keys changed; this key seals from now on");
            }
        }
        for tenant in before.keys().filter(|t| !after.contains_key(*t)) {
            warn!(tenant, "the tenant has no key any more");
        }
        if old.refused != set.refused {
            log_refused(&set);
        }
        self.reloads.fetch_add(1, Relaxed);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }

    /// Follows the directory on its own thread (inotify, and a read every [`RESCAN`]).
    pub fn watch(self: &Arc<Self>) -> anyhow::Result<()> {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).context("key directory path")?;
        // SAFETY: plain syscalls; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_init1");
        }
        // SAFETY: fd is a new inotify descriptor no one else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        let mask = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: valid fd and C string.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot watch {}", self.dir.display()));
        }
        let keys = self.clone();
        std::thread::Builder::new()
            .name("keys-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    let ready = unsafe { libc::poll(&mut p, 1, RESCAN.as_millis() as libc::c_int) };
                    if ready > 0 {
                        // A burst of changes (a key written, then renamed) is read once.
                        std::thread::sleep(Duration::from_millis(20));
                        // SAFETY: reading into our buffer; the fd is non-blocking only after POLLIN.
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    }
                    keys.reload();
                }
            })
            .context("cannot start the key directory watcher")?;
        Ok(())
    }
}

fn log_refused(set: &KeySet) {
    for r in &set.refused {
        error!(file = %r.file.display(), reason = %r.reason, "key file refused: its tenant's records are not sent in clear");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The key set of `dir` after writing keys of (tenant, id, every byte) there, mode 0600.
    pub fn keyset(dir: &Path, keys: &[(&str, &str, u8)]) -> KeySet {
        for (tenant, id, byte) in keys {
            write_key(dir, &format!("{tenant}.{id}.key"), &[*byte; KEY_BYTES], 0o600);
        }
        KeySet::load(dir).unwrap()
    }

    fn write_key(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn names_say_tenant_and_id() {
        assert_eq!(parse_name("acme.k1.key"), Ok(("acme", "k1")));
        assert_eq!(parse_name("acme.eu.20261202T101010-abc.key"), Ok(("acme.eu", "20261202T101010-abc")));
        assert!(parse_name("acme.key").is_err());
        assert!(parse_name("acme.k1").is_err());
        assert!(parse_name(".k1.key").is_err());
        assert!(parse_name("a b.k1.key").is_err());
    }

    #[test]
    fn the_greatest_id_seals_and_bad_files_are_refused_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "acme.k1.key", &[1; 32], 0o600);
        write_key(dir.path(), "acme.k2.key", &[2; 32], 0o400);
        write_key(dir.path(), "open.k1.key", &[3; 32], 0o640);
        write_key(dir.path(), "short.k1.key", &[4; 16], 0o600);
        write_key(dir.path(), "notes.txt", b"x", 0o600);
        write_key(dir.path(), ".acme.k3.key.tmp", &[5; 32], 0o600);
        let set = KeySet::load(dir.path()).unwrap();
        let k = set.sealing("acme").unwrap();
        assert_eq!((&*k.id, k.secret()), ("k2", &[2; 32]));
        assert_eq!(set.get("acme", "k1").unwrap().secret(), &[1; 32]);
        assert!(set.sealing("open").is_none() && set.unusable("open"));
        assert!(set.unusable("short") && !set.unusable("acme"));
        let reasons: Vec<(String, String)> = set
            .refused
            .iter()
            .map(|r| (r.file.file_name().unwrap().to_string_lossy().into_owned(), r.reason.clone()))
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].0 == "notes.txt" && reasons[0].1.contains("does not end in .key"), "{reasons:?}");
        assert!(reasons[1].0 == "open.k1.key" && reasons[1].1.contains("mode is 0640"), "{reasons:?}");
        assert!(reasons[2].0 == "short.k1.key" && reasons[2].1.contains("16 bytes"), "{reasons:?}");
    }

    #[test]
    fn new_keys_are_private_and_newer_ones_seal() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let (first, path) = new_key(&keys, "acme").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&keys).unwrap().mode() & 0o777, 0o700);
        let store = Keys::open(&keys).unwrap();
        assert_eq!(&*store.current().sealing("acme").unwrap().id, first.as_str());
        let (second, _) = new_key(&keys, "acme").unwrap();
        assert!(second > first, "{second} sorts after {first}");
        store.reload();
        assert_eq!(&*store.current().sealing("acme").unwrap().id, second.as_str());
        assert!(store.current().get("acme", &first).is_some(), "the older key stays for decryption");
        std::fs::write(keys.join(format!("acme.{second}.key")), [9; KEY_BYTES]).unwrap();
        store.reload();
        assert_eq!(store.current().sealing("acme").unwrap().secret(), &[9; KEY_BYTES], "a key rewritten in place");
        assert!(new_key(&keys, "../x").is_err());
    }
}
