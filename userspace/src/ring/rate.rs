//! A byte-rate limit: a token bucket, with time passed in.

use std::time::{Duration, Instant};

/// How much of a second's rate may pass at once: a short burst, so that the rate holds over
/// any second, not only on average.
const BURST: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct Bucket {
    /// Bytes per second.
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        Self { rate, tokens: rate * BURST, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * BURST);
        self.at = now;
    }

    /// Whether `bytes` may pass now. A record larger than the burst passes once the bucket is
    /// full, leaving it in debt: the rate holds on average whatever the record sizes.
    pub fn allows(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= (bytes as f64).min(self.rate * BURST)
    }

    pub fn take(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// How long until `bytes` may pass.
    pub fn wait(&mut self, bytes: usize, now: Instant) -> Duration {
        self.refill(now);
        let short = (bytes as f64).min(self.rate * BURST) - self.tokens;
        Duration::from_secs_f64((short / self.rate).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_over_a_second_whatever_the_record_sizes() {
        let t0 = Instant::now();
        for size in [1usize, 100, 4096, 200_000] {
            let mut b = Bucket::new(1_000_000, t0);
            let mut passed = 0;
            // Offer 10x the rate, in steps of 1 ms, for one second.
            for ms in 0..1000u64 {
                let now = t0 + Duration::from_millis(ms);
                for _ in 0..(10_000 / size).max(1) {
                    if b.allows(size, now) {
                        b.take(size);
                        passed += size;
                    }
                }
            }
            let rate = passed as f64 / 1_000_000.0;
            assert!((0.9..=1.1 + size as f64 / 1e6).contains(&rate), "size {size}: {rate}");
        }
    }

    #[test]
    fn wait_says_when_the_bytes_may_pass() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        assert!(b.allows(100, t0));
        b.take(100);
        assert!(!b.allows(50, t0));
        let w = b.wait(50, t0);
        assert_eq!(w, Duration::from_millis(50));
        assert!(b.allows(50, t0 + w));
    }
}
