//! The sealed record, format version 1 (written down for other implementations in
//! `docs/ENCRYPTION.md`). Every integer is big-endian; a string is its UTF-8 length as a u16,
//! then its bytes.
//!
//! ```text
//! magic      4   "LTS" 0x01
//! algorithm  1   1 = AES-256-GCM under a record key from HKDF-SHA256
//! timestamp  8   capture time, nanoseconds since the Unix epoch
//! seq        8   the record's number in its stream
//! length     4   of the ciphertext (the sealed value's length + 16)
//! salt      16   HKDF salt
//! nonce     12   AES-GCM nonce
//! tenant, key_id, host, service, module, path   6 strings (the identity)
//! ciphertext     AES-GCM output, its 16-byte tag last
//! ```
//!
//! The record key is HKDF-SHA256(ikm = the tenant key, salt, info = "logtap sealed record v1"
//! followed by the identity's bytes as they stand in the record); the associated data is the
//! first 25 bytes, magic to length. So neither the identity nor the time, number or length can
//! be changed, nor a record moved to another tenant's or stream's place, without failing to
//! open; and the associated data the cipher authenticates per record stays two blocks (it was
//! a fifth of the agent's CPU as the whole header, in GHASH).
//!
//! A sealer draws a random salt per tenant key and batch, and counts nonces up from 0 for that
//! tenant key within the batch, whichever stream's record key seals: a (record key, nonce) pair
//! never repeats, with no per-record randomness; a record key is derived once per stream and
//! batch.

use std::sync::Arc;
use std::time::SystemTime;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use super::keys::{random_bytes, KeySet, TenantKey};
use crate::record::{Origin, Record};

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

/// The associated data: magic, algorithm, timestamp, seq, length.
const AAD: usize = 25;

/// One tenant key's salt and nonce counter within a batch.
struct Salted {
    key: Arc<TenantKey>,
    salt: [u8; SALT],
    next_nonce: u64,
}

/// Seals the records of one batch.
#[derive(Default)]
pub struct Sealer {
    salted: Vec<Salted>,
    /// The record key of the last stream sealed: (tenant key, origin) -> cipher. Records of a
    /// stream come in runs, so one entry serves nearly all of them.
    last: Option<(Arc<TenantKey>, Arc<Origin>, Aes256Gcm)>,
    /// The identity bytes of that stream.
    identity: Vec<u8>,
}

fn derive(key: &TenantKey, salt: &[u8; SALT], identity: &[u8]) -> Aes256Gcm {
    let mut okm = zeroize::Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: expand cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(salt), key.secret()).expand_multi_info(&[HKDF_INFO, identity], &mut okm[..]);
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

    /// Appends `value` (what the sink would send in clear) sealed for `key`, with `record`'s
    /// identity, to `out`.
    pub fn seal(
        &mut self,
        key: &Arc<TenantKey>,
        record: &Record,
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let salted = match self.salted.iter().position(|s| Arc::ptr_eq(&s.key, key)) {
            Some(at) => &mut self.salted[at],
            None => {
                let mut salt = [0u8; SALT];
                random_bytes(&mut salt)?;
                self.salted.push(Salted { key: key.clone(), salt, next_nonce: 0 });
                self.salted.last_mut().ok_or_else(|| std::io::Error::other("no salt"))?
            }
        };
        let mut nonce = [0u8; NONCE];
        nonce[4..].copy_from_slice(&salted.next_nonce.to_be_bytes());
        salted.next_nonce += 1;
        let salt = salted.salt;
        let o = &record.origin;
        let same = self.last.as_ref().is_some_and(|(k, origin, _)| Arc::ptr_eq(k, key) && Arc::ptr_eq(origin, o));
        if !same {
            self.identity.clear();
            for s in [&*key.tenant, &*key.id, &*o.host, &*o.service, &*o.module, &*o.path] {
                put_str(&mut self.identity, s);
            }
            self.last = Some((key.clone(), o.clone(), derive(key, &salt, &self.identity)));
        }
        let Some((_, _, cipher)) = &self.last else { return Err(std::io::Error::other("no record key")) };
        let ns = record.captured_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let too_large = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "value too large to seal");
        let sealed_len = u32::try_from(value.len() + TAG).map_err(|_| too_large())?;
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(AES_256_GCM_HKDF_SHA256);
        out.extend_from_slice(&ns.to_be_bytes());
        out.extend_from_slice(&record.seq.to_be_bytes());
        out.extend_from_slice(&sealed_len.to_be_bytes());
        out.extend_from_slice(&salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&self.identity);
        let body = out.len();
        out.extend_from_slice(value);
        let (head, text) = out[start..].split_at_mut(body - start);
        let tag =
            cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), &head[..AAD], text).map_err(|_| too_large())?;
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
    /// The identity's bytes as they stand in the record (the HKDF info after the label).
    identity_bytes: &'a [u8],
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
    let timestamp_ns = u64::from_be_bytes(c.array()?);
    let seq = u64::from_be_bytes(c.array()?);
    let len = u32::from_be_bytes(c.array()?) as usize;
    let salt = c.array()?;
    let nonce = c.array()?;
    let from = c.at;
    let identity = Identity {
        tenant: c.string()?,
        key_id: c.string()?,
        host: c.string()?,
        service: c.string()?,
        module: c.string()?,
        path: c.string()?,
        timestamp_ns,
        seq,
    };
    let identity_bytes = &data[from..c.at];
    if len < TAG {
        return Err(OpenError::Truncated);
    }
    let body = c.take(len)?;
    Ok(Parsed { identity, salt, nonce, aad: &data[..AAD], identity_bytes, body, len: c.at })
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
        derive(key, &self.salt, self.identity_bytes)
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
    use crate::encryption::keys::tests::keyset;
    use crate::record::tests::record;

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
        moved[55..59].copy_from_slice(b"glob");
        assert!(open(&set, &moved).is_err());
        // A tenant's own key of another value under the same name fails to authenticate.
        let other = tempfile::tempdir().unwrap();
        let wrong = keyset(other.path(), &[("acme", "k1", 9)]);
        assert!(matches!(open(&wrong, &out), Err(OpenError::Authentication { .. })));
        let none = keyset(tempfile::tempdir().unwrap().path(), &[]);
        assert!(matches!(open(&none, &out), Err(OpenError::NoKey { .. })));
        assert_eq!(open(&set, b"plain text"), Err(OpenError::NotSealed));

        // Streams and keys interleaved in one batch: each record opens with its own identity.
        let (a, b) = (record(b"a"), record(b"b"));
        let b = Record { origin: Arc::new(Origin { path: "other.log".into(), ..(*b.origin).clone() }), ..b };
        let globex = set.sealing("globex").unwrap().clone();
        let mut sealer = Sealer::new();
        let mut all = Vec::new();
        for (k, r) in [(&key, &a), (&key, &b), (&globex, &a), (&key, &a), (&key, &b)] {
            sealer.seal(k, r, &r.bytes, &mut all).unwrap();
        }
        let mut at = 0;
        let mut got = Vec::new();
        while at < all.len() {
            let (id, value, used) = open(&set, &all[at..]).unwrap();
            got.push(format!("{}:{}:{}", id.tenant, id.path, String::from_utf8(value).unwrap()));
            at += used;
        }
        assert_eq!(
            got,
            ["acme:app.log:a", "acme:other.log:b", "globex:app.log:a", "acme:app.log:a", "acme:other.log:b"]
        );
        assert_eq!(open(&set, &out[..first - 1]), Err(OpenError::Truncated));
    }
}
