//! The stdout sink: one JSON line per record on the agent's stdout, for debugging and pipes.

use std::io::Write;

use super::{Delivery, DeliveryError, Sink};
use crate::record::Record;

/// `type = "stdout"`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutSinkConfig {
    pub optional: bool,
}

pub struct StdoutSink {
    buf: Vec<u8>,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self { buf: Vec::with_capacity(1 << 20) }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for StdoutSink {
    fn deliver(&mut self, records: &[Record]) -> Delivery {
        Box::pin(std::future::ready(self.write(records)))
    }
}

impl StdoutSink {
    fn write(&mut self, records: &[Record]) -> Result<(), DeliveryError> {
        self.buf.clear();
        for r in records {
            r.to_json_line(&mut self.buf);
        }
        // A blocking write: this sink has its own thread, and a reader that stops reading
        // stalls this sink only.
        let mut out = std::io::stdout().lock();
        out.write_all(&self.buf)
            .and_then(|()| out.flush())
            .map_err(|e| DeliveryError::after(0, records.len(), anyhow::Error::new(e).context("writing to stdout")))
    }
}
