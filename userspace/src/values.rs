//! Value types of the configuration and the API: sizes, durations, time zones, file modes; and
//! the one poison-tolerant lock every module takes its mutexes with.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Locks `m`; a thread that panicked while holding it leaves data that is still consistent
/// enough to count and serve (every critical section here is a plain update).
/// 64 random bits (getrandom; the clock if the pool cannot answer, which it does once ready).
pub fn random_u64() -> u64 {
    let mut bits = [0u8; 8];
    // SAFETY: the buffer is valid for its length.
    let got = unsafe { libc::getrandom(bits.as_mut_ptr().cast(), bits.len(), 0) };
    if got != bits.len() as isize {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return nanos.as_nanos() as u64;
    }
    u64::from_le_bytes(bits)
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A size in bytes: an integer, or a string such as `"64MiB"`, `"256KiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(digits);
        let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number and a unit like 64MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" => 1000,
            "MB" => 1000 * 1000,
            "GB" => 1000 * 1000 * 1000,
            other => return Err(format!("invalid size unit {other:?} in {s:?}: use B, KiB, MiB, GiB, KB, MB or GB")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (mult, unit) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if n >= mult && n % mult == 0 {
                return write!(f, "{}{unit}", n / mult);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("expected a size: bytes as an integer, or a string like \"64MiB\""))?
        {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// A duration written as a string: `"200ms"`, `"1s"`, `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)
            .map_err(|_| de::Error::custom("expected a duration string like \"200ms\" or \"5s\""))?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// A named time zone such as `"UTC"` or `"Asia/Shanghai"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timezone(pub chrono_tz::Tz);

impl<'de> Deserialize<'de> for Timezone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<chrono_tz::Tz>().map(Timezone).map_err(|_| {
            de::Error::custom(format!("unknown time zone {s:?}: use an IANA name like \"UTC\" or \"Asia/Shanghai\""))
        })
    }
}

/// A Unix file mode written as an octal string (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| de::Error::custom("expected an octal mode string like \"0660\""))?;
        match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o7777 => Ok(Mode(m)),
            _ => Err(de::Error::custom(format!("invalid mode {s:?}: expected octal like \"0660\""))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("64MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("10"), Ok(ByteSize(10)));
        assert_eq!(ByteSize::parse("2KB"), Ok(ByteSize(2000)));
        assert!(ByteSize::parse("1XB").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
        assert_eq!(ByteSize(256 << 10).to_string(), "256KiB");
    }
}
