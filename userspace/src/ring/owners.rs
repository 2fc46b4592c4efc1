//! Who holds the ring. Each record names its stream; a stream belongs to a source (its
//! container, else its volume, else its service) and to a tenant. What each source and
//! tenant holds is what fairness compares, and each has its own rate limit.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rate::Bucket;
use crate::api::{SourceSnapshot, TenantSnapshot};
use crate::record::Origin;
use crate::state::WorkerState;

/// Tenants counted one by one; the rest share one entry (tenants come from container labels,
/// which no app inside a container sets).
const MAX_TENANTS: usize = 4096;
const OTHER_TENANTS: &str = "(other)";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceKey {
    Container(String),
    Volume(Arc<str>),
    Service(Arc<str>),
}

impl SourceKey {
    fn of(o: &Origin) -> Self {
        match (&o.container, o.volume.is_empty()) {
            (Some(c), _) => SourceKey::Container(c.id.clone()),
            (None, false) => SourceKey::Volume(o.volume.clone()),
            (None, true) => SourceKey::Service(o.service.clone()),
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::Container(id) => write!(f, "container {}", &id[..id.len().min(12)]),
            SourceKey::Volume(v) => write!(f, "volume {v}"),
            SourceKey::Service(s) => write!(f, "service {s}"),
        }
    }
}

/// Optional byte rates, per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub source: Option<u64>,
    pub tenant: Option<u64>,
}

struct Stream {
    /// The source's own: its address finds the stream, and its count says when the source
    /// let go of it.
    origin: Arc<Origin>,
    /// A copy the records read out carry: the sinks' threads count their references on it,
    /// not on the source's, whose count the source's thread changes with every record.
    read: Arc<Origin>,
    source: u32,
    tenant: u32,
    /// End of its newest record in the ring: the stream's slot is kept until the head passes it.
    last: u64,
}

struct Source {
    key: SourceKey,
    held: u64,
    streams: u32,
    bucket: Option<Bucket>,
}

struct Tenant {
    name: Arc<str>,
    held: u64,
    bucket: Option<Bucket>,
    dropped_records: u64,
    dropped_bytes: u64,
    throttled_records: u64,
    throttled_bytes: u64,
}

/// Puts `entry` in a free slot of `slots`, or a new one; returns its index.
fn place<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<u32>, entry: T) -> u32 {
    match free.pop() {
        Some(i) => {
            slots[i as usize] = Some(entry);
            i
        }
        None => {
            slots.push(Some(entry));
            (slots.len() - 1) as u32
        }
    }
}

pub struct Owners {
    rates: Rates,
    streams: Vec<Option<Stream>>,
    free: Vec<u32>,
    /// Streams by their origin's address (the table holds the origin, so it is not reused).
    by_origin: HashMap<usize, u32>,
    sources: Vec<Option<Source>>,
    free_sources: Vec<u32>,
    by_source: HashMap<SourceKey, u32>,
    tenants: Vec<Tenant>,
    by_tenant: HashMap<Arc<str>, u32>,
    /// Live streams after the last sweep: the next one is due when there are twice as many.
    swept: usize,
    /// Where each slot's origin is kept for a worker taking over the ring, and the ring's
    /// generation.
    state: Option<(Arc<WorkerState>, u64)>,
}

impl Owners {
    pub fn new(rates: Rates, state: Option<(Arc<WorkerState>, u64)>) -> Self {
        Self {
            rates,
            streams: Vec::new(),
            free: Vec::new(),
            by_origin: HashMap::new(),
            sources: Vec::new(),
            free_sources: Vec::new(),
            by_source: HashMap::new(),
            tenants: Vec::new(),
            by_tenant: HashMap::new(),
            swept: 0,
            state,
        }
    }

