//! Records of containers the runtime has not named yet wait here for their identity: a pipe
//! target's (its first writes came before the runtime's start event), a volume file's (made by a
//! container's process before discovery linked the volume). Both sources share one set of
//! limits, `discovery.hold_timeout` and `hold_bytes` over everything held, and one accounting:
//! what is held now, and what went out with the container's id only.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use crate::discovery::{Directory, Hold, Lookup};

pub struct Holding {
    directory: Arc<dyn Directory>,
    limits: Hold,
    /// Held now, over both sources (gauges).
    records: AtomicI64,
    bytes: AtomicI64,
    /// Records that went out with the container's id only: not named within the limits, or
    /// unknown to the runtime.
    unidentified: AtomicU64,
    /// Records dropped because their container opted out (`logtap.stdout=false`).
    opted_out: AtomicU64,
}

/// What held records wait for, as of now.
pub enum Wait {
    /// Named: out with this identity.
    Named(Arc<crate::discovery::identity::Identity>),
    /// The runtime does not know it: out with the id only.
    Unknown,
    /// Not named yet, and within the limits.
    Pending,
    /// Not named within the limits: out with the id only.
    Late,
}

impl Holding {
    pub fn new(directory: Arc<dyn Directory>, limits: Hold) -> Arc<Self> {
        Arc::new(Self {
            directory,
            limits,
            records: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
            unidentified: AtomicU64::new(0),
            opted_out: AtomicU64::new(0),
        })
    }

    pub fn directory(&self) -> &dyn Directory {
        &*self.directory
    }

    /// Whether records held since `since` waited `hold_timeout`: they go now, named or not.
    pub fn due(&self, since: Instant) -> bool {
        since.elapsed() >= self.limits.timeout
    }

    /// More than `hold_bytes` is held, over both sources: the oldest holds go first.
    pub fn over(&self) -> bool {
        self.bytes.load(Relaxed) > self.limits.bytes as i64
    }

    /// `hold_bytes`.
    pub fn limit_bytes(&self) -> u64 {
        self.limits.bytes as u64
    }

    /// What records of `container`, held since `since`, wait for now.
    pub fn wait(&self, container: &str, since: Instant) -> Wait {
        match self.directory.lookup(container) {
            Lookup::Known(i) => Wait::Named(i),
            Lookup::Unknown => Wait::Unknown,
            Lookup::Pending if self.due(since) || self.over() => Wait::Late,
            Lookup::Pending => Wait::Pending,
        }
    }

    /// Records came on hold (`records`, `bytes` may be negative: they left it).
    pub fn held(&self, records: i64, bytes: i64) {
        self.records.fetch_add(records, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Held records went out; `named` says whether with their container's identity.
    pub fn released(&self, records: u64, named: bool) {
        if !named {
            self.unidentified.fetch_add(records, Relaxed);
        }
    }

    pub fn opted_out(&self, records: u64) {
        self.opted_out.fetch_add(records, Relaxed);
    }

    /// (held records, held bytes, unidentified records, opted-out records).
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let gauge = |g: &AtomicI64| g.load(Relaxed).max(0) as u64;
        (gauge(&self.records), gauge(&self.bytes), self.unidentified.load(Relaxed), self.opted_out.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A runtime that never answers.
    struct Silent;
    impl Directory for Silent {
        fn lookup(&self, _: &str) -> Lookup {
            Lookup::Pending
        }
    }

    #[test]
    fn one_limit_and_one_count_over_both_sources() {
        let h = Holding::new(Arc::new(Silent), Hold { timeout: Duration::from_secs(60), bytes: 1000 });
        let now = Instant::now();
        assert!(matches!(h.wait("c", now), Wait::Pending));
        // A pipe target holds 600 bytes, a volume file 600: over the one limit together.
        h.held(3, 600);
        assert!(matches!(h.wait("c", now), Wait::Pending));
        h.held(2, 600);
        assert!(matches!(h.wait("c", now), Wait::Late));
        h.held(-2, -600);
        h.released(2, false);
        h.held(-3, -600);
        h.released(3, true);
        assert_eq!(h.counts(), (0, 0, 2, 0));
        let long_ago = now.checked_sub(Duration::from_secs(61)).expect("an instant a minute ago");
        assert!(matches!(h.wait("c", long_ago), Wait::Late));
    }
}
