//! Local rate limits: a token bucket per key, at the inbound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sinew_model::compile::RateLimitConfig;

/// Keys remembered per limit; past this, idle buckets are forgotten (a full bucket
/// and a forgotten one behave the same), so hostile key values cannot exhaust memory.
const MAX_KEYS: usize = 10_000;

/// The bucket new keys share while the map is full.
const OVERFLOW_KEY: &str = "\0overflow";

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One configured limit and its buckets.
#[derive(Debug)]
pub struct RateLimiter {
    /// The configuration.
    pub config: RateLimitConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True when `cfg` is this limiter's configuration (kept across reloads).
    pub fn same(&self, cfg: &RateLimitConfig) -> bool {
        self.config == *cfg
    }

    /// Takes a token for `key`, or says how long until one is there.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let rate = self.config.requests_per_second;
        let burst = f64::from(self.config.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = key;
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            // Forget buckets that have refilled (they are equivalent to new ones).
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_KEYS {
                // Still full (a flood of distinct keys): new keys share one bucket, so
                // memory stays bounded and known keys keep their own limits.
                key = OVERFLOW_KEY;
            }
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            name: "t".into(),
            matches: vec![],
            key: None,
            requests_per_second: rps,
            burst,
        })
    }

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let l = limiter(10.0, 5);
        let t0 = Instant::now();
        assert_eq!((0..10).filter(|_| l.take("k", t0).is_ok()).count(), 5);
        let Err(wait) = l.take("k", t0) else {
            panic!("the sixth request must wait")
        };
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // One second later: 10 more tokens, capped at the burst of 5.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..10).filter(|_| l.take("k", t1).is_ok()).count(), 5);
        // Keys are independent.
        assert!(l.take("other", t1).is_ok());
    }

    #[test]
    fn keys_are_bounded() {
        let l = limiter(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS + 100) {
            let _ = l.take(&i.to_string(), t0 + Duration::from_secs(1));
        }
        assert!(l.buckets.lock().unwrap_or_else(|e| e.into_inner()).len() <= MAX_KEYS + 1);
        // The flood shares one bucket: of 100 more new keys, one gets through.
        let t1 = t0 + Duration::from_secs(1);
        let through = (0..100)
            .filter(|i| l.take(&format!("new-{i}"), t1).is_ok())
            .count();
        assert!(through <= 1, "{through}");
    }
}