    /// The slot of `origin`'s stream, made on first sight. `head` lets a sweep free the slots
    /// of streams gone from both the ring and their source.
    pub fn stream(&mut self, origin: &Arc<Origin>, head: u64, now: Instant) -> u32 {
        let addr = Arc::as_ptr(origin) as usize;
        if let Some(&id) = self.by_origin.get(&addr) {
            return id;
        }
        if self.by_origin.len() >= 2 * self.swept.max(64) {
            self.sweep(head);
        }
        let tenant = self.tenant(&origin.tenant, now);
        let key = SourceKey::of(origin);
        let source = match self.by_source.get(&key) {
            Some(&s) => s,
            None => {
                let bucket = self.rates.source.map(|r| Bucket::new(r, now));
                let entry = Source { key: key.clone(), held: 0, streams: 0, bucket };
                let s = place(&mut self.sources, &mut self.free_sources, entry);
                self.by_source.insert(key, s);
                s
            }
        };
        if let Some(s) = self.sources[source as usize].as_mut() {
            s.streams += 1;
        }
        let read = Arc::new(Origin::clone(origin));
        let entry = Stream { origin: origin.clone(), read, source, tenant, last: 0 };
        let id = place(&mut self.streams, &mut self.free, entry);
        self.by_origin.insert(addr, id);
        if let Some((state, ring)) = &self.state {
            state.stream(*ring, id, origin);
        }
        id
    }

    fn tenant(&mut self, name: &Arc<str>, now: Instant) -> u32 {
        if let Some(&t) = self.by_tenant.get(name) {
            return t;
        }
        let name: Arc<str> = if self.tenants.len() + 1 >= MAX_TENANTS { OTHER_TENANTS.into() } else { name.clone() };
        if let Some(&t) = self.by_tenant.get(&name) {
            return t;
        }
        self.tenants.push(Tenant {
            name: name.clone(),
            held: 0,
            bucket: self.rates.tenant.map(|r| Bucket::new(r, now)),
            dropped_records: 0,
            dropped_bytes: 0,
            throttled_records: 0,
            throttled_bytes: 0,
        });
        let t = (self.tenants.len() - 1) as u32;
        self.by_tenant.insert(name, t);
        t
    }

    /// Frees the slots of streams whose source let go of them and that have no record left.
    pub fn sweep(&mut self, head: u64) {
        for id in 0..self.streams.len() {
            let gone = matches!(&self.streams[id], Some(s) if s.last <= head && Arc::strong_count(&s.origin) == 1);
            if !gone {
                continue;
            }
            let Some(s) = self.streams[id].take() else { continue };
            self.by_origin.remove(&(Arc::as_ptr(&s.origin) as usize));
            self.free.push(id as u32);
            if let Some((state, ring)) = &self.state {
                state.stream_gone(*ring, id as u32);
            }
            let slot = &mut self.sources[s.source as usize];
            if let Some(src) = slot {
                src.streams -= 1;
                if src.streams == 0 {
                    self.by_source.remove(&src.key);
                    *slot = None;
                    self.free_sources.push(s.source);
                }
            }
        }
        self.swept = self.by_origin.len();
    }

    fn entry(&self, id: u32) -> &Stream {
        match self.streams.get(id as usize) {
            Some(Some(s)) => s,
            // Ids come only from `stream`, and a slot is freed only when no record names it.
            _ => unreachable!("ring record names stream slot {id}, which is free"),
        }
    }

    fn parts(&mut self, id: u32) -> (&mut Stream, Option<&mut Source>, &mut Tenant) {
        let Some(Some(s)) = self.streams.get_mut(id as usize) else {
            unreachable!("ring record names stream slot {id}, which is free")
        };
        let source = self.sources.get_mut(s.source as usize).and_then(Option::as_mut);
        let tenant = &mut self.tenants[s.tenant as usize];
        (s, source, tenant)
    }

    /// The origin records of the stream carry when read out.
    pub fn origin(&self, id: u32) -> &Arc<Origin> {
        &self.entry(id).read
    }

    /// A record of `bytes` ending at `end` went into the ring.
    pub fn hold(&mut self, id: u32, bytes: u64, end: u64) {
        let (s, source, tenant) = self.parts(id);
        s.last = end;
        if let Some(src) = source {
            src.held += bytes;
        }
        tenant.held += bytes;
    }

    /// A record of `bytes` left the ring.
    pub fn release(&mut self, id: u32, bytes: u64) {
        let (_, source, tenant) = self.parts(id);
        if let Some(src) = source {
            src.held -= bytes;
        }
        tenant.held -= bytes;
    }

