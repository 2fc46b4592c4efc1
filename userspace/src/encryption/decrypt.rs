//! `logtap decrypt`: sealed records back to the values a sink would have written in clear.
//!
//! Input is either the files sink's lines (one sealed record in standard base64 per line) or
//! sealed records back to back (Kafka values as a consumer writes them), told apart by the
//! first bytes. Every record that does not open is reported with where it is and why, and
//! counted; the others are written out, one value a line.

use std::io::{self, BufRead, Write};

use base64::Engine;

use super::keys::KeySet;
use super::sealed::{self, OpenError, MAGIC};

/// What a decryption run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decrypted {
    pub opened: u64,
    pub failed: u64,
}

/// Opens records of `input` (called `name` in messages) with `keys`, writing values to `out`
/// and failures to `errors`. With `tenant`, a record of another tenant is a failure: it was
/// moved into this tenant's stream.
pub struct Decryptor<'a, O: Write, E: Write> {
    pub keys: &'a KeySet,
    pub tenant: Option<&'a str>,
    pub out: O,
    pub errors: E,
    pub done: Decrypted,
}

impl<O: Write, E: Write> Decryptor<'_, O, E> {
    fn one(&mut self, data: &[u8], at: &dyn Fn() -> String) -> io::Result<Option<usize>> {
        let parsed = match sealed::parse(data) {
            Ok(p) => p,
            Err(e) => {
                self.fail(at, &e.to_string())?;
                return Ok(None);
            }
        };
        let result = match self.tenant {
            Some(t) if parsed.identity.tenant != t => {
                Err(format!("a record of tenant {:?} in the stream of tenant {t:?}", parsed.identity.tenant))
            }
            _ => parsed.open(self.keys).map_err(|e| e.to_string()),
        };
        match result {
            Ok(value) => {
                self.out.write_all(&value)?;
                self.out.write_all(b"\n")?;
                self.done.opened += 1;
            }
            Err(reason) => self.fail(at, &reason)?,
        }
        Ok(Some(parsed.len))
    }

    fn fail(&mut self, at: &dyn Fn() -> String, reason: &str) -> io::Result<()> {
        self.done.failed += 1;
        writeln!(self.errors, "{}: {reason}", at())
    }

    /// Reads all of `input`.
    pub fn read(&mut self, name: &str, mut input: impl BufRead) -> io::Result<()> {
        if input.fill_buf()?.starts_with(&MAGIC) {
            return self.read_binary(name, input);
        }
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            if input.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            number += 1;
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let at = || format!("{name}:{number}");
            match base64::engine::general_purpose::STANDARD.decode(text) {
                Ok(data) => {
                    if let Some(used) = self.one(&data, &at)? {
                        if used != data.len() {
                            self.fail(&at, "bytes after the sealed record")?;
                        }
                    }
                }
                Err(e) => self.fail(&at, &format!("not a sealed record line (base64: {e})"))?,
            }
        }
    }

    fn read_binary(&mut self, name: &str, mut input: impl BufRead) -> io::Result<()> {
        let mut data = Vec::new();
        let mut offset = 0u64;
        let mut number = 0u64;
        let mut eof = false;
        loop {
            // Whole records are opened as soon as they are in; the rest waits for more input.
            while !data.is_empty() {
                match sealed::parse(&data) {
                    Err(OpenError::Truncated) if !eof => break,
                    _ => {}
                }
                number += 1;
                let at = || format!("{name}: record {number} at byte {offset}");
                let Some(used) = self.one(&data, &at)? else {
                    // Without a readable header there is no telling where the next record starts.
                    return Ok(());
                };
                data.drain(..used);
                offset += used as u64;
            }
            if eof {
                return Ok(());
            }
            let chunk = input.fill_buf()?;
            if chunk.is_empty() {
                eof = true;
                continue;
            }
            data.extend_from_slice(chunk);
            let n = chunk.len();
            input.consume(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::encryption::keys::tests::keyset;
    use crate::encryption::sealed::Sealer;
    use crate::record::tests::record;

    fn run(keys: &KeySet, tenant: Option<&str>, input: &[u8]) -> (String, String, Decrypted) {
        let mut d = Decryptor { keys, tenant, out: Vec::new(), errors: Vec::new(), done: Decrypted::default() };
        d.read("in", input).unwrap();
        (String::from_utf8(d.out).unwrap(), String::from_utf8(d.errors).unwrap(), d.done)
    }

    #[test]
    fn lines_and_back_to_back_records_open_and_every_failure_is_counted_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keyset(dir.path(), &[("acme", "k1", 1), ("globex", "k1", 2)]);
        let acme = keys.sealing("acme").unwrap().clone();
        let globex = keys.sealing("globex").unwrap().clone();
        let mut sealer = Sealer::new();
        let seal = |sealer: &mut Sealer, key: &Arc<_>, text: &[u8]| {
            let mut out = Vec::new();
            sealer.seal(key, &record(text), text, &mut out).unwrap();
            out
        };
        let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
        let (one, two, other) =
            (seal(&mut sealer, &acme, b"one"), seal(&mut sealer, &acme, b"two"), seal(&mut sealer, &globex, b"g"));
        let mut flipped = two.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;

        let lines = format!("{}\n\n{}\n{}\nplain text\n{}\n", b64(&one), b64(&flipped), b64(&other), b64(&two));
        let (out, errors, done) = run(&keys, Some("acme"), lines.as_bytes());
        assert_eq!(out, "one\ntwo\n");
        assert_eq!(done, Decrypted { opened: 2, failed: 3 });
        let e: Vec<&str> = errors.lines().collect();
        assert!(e[0].starts_with("in:3: authentication failed"), "{errors}");
        assert!(e[1].starts_with("in:4: a record of tenant \"globex\""), "{errors}");
        assert!(e[2].starts_with("in:5: not a sealed record line"), "{errors}");

        // Without a tenant, each record opens with its own tenant's key.
        let (out, _, done) = run(&keys, None, lines.as_bytes());
        assert_eq!((out.as_str(), done.failed), ("one\ng\ntwo\n", 2), "the flipped bit and the plain line");

        let binary = [one.clone(), other.clone(), two.clone()].concat();
        let (out, errors, done) = run(&keys, None, &binary);
        assert_eq!((out.as_str(), done), ("one\ng\ntwo\n", Decrypted { opened: 3, failed: 0 }), "{errors}");
        let (out, errors, done) = run(&keys, Some("acme"), &binary[..binary.len() - 3]);
        assert_eq!((out.as_str(), done.failed), ("one\n", 2), "{errors}");
        assert!(errors.contains("record 3 at byte") && errors.contains("cut short"), "{errors}");

        let only_globex = keyset(tempfile::tempdir().unwrap().path(), &[("globex", "k1", 2)]);
        let (_, errors, done) = run(&only_globex, None, &one);
        assert_eq!(done.failed, 1);
        assert!(errors.contains("no key acme.k1.key"), "{errors}");
    }
}
