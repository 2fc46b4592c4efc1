//! Who a container is, from what the runtime says of it: labels in the `logtap.*` namespace,
//! then `LOGTAP_*` environment variables, then its name.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use logtap_fusefs::Name;

use crate::api::Container;

/// The identity every record of a container carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub container: Arc<Container>,
    pub service: Arc<str>,
    /// Set by `logtap.service` or `LOGTAP_SERVICE`, rather than taken from the name: it then
    /// also wins over the service a volume was created with.
    pub service_explicit: bool,
    /// `logtap.module`: the module of the container's stdout/stderr records (files in its
    /// volumes keep the module of their file name).
    pub module: Option<Arc<str>>,
    pub tenant: Arc<str>,
    /// `logtap.stdout=false` opts the container's stdout/stderr out of capture.
    pub stdout: bool,
}

/// What the runtime told of a container.
#[derive(Debug)]
pub struct Described<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub image: &'a str,
    pub labels: &'a HashMap<String, String>,
    /// `KEY=VALUE` entries.
    pub env: &'a [String],
}

/// A label or variable made a name (see [`Name::sanitize`]).
fn safe(text: &str) -> Option<String> {
    Name::sanitize(text).map(Name::into_string)
}

/// The first 12 digits of an id, as runtimes show it.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

impl Identity {
    /// What the records of a container get before (or without) the runtime naming it.
    pub fn unnamed(id: &str) -> Self {
        Identity {
            container: Arc::new(Container { id: id.to_string(), ..Default::default() }),
            service: short_id(id).into(),
            service_explicit: false,
            module: None,
            tenant: "".into(),
            stdout: true,
        }
    }

    /// The identity of a described container; `wanted` are the labels copied onto records.
    pub fn of(c: &Described<'_>, wanted: &[String]) -> Self {
        let setting = |key: &str| -> Option<&str> {
            if let Some(v) = c.labels.get(&format!("logtap.{key}")) {
                return Some(v);
            }
            let var = format!("LOGTAP_{}=", key.to_ascii_uppercase());
            c.env.iter().find_map(|e| e.strip_prefix(&var))
        };
        let name = c.name.trim_start_matches('/');
        let explicit = setting("service").and_then(safe);
        let service_explicit = explicit.is_some();
        let service = explicit.or_else(|| safe(name)).unwrap_or_else(|| short_id(c.id).to_string());
        let stdout = !setting("stdout")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off"));
        let labels: BTreeMap<String, String> =
            wanted.iter().filter_map(|k| c.labels.get(k).map(|v| (k.clone(), v.clone()))).collect();
        Identity {
            container: Arc::new(Container {
                id: c.id.to_string(),
                name: name.to_string(),
                image: c.image.to_string(),
                labels,
            }),
            service: service.into(),
            service_explicit,
            module: setting("module").and_then(safe).map(Into::into),
            tenant: setting("tenant").and_then(safe).unwrap_or_default().into(),
            stdout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "44d2417d27a0f3c19b531e23f54916f56acab3305528dd416bfda548840cf7c8";

    fn of(labels: &[(&str, &str)], env: &[&str]) -> Identity {
        let labels: HashMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env: Vec<String> = env.iter().map(|e| e.to_string()).collect();
        let c = Described { id: ID, name: "/web-1", image: "shop:1.2", labels: &labels, env: &env };
        Identity::of(&c, &["team".to_string(), "absent".to_string()])
    }

    #[test]
    fn labels_win_over_env_which_wins_over_the_name() {
        let i = of(&[], &[]);
        assert_eq!((&*i.service, i.service_explicit, i.module.as_deref(), &*i.tenant), ("web-1", false, None, ""));
        assert_eq!(i.container.name, "web-1");
        assert_eq!(i.container.image, "shop:1.2");
        assert!(i.stdout);

        let i = of(&[], &["LOGTAP_SERVICE=billing", "LOGTAP_MODULE=api", "LOGTAP_TENANT=acme", "PATH=/bin"]);
        assert_eq!(
            (&*i.service, i.service_explicit, i.module.as_deref(), &*i.tenant),
            ("billing", true, Some("api"), "acme")
        );

        let i = of(
            &[("logtap.service", "shop"), ("logtap.module", "front"), ("logtap.tenant", "t1"), ("team", "pay")],
            &["LOGTAP_SERVICE=billing", "LOGTAP_TENANT=acme"],
        );
        assert_eq!((&*i.service, i.module.as_deref(), &*i.tenant), ("shop", Some("front"), "t1"));
        assert_eq!(i.container.labels, BTreeMap::from([("team".to_string(), "pay".to_string())]));
    }

    #[test]
    fn stdout_opt_out() {
        for v in ["false", "FALSE", "0", "no", "off"] {
            assert!(!of(&[("logtap.stdout", v)], &[]).stdout, "{v}");
        }
        assert!(!of(&[], &["LOGTAP_STDOUT=false"]).stdout);
        assert!(of(&[("logtap.stdout", "true")], &["LOGTAP_STDOUT=false"]).stdout);
    }

    #[test]
    fn names_are_made_safe() {
        let i = of(&[("logtap.service", "../../etc passwd"), ("logtap.tenant", "a/b")], &[]);
        assert_eq!(&*i.service, "_.._etc_passwd");
        assert_eq!(&*i.tenant, "a_b");
        // Nothing usable: the name, then the short id.
        assert_eq!(&*of(&[("logtap.service", "///")], &[]).service, "___");
        let none = HashMap::new();
        let nameless = Identity::of(&Described { id: ID, name: "", image: "", labels: &none, env: &[] }, &[]);
        assert_eq!(&*nameless.service, &ID[..12]);
        assert_eq!(&*Identity::unnamed(ID).service, &ID[..12]);
    }
}
