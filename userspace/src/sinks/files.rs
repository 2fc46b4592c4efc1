//! The files sink: `{dir}/{service}/{module}.{YYYYMMDD}`, one record per line (its bytes, or its
//! JSON envelope with the identity), the day taken in the configured time zone (the Flume
//! consumer layout). Sealed records go to their tenant's own directory,
//! `{dir}/tenants/{tenant}/{service}/{module}.{YYYYMMDD}`, one per line in standard base64
//! (`logtap decrypt` reads them).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use super::{Delivery, DeliveryError, Outgoing, Sink};
use crate::encryption::sealed::Sealer;
use crate::sinks::Format;
use crate::values::Timezone;

/// Cuts a line left unfinished at the end of `file` (a worker killed in the middle of writing
/// it): the record was not acknowledged, so it comes again whole; the piece would otherwise
/// join it into one line.
fn drop_torn_line(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let from = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - from) as usize];
        file.read_exact_at(chunk, from)?;
        if let Some(nl) = memchr::memrchr(b'\n', chunk) {
            end = from + nl as u64 + 1;
            break;
        }
        end = from;
    }
    if end < len {
        tracing::warn!(bytes = len - end, "a line torn by a killed worker is cut; its record is delivered again whole");
        file.set_len(end)?;
    }
    Ok(())
}

/// Files kept open at most; the least recently used is closed beyond this.
const MAX_OPEN: usize = 256;
/// A file unused this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(300);

struct OpenFile {
    day: String,
    writer: BufWriter<File>,
    last_used: Instant,
}

/// `type = "files"`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSinkConfig {
    pub dir: PathBuf,
    /// Zone that decides the day in `{service}/{module}.{YYYYMMDD}`.
    pub timezone: Timezone,
    /// `raw`: the line's bytes; `json`: the record's envelope with its identity.
    pub format: Format,
    pub optional: bool,
}

impl Default for FilesSinkConfig {
    fn default() -> Self {
        Self { dir: "/var/log/logtap".into(), timezone: Timezone(chrono_tz::UTC), format: Format::Raw, optional: false }
    }
}

pub struct FilesSink {
    dir: PathBuf,
    tz: chrono_tz::Tz,
    format: Format,
    /// By sealed tenant (none for records in clear), service and module.
    open: HashMap<FileKey, OpenFile>,
    /// One record's JSON line, reused.
    json: Vec<u8>,
    /// One sealed record and its base64 line, reused.
    sealed: Vec<u8>,
    line: String,
}

type FileKey = (Option<Arc<str>>, Arc<str>, Arc<str>);

/// Where sealed records go, below the sink's directory: `tenants/{tenant}/`.
pub const TENANTS_DIR: &str = "tenants";

/// A name made safe as one path component: no separators, no leading dot, bounded length.
pub fn path_component(name: &str) -> String {
    let mut s: String = name.chars().map(|c| if logtap_fusefs::is_name_char(c) { c } else { '_' }).take(200).collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    s
}

impl FilesSink {
    pub fn new(config: &FilesSinkConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.dir).with_context(|| format!("cannot create {}", config.dir.display()))?;
        Ok(Self {
            dir: config.dir.clone(),
            tz: config.timezone.0,
            format: config.format,
            open: HashMap::new(),
            json: Vec::new(),
            sealed: Vec::new(),
            line: String::new(),
        })
    }

    fn day(&self, at: SystemTime) -> String {
        let utc: chrono::DateTime<chrono::Utc> = at.into();
        utc.with_timezone(&self.tz).format("%Y%m%d").to_string()
    }

    /// The file of a service's module on a day; of a tenant's sealed records with `tenant`.
    pub fn path_for(dir: &Path, tenant: Option<&str>, service: &str, module: &str, day: &str) -> PathBuf {
        let base = match tenant {
            Some(t) => dir.join(TENANTS_DIR).join(path_component(t)),
            None => dir.to_path_buf(),
        };
        base.join(path_component(service)).join(format!("{}.{day}", path_component(module)))
    }

    fn writer(&mut self, o: &Outgoing, day: String) -> anyhow::Result<&mut OpenFile> {
        let r = &o.record;
        let key = (o.key.as_ref().map(|k| k.tenant.clone()), r.origin.service.clone(), r.origin.module.clone());
        let stale = self.open.get(&key).is_some_and(|f| f.day != day);
        if stale {
            if let Some(mut old) = self.open.remove(&key) {
                old.writer.flush().context("flushing the previous day's file")?;
            }
        }
        if !self.open.contains_key(&key) {
            if self.open.len() >= MAX_OPEN {
                self.close_least_recent()?;
            }
            let path = Self::path_for(&self.dir, key.0.as_deref(), &key.1, &key.2, &day);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            drop_torn_line(&file).with_context(|| format!("cannot check the end of {}", path.display()))?;
            self.open.insert(
                key.clone(),
                OpenFile { day, writer: BufWriter::with_capacity(256 << 10, file), last_used: Instant::now() },
            );
        }
        self.open.get_mut(&key).context("file just opened is missing")
    }

    fn close_least_recent(&mut self) -> anyhow::Result<()> {
        if let Some(key) = self.open.iter().min_by_key(|(_, f)| f.last_used).map(|(k, _)| k.clone()) {
            if let Some(mut f) = self.open.remove(&key) {
                f.writer.flush().context("flushing a file being closed")?;
            }
        }
        Ok(())
    }

    fn flush_all(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for f in self.open.values_mut() {
            f.writer.flush().context("flushing")?;
        }
        self.open.retain(|_, f| now.duration_since(f.last_used) < IDLE_CLOSE);
        Ok(())
    }

    fn write(&mut self, records: &[Outgoing]) -> Result<(), DeliveryError> {
        let format = self.format;
        let mut json = std::mem::take(&mut self.json);
        let mut sealed = std::mem::take(&mut self.sealed);
        let mut line = std::mem::take(&mut self.line);
        let mut sealer = Sealer::new();
        let mut at = 0;
        while at < records.len() {
            // A run: records of one stream and key captured within the same second share a file.
            let first = &records[at];
            let secs = |o: &Outgoing| {
                o.record.captured_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
            };
            let second = secs(first);
            let same_key = |o: &Outgoing| match (&o.key, &first.key) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            };
            let run = records[at..]
                .iter()
                .take_while(|o| Arc::ptr_eq(&o.record.origin, &first.record.origin) && same_key(o) && secs(o) == second)
                .count();
            // What is buffered is not yet delivered: on error the whole batch is offered again.
            let fail = |error: anyhow::Error| DeliveryError::after(0, records.len(), error);
            let day = self.day(first.record.captured_at);
            let f = self.writer(first, day).map_err(fail)?;
            f.last_used = Instant::now();
            for o in &records[at..at + run] {
                let r = &o.record;
                let value: &[u8] = match format {
                    Format::Raw => &r.bytes,
                    Format::Json => {
                        json.clear();
                        r.to_json(&mut json);
                        &json
                    }
                };
                let written = match &o.key {
                    None => f.writer.write_all(value).and_then(|()| f.writer.write_all(b"\n")),
                    Some(key) => {
                        sealed.clear();
                        line.clear();
                        sealer.seal(key, r, value, &mut sealed).and_then(|()| {
                            base64_simd::STANDARD.encode_append(&sealed, &mut line);
                            line.push('\n');
                            f.writer.write_all(line.as_bytes())
                        })
                    }
                };
                written.map_err(|e| fail(anyhow::Error::new(e).context("writing a record")))?;
            }
            at += run;
        }
        self.json = json;
        self.sealed = sealed;
        self.line = line;
        // Buffered lines of earlier records may be lost with the error: offer the whole batch again.
        self.flush_all().map_err(|error| DeliveryError::after(0, records.len(), error))
    }
}