    /// What the stream's tenant and source hold: the order in which space is taken.
    pub fn weight(&self, id: u32) -> (u64, u64) {
        let s = self.entry(id);
        let source = self.sources.get(s.source as usize).and_then(Option::as_ref).map_or(0, |src| src.held);
        (self.tenants[s.tenant as usize].held, source)
    }

    /// Whether the stream's source would still hold at most `share` with `bytes` more, and its
    /// tenant too (or it is the only tenant with records): such streams may use the reserve
    /// that the ring keeps from the ones holding most.
    pub fn small(&self, id: u32, bytes: u64, share: u64) -> bool {
        let s = self.entry(id);
        let source = self.sources.get(s.source as usize).and_then(Option::as_ref).map_or(0, |src| src.held);
        if source + bytes > share {
            return false;
        }
        let tenant = s.tenant as usize;
        self.tenants[tenant].held + bytes <= share
            || self.tenants.iter().enumerate().all(|(i, t)| i == tenant || t.held == 0)
    }

    /// Whether the rate limits let `bytes` of the stream pass now.
    pub fn allows(&mut self, id: u32, bytes: usize, now: Instant) -> bool {
        let (_, source, tenant) = self.parts(id);
        source.and_then(|s| s.bucket.as_mut()).is_none_or(|b| b.allows(bytes, now))
            && tenant.bucket.as_mut().is_none_or(|b| b.allows(bytes, now))
    }

    /// `bytes` of the stream passed: taken from its rates.
    pub fn take(&mut self, id: u32, bytes: usize) {
        let (_, source, tenant) = self.parts(id);
        if let Some(b) = source.and_then(|s| s.bucket.as_mut()) {
            b.take(bytes);
        }
        if let Some(b) = tenant.bucket.as_mut() {
            b.take(bytes);
        }
    }

    /// How long until the rate limits let `bytes` of the stream pass.
    pub fn wait(&mut self, id: u32, bytes: usize, now: Instant) -> Duration {
        let (_, source, tenant) = self.parts(id);
        let a = source.and_then(|s| s.bucket.as_mut()).map_or(Duration::ZERO, |b| b.wait(bytes, now));
        let b = tenant.bucket.as_mut().map_or(Duration::ZERO, |b| b.wait(bytes, now));
        a.max(b)
    }

    /// A record of the stream was lost: counted against its stream (and so its source) and
    /// its tenant.
    pub fn dropped(&mut self, id: u32, bytes: u64) {
        let (s, _, tenant) = self.parts(id);
        s.origin.counters.dropped(1, bytes);
        tenant.dropped_records += 1;
        tenant.dropped_bytes += bytes;
    }

    /// A record of the stream was beyond its rate.
    pub fn throttled(&mut self, id: u32, bytes: u64) {
        let (s, _, tenant) = self.parts(id);
        s.origin.counters.throttled(1, bytes);
        tenant.throttled_records += 1;
        tenant.throttled_bytes += bytes;
    }

    pub fn tenants(&self) -> Vec<TenantSnapshot> {
        self.tenants
            .iter()
            .map(|t| TenantSnapshot {
                tenant: t.name.to_string(),
                held_bytes: t.held,
                dropped_records_total: t.dropped_records,
                dropped_bytes_total: t.dropped_bytes,
                throttled_records_total: t.throttled_records,
                throttled_bytes_total: t.throttled_bytes,
            })
            .collect()
    }

    /// The sources holding records now, most first.
    pub fn sources(&self) -> Vec<SourceSnapshot> {
        let mut out: Vec<SourceSnapshot> = self
            .streams
            .iter()
            .flatten()
            .map(|s| (s.source, s.tenant))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .filter_map(|(source, tenant)| {
                let src = self.sources.get(source as usize)?.as_ref()?;
                (src.held > 0).then(|| SourceSnapshot {
                    source: src.key.to_string(),
                    tenant: self.tenants[tenant as usize].name.to_string(),
                    held_bytes: src.held,
                })
            })
            .collect();
        out.sort_by(|a, b| b.held_bytes.cmp(&a.held_bytes).then_with(|| a.source.cmp(&b.source)));
        out
    }
}
