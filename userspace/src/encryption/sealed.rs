//! The sealed record, format version 1 (written down for other implementations in
//! `docs/ENCRYPTION.md`). Every integer is big-endian; a string is its UTF-8 length as a u16,
//! then its bytes.
//!
//! ```text
//! magic      4   "LTS" 0x01
//! algorithm  1   1 = AES-256-GCM under a record key from HKDF-SHA256
//! tenant, key_id, host, service, module, path   6 strings
//! timestamp  8   capture time, nanoseconds since the Unix epoch
//! seq        8   the record's number in its stream
//! salt      16   HKDF salt
//! nonce     12   AES-GCM nonce
//! length     4   of the ciphertext (the sealed value's length + 16)
//! ciphertext     AES-GCM output, its 16-byte tag last
//! ```
//!
//! Everything before the ciphertext is the associated data: the identity cannot be changed, a
//! record cannot be moved to another tenant's or stream's place, without failing to open. The
//! AES key is HKDF-SHA256(ikm = the tenant key, salt, info = "logtap sealed record v1"). A
//! sealer derives one per tenant key and batch, with a fresh random salt, and counts the nonce
//! up from 0 within it: nonces never repeat under one AES key, with no per-record randomness
//! or key derivation on the hot path.

use std::sync::Arc;
use std::time::SystemTime;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use super::keys::{random_bytes, KeySet, TenantKey};
use crate::record::Record;

pub const MAGIC: [u8; 4] = *b"LTS\x01";
pub const AES_256_GCM_HKDF_SHA256: u8 = 1;
/// The Kafka `enc` header of a sealed value.
pub const ALGORITHM: &str = "aes-256-gcm-hkdf-sha256";
pub const HKDF_INFO: &[u8] = b"logtap sealed record v1";
const SALT: usize = 16;
const NONCE: usize = 12;
const TAG: usize = 16;

/// What a sealed record says of itself (authenticated, in clear).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub key_id: String,
    pub host: String,
    pub service: String,
    pub module: String,
    pub path: String,
    pub timestamp_ns: u64,
    pub seq: u64,
}

/// One tenant key's record key within a batch.
struct RecordKey {
    key: Arc<TenantKey>,
    salt: [u8; SALT],
    cipher: Aes256Gcm,
    next_nonce: u64,
}

/// Seals the records of one batch.
#[derive(Default)]
pub struct Sealer {
    keys: Vec<RecordKey>,
}

fn derive(key: &TenantKey, salt: &[u8; SALT]) -> Aes256Gcm {
    let mut okm = zeroize::Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: expand cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(salt), key.secret()).expand(HKDF_INFO, &mut okm[..]);
    Aes256Gcm::new((&*okm).into())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names are bounded (128 bytes; paths by FUSE's 4 KiB), far below a u16.
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

impl Sealer {
    /// A fresh sealer: new salts, so a batch offered again is sealed under new record keys.
    pub fn new() -> Self {
        Self::default()
    }

    fn record_key(&mut self, key: &Arc<TenantKey>) -> std::io::Result<&mut RecordKey> {
        let at = match self.keys.iter().position(|k| Arc::ptr_eq(&k.key, key)) {
            Some(at) => at,
            None => {
                let mut salt = [0u8; SALT];
                random_bytes(&mut salt)?;
                self.keys.push(RecordKey { key: key.clone(), cipher: derive(key, &salt), salt, next_nonce: 0 });
                self.keys.len() - 1
            }
        };
        Ok(&mut self.keys[at])
    }

    /// Appends `value` (what the sink would send in clear) sealed for `key`, with `record`'s
    /// identity, to `out`.
    pub fn seal(
        &mut self,
        key: &Arc<TenantKey>,
        record: &Record,
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let rk = self.record_key(key)?;
        let o = &*record.origin;
        let ns = record.captured_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(AES_256_GCM_HKDF_SHA256);
        for s in [&*rk.key.tenant, &*rk.key.id, &*o.host, &*o.service, &*o.module, &*o.path] {
            put_str(out, s);
        }
        out.extend_from_slice(&ns.to_be_bytes());
        out.extend_from_slice(&record.seq.to_be_bytes());
        out.extend_from_slice(&rk.salt);
        let mut nonce = [0u8; NONCE];
        nonce[4..].copy_from_slice(&rk.next_nonce.to_be_bytes());
        rk.next_nonce += 1;
        out.extend_from_slice(&nonce);
        let sealed_len = u32::try_from(value.len() + TAG)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "value too large to seal"))?;
        out.extend_from_slice(&sealed_len.to_be_bytes());
        let body = out.len();
        out.extend_from_slice(value);
        let (aad, text) = out[start..].split_at_mut(body - start);
        let tag = rk
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, text)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "value too large to seal"))?;
        out.extend_from_slice(&tag);
        Ok(())
    }
}

/// Why a sealed record did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed record (no LTS magic)")]
    NotSealed,
    #[error("the sealed record is cut short")]
    Truncated,
    #[error("unknown algorithm {0} (this logtap knows 1, {ALGORITHM})")]
    Algorithm(u8),
    #[error("a string of the header is not UTF-8")]
    NotUtf8,
    #[error("no key {tenant}.{key_id}.key")]
    NoKey { tenant: String, key_id: String },
    #[error("authentication failed with key {tenant}.{key_id} (tampered, moved, or another key of that name)")]
    Authentication { tenant: String, key_id: String },
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OpenError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(OpenError::Truncated)?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], OpenError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn string(&mut self) -> Result<String, OpenError> {
        let len = u16::from_be_bytes(self.array()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| OpenError::NotUtf8)
    }
}