impl Sink for FilesSink {
    fn deliver(&mut self, records: &[Outgoing]) -> Delivery {
        // Plain blocking file I/O, done before returning: this sink runs on its own thread.
        Box::pin(std::future::ready(self.write(records)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;

    #[test]
    fn a_torn_last_line_is_cut_and_whole_lines_stay() {
        use std::io::Write;
        for (content, kept) in [("a\nb\npart", "a\nb\n"), ("a\n", "a\n"), ("torn", ""), ("", "")] {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(content.as_bytes()).unwrap();
            drop_torn_line(&f).unwrap();
            assert_eq!(f.metadata().unwrap().len(), kept.len() as u64, "{content:?}");
        }
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(format!("first\n{}", "x".repeat(200_000)).as_bytes()).unwrap();
        drop_torn_line(&f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 6, "a torn line longer than one look back");
    }

    #[test]
    fn components_cannot_escape_the_directory() {
        assert_eq!(path_component("../../etc"), "_.._.._etc");
        assert_eq!(path_component(".."), "_..");
        assert_eq!(path_component(""), "_");
        assert_eq!(path_component("a/b"), "a_b");
        assert_eq!(path_component("web-1"), "web-1");
        assert_eq!(path_component(&"x".repeat(300)).len(), 200);
    }

    #[test]
    fn writes_one_line_per_record_by_service_module_and_day() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FilesSink::new(&FilesSinkConfig {
            dir: dir.path().into(),
            timezone: Timezone(chrono_tz::Asia::Shanghai),
            format: Format::Raw,
            optional: false,
        })
        .unwrap();
        let mut a = record(b"first");
        // 2024-01-31 20:00 UTC is 2024-02-01 04:00 in Shanghai.
        a.captured_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_706_731_200);
        let mut b = record(&[0xff, b'x']);
        b.captured_at = a.captured_at;
        sink.write(&[Outgoing::clear(a), Outgoing::clear(b)]).unwrap();
        let text = std::fs::read(dir.path().join("svc/app.20240201")).unwrap();
        assert_eq!(text, b"first\n\xffx\n");
    }

    #[test]
    fn json_lines_carry_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FilesSink::new(&FilesSinkConfig {
            dir: dir.path().into(),
            timezone: Timezone(chrono_tz::UTC),
            format: Format::Json,
            optional: false,
        })
        .unwrap();
        let mut r = record(b"hello");
        let container = crate::api::Container { id: "c1".into(), name: "web".into(), ..Default::default() };
        r.origin = Arc::new(crate::record::Origin {
            tenant: "acme".into(),
            container: Some(Arc::new(container)),
            counters: r.origin.counters.clone(),
            host: r.origin.host.clone(),
            pid: 7,
            volume: "".into(),
            service: "svc".into(),
            module: "stdout".into(),
            path: "stdout".into(),
        });
        sink.write(&[Outgoing::clear(r)]).unwrap();
        let text = std::fs::read_to_string(dir.path().join("svc/stdout.19700101")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["message"], "hello");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["container"]["name"], "web");
        assert_eq!(v["pid"], 7);
    }
}
