//! The stdout sink: one JSON line per record on the agent's stdout, for debugging and pipes; a
//! sealed record is its base64 line, as in the files sink.

use std::io::Write;

use super::{Delivery, DeliveryError, Outgoing, Sink};
use crate::encryption::sealed::Sealer;

/// `type = "stdout"`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutSinkConfig {
    pub optional: bool,
}

pub struct StdoutSink {
    buf: Vec<u8>,
    json: Vec<u8>,
    sealed: Vec<u8>,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self { buf: Vec::with_capacity(1 << 20), json: Vec::new(), sealed: Vec::new() }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for StdoutSink {
    fn deliver(&mut self, records: &[Outgoing]) -> Delivery {
        Box::pin(std::future::ready(self.write(records)))
    }
}

impl StdoutSink {
    fn write(&mut self, records: &[Outgoing]) -> Result<(), DeliveryError> {
        self.buf.clear();
        let mut sealer = Sealer::new();
        for o in records {
            let Some(key) = &o.key else {
                o.record.to_json_line(&mut self.buf);
                continue;
            };
            self.json.clear();
            self.sealed.clear();
            o.record.to_json(&mut self.json);
            let fail = |e| DeliveryError::after(0, records.len(), anyhow::Error::new(e).context("sealing a record"));
            sealer.seal(key, &o.record, &self.json, &mut self.sealed).map_err(fail)?;
            base64_simd::STANDARD.encode_append(&self.sealed, &mut self.buf);
            self.buf.push(b'\n');
        }
        // A blocking write: this sink has its own thread, and a reader that stops reading
        // stalls this sink only.
        let mut out = std::io::stdout().lock();
        out.write_all(&self.buf)
            .and_then(|()| out.flush())
            .map_err(|e| DeliveryError::after(0, records.len(), anyhow::Error::new(e).context("writing to stdout")))
    }
}
