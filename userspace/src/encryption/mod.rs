//! Per-tenant encryption: each record of a tenant with a key leaves the agent sealed with that
//! key ([`sealed`]); [`keys`] reads and follows the key directory; [`Encryption`] decides, per
//! record and sink, what happens to records of tenants without a usable key; [`decrypt`] turns
//! sealed records back into values (`logtap decrypt`).

pub mod decrypt;
pub mod keys;
pub mod sealed;

use std::path::PathBuf;
use std::sync::Arc;

use keys::{KeySet, Keys, TenantKey};

/// `[encryption]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// The key directory (`TENANT.KEYID.key`); empty: nothing is sealed.
    pub keys: PathBuf,
    /// Records of tenants without a key, and records of no tenant.
    pub without_key: WithoutKey,
    /// With `without_key = "default"`: the tenant whose key seals them.
    pub default_tenant: String,
    /// Tenants never sent in clear: without a usable key, `required_without_key` applies.
    pub required: Vec<String>,
    pub required_without_key: Missing,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            keys: PathBuf::new(),
            without_key: WithoutKey::Plaintext,
            default_tenant: String::new(),
            required: Vec::new(),
            required_without_key: Missing::Drop,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithoutKey {
    /// Sent in clear (counted per tenant).
    Plaintext,
    /// Dropped (counted).
    Drop,
    /// Sealed with `default_tenant`'s key.
    Default,
}

/// What becomes of the records of a tenant that must be sealed and has no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// Dropped and counted.
    Drop,
    /// Held by each sink until the key is there (the ring fills meanwhile, and its policy
    /// applies to what comes in); dropped and counted at shutdown.
    Wait,
}

impl EncryptionConfig {
    pub fn enabled(&self) -> bool {
        !self.keys.as_os_str().is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            if !self.required.is_empty() || self.without_key != WithoutKey::Plaintext {
                return Err("encryption.required and encryption.without_key need encryption.keys".into());
            }
            return Ok(());
        }
        if !self.keys.is_absolute() {
            return Err(format!("encryption.keys must be an absolute path, not {:?}", self.keys));
        }
        for t in &self.required {
            logtap_fusefs::Name::parse(t).map_err(|e| format!("encryption.required: invalid tenant {t:?}: {e}"))?;
        }
        match self.without_key {
            WithoutKey::Default => logtap_fusefs::Name::parse(&self.default_tenant).map(|_| ()).map_err(|e| {
                format!("encryption.default_tenant must name a tenant with without_key = \"default\": {e}")
            }),
            _ if !self.default_tenant.is_empty() => {
                Err("encryption.default_tenant is used only with without_key = \"default\"".into())
            }
            _ => Ok(()),
        }
    }

    /// Reads the key directory and follows it; `None` when encryption is off.
    pub fn start(&self) -> anyhow::Result<Option<Arc<Encryption>>> {
        if !self.enabled() {
            return Ok(None);
        }
        let keys = Keys::open(&self.keys)?;
        keys.watch()?;
        Ok(Some(Arc::new(Encryption::new(self.clone(), keys))))
    }
}

/// What a sink does with one record.
#[derive(Debug, Clone)]
pub enum Treatment {
    /// Sent as it is.
    Clear,
    Seal(Arc<TenantKey>),
    /// Not sent (counted).
    Drop,
    /// Held until the tenant's key is there.
    Wait,
}

/// The policy over the followed key directory.
pub struct Encryption {
    config: EncryptionConfig,
    pub keys: Arc<Keys>,
}

impl Encryption {
    pub fn new(config: EncryptionConfig, keys: Arc<Keys>) -> Self {
        Self { config, keys }
    }

    /// What happens to a record of `tenant` under the keys of `set` (one set per batch, so
    /// that a batch sees one state of the directory).
    pub fn treat(&self, set: &KeySet, tenant: &str) -> Treatment {
        if let Some(key) = set.sealing(tenant).filter(|_| !tenant.is_empty()) {
            return Treatment::Seal(key.clone());
        }
        let required = set.unusable(tenant) || self.config.required.iter().any(|t| t == tenant);
        let missing = match self.config.required_without_key {
            Missing::Drop => Treatment::Drop,
            Missing::Wait => Treatment::Wait,
        };
        if required {
            return missing;
        }
        match self.config.without_key {
            WithoutKey::Plaintext => Treatment::Clear,
            WithoutKey::Drop => Treatment::Drop,
            WithoutKey::Default => match set.sealing(&self.config.default_tenant) {
                Some(key) => Treatment::Seal(key.clone()),
                None => missing,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn encryption(dir: &std::path::Path, config: EncryptionConfig) -> Encryption {
        Encryption::new(config, Keys::open(dir).unwrap())
    }

    fn name(t: &Treatment) -> String {
        match t {
            Treatment::Seal(k) => format!("seal {}.{}", k.tenant, k.id),
            other => format!("{other:?}").to_lowercase(),
        }
    }

    #[test]
    fn each_policy_decides_as_documented_and_required_tenants_are_never_clear() {
        let dir = tempfile::tempdir().unwrap();
        for (file, mode) in [("acme.k1.key", 0o600), ("ops.k1.key", 0o600), ("leaky.k1.key", 0o644)] {
            let p = dir.path().join(file);
            std::fs::write(&p, [7; 32]).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = |without_key, default_tenant: &str, wait| EncryptionConfig {
            keys: dir.path().into(),
            without_key,
            default_tenant: default_tenant.into(),
            required: vec!["bank".into()],
            required_without_key: if wait { Missing::Wait } else { Missing::Drop },
        };
        let cases = [
            (config(WithoutKey::Plaintext, "", false), ["seal acme.k1", "clear", "clear", "drop", "drop"]),
            (config(WithoutKey::Drop, "", true), ["seal acme.k1", "drop", "drop", "wait", "wait"]),
            (config(WithoutKey::Default, "ops", false), ["seal acme.k1", "seal ops.k1", "seal ops.k1", "drop", "drop"]),
            (config(WithoutKey::Default, "absent", true), ["seal acme.k1", "wait", "wait", "wait", "wait"]),
        ];
        for (config, expected) in cases {
            config.validate().unwrap();
            let e = encryption(dir.path(), config.clone());
            let set = e.keys.current();
            let got: Vec<String> =
                ["acme", "other", "", "bank", "leaky"].iter().map(|t| name(&e.treat(&set, t))).collect();
            assert_eq!(got, expected, "{config:?}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let on = |f: fn(&mut EncryptionConfig)| {
            let mut c = EncryptionConfig { keys: "/etc/logtap/keys".into(), ..Default::default() };
            f(&mut c);
            c.validate()
        };
        assert!(on(|_| {}).is_ok());
        assert!(on(|c| c.keys = "rel".into()).unwrap_err().contains("absolute"));
        assert!(on(|c| c.without_key = WithoutKey::Default).unwrap_err().contains("default_tenant"));
        assert!(on(|c| c.default_tenant = "ops".into()).unwrap_err().contains("only with"));
        assert!(on(|c| c.required = vec!["a/b".into()]).unwrap_err().contains("invalid tenant"));
        let off = EncryptionConfig { required: vec!["a".into()], ..Default::default() };
        assert!(off.validate().unwrap_err().contains("need encryption.keys"));
    }
}