/// A sealed record read but not opened yet.
pub struct Parsed<'a> {
    pub identity: Identity,
    salt: [u8; SALT],
    nonce: [u8; NONCE],
    aad: &'a [u8],
    body: &'a [u8],
    /// Bytes the record takes (sealed records may follow one another).
    pub len: usize,
}

/// Reads the sealed record at the start of `data`, without a key.
pub fn parse(data: &[u8]) -> Result<Parsed<'_>, OpenError> {
    let mut c = Cursor { data, at: 0 };
    if c.take(4).map_err(|_| OpenError::NotSealed)? != MAGIC {
        return Err(OpenError::NotSealed);
    }
    let alg = c.array::<1>()?[0];
    if alg != AES_256_GCM_HKDF_SHA256 {
        return Err(OpenError::Algorithm(alg));
    }
    let identity = Identity {
        tenant: c.string()?,
        key_id: c.string()?,
        host: c.string()?,
        service: c.string()?,
        module: c.string()?,
        path: c.string()?,
        timestamp_ns: u64::from_be_bytes(c.array()?),
        seq: u64::from_be_bytes(c.array()?),
    };
    let salt = c.array()?;
    let nonce = c.array()?;
    let len = u32::from_be_bytes(c.array()?) as usize;
    let aad_end = c.at;
    if len < TAG {
        return Err(OpenError::Truncated);
    }
    let body = c.take(len)?;
    Ok(Parsed { identity, salt, nonce, aad: &data[..aad_end], body, len: c.at })
}

impl Parsed<'_> {
    /// The value, if the record's key is in `keys` and the record is as it was sealed.
    pub fn open(&self, keys: &KeySet) -> Result<Vec<u8>, OpenError> {
        let id = &self.identity;
        let key = keys
            .get(&id.tenant, &id.key_id)
            .ok_or_else(|| OpenError::NoKey { tenant: id.tenant.clone(), key_id: id.key_id.clone() })?;
        let (text, tag) = self.body.split_at(self.body.len() - TAG);
        let mut value = text.to_vec();
        derive(key, &self.salt)
            .decrypt_in_place_detached(Nonce::from_slice(&self.nonce), self.aad, &mut value, Tag::from_slice(tag))
            .map_err(|_| OpenError::Authentication { tenant: id.tenant.clone(), key_id: id.key_id.clone() })?;
        Ok(value)
    }
}

/// Opens the sealed record at the start of `data`: its identity, the value, and how many
/// bytes of `data` it took.
pub fn open(keys: &KeySet, data: &[u8]) -> Result<(Identity, Vec<u8>, usize), OpenError> {
    let parsed = parse(data)?;
    let value = parsed.open(keys)?;
    Ok((parsed.identity, value, parsed.len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;

    fn keyset(dir: &std::path::Path, keys: &[(&str, &str, u8)]) -> KeySet {
        use std::os::unix::fs::PermissionsExt;
        for (tenant, id, byte) in keys {
            let p = dir.join(format!("{tenant}.{id}.key"));
            std::fs::write(&p, [*byte; 32]).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        KeySet::load(dir).unwrap()
    }

    #[test]
    fn what_is_sealed_opens_with_its_key_only_and_any_change_fails() {
        let dir = tempfile::tempdir().unwrap();
        let set = keyset(dir.path(), &[("acme", "k1", 1), ("globex", "k1", 2)]);
        let key = set.sealing("acme").unwrap().clone();
        let mut sealer = Sealer::new();
        let mut out = Vec::new();
        let mut r = record(b"secret line \xff");
        r.seq = 7;
        sealer.seal(&key, &r, &r.bytes, &mut out).unwrap();
        let first = out.len();
        sealer.seal(&key, &r, b"second", &mut out).unwrap();
        assert!(!out.windows(6).any(|w| w == b"secret"), "no plaintext in the sealed bytes");

        let (id, value, used) = open(&set, &out).unwrap();
        assert_eq!((value.as_slice(), used), (&b"secret line \xff"[..], first));
        assert_eq!((id.tenant.as_str(), id.key_id.as_str(), id.service.as_str(), id.seq), ("acme", "k1", "svc", 7));
        let (_, value, used) = open(&set, &out[first..]).unwrap();
        assert_eq!((value.as_slice(), first + used), (&b"second"[..], out.len()));

        // Every single flipped bit of the first record fails.
        for bit in 0..first * 8 {
            let mut bad = out[..first].to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(open(&set, &bad).is_err(), "bit {bit} flipped and it opened");
        }
        // The same id under another tenant's name: the key differs, and the tenant is bound.
        let mut moved = out[..first].to_vec();
        moved[7..11].copy_from_slice(b"glob");
        assert!(open(&set, &moved).is_err());
        // A tenant's own key of another value under the same name fails to authenticate.
        let other = tempfile::tempdir().unwrap();
        let wrong = keyset(other.path(), &[("acme", "k1", 9)]);
        assert!(matches!(open(&wrong, &out), Err(OpenError::Authentication { .. })));
        let none = keyset(tempfile::tempdir().unwrap().path(), &[]);
        assert!(matches!(open(&none, &out), Err(OpenError::NoKey { .. })));
        assert_eq!(open(&set, b"plain text"), Err(OpenError::NotSealed));
        assert_eq!(open(&set, &out[..first - 1]), Err(OpenError::Truncated));
    }
}
