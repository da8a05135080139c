//! Rate limits at the inbound: a token bucket per key.
//!
//! A local limit holds per proxy. A global (mesh-wide) limit holds for all the
//! service's proxies together: each proxy enforces the share the control plane
//! leased it, reports the demand it sees every report interval, and falls back to
//! the fail-safe share, `1/N` of the limit, when its lease lapses or the control
//! plane is away.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sinew_model::compile::RateLimitConfig;

/// Keys remembered per limit; past this, idle buckets are forgotten (a full bucket
/// and a forgotten one behave the same), so hostile key values cannot exhaust memory.
const MAX_KEYS: usize = 10_000;

/// Keys a demand report carries per limit (the busiest).
pub const MAX_REPORTED_KEYS: usize = 256;

/// The bucket new keys share while the map is full.
const OVERFLOW_KEY: &str = "\0overflow";

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A lease: a share of a global limit for one key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyShare {
    /// Requests per second.
    pub rate: f64,
    /// Bucket size.
    pub burst: u32,
}

#[derive(Debug)]
struct Inner {
    buckets: HashMap<String, Bucket>,
    /// Global limits: proxies sharing it (1 until the control plane says).
    proxies: u32,
    /// Global limits: the leased shares, valid until `until`.
    leases: HashMap<String, KeyShare>,
    until: Option<Instant>,
    /// Global limits: arrivals per key since the last report, and the smoothed rate.
    arrivals: HashMap<String, u64>,
    demand: HashMap<String, f64>,
    reported_at: Option<Instant>,
}

/// One configured limit and its buckets.
#[derive(Debug)]
pub struct RateLimiter {
    /// The configuration.
    pub config: RateLimitConfig,
    inner: Mutex<Inner>,
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config,
            inner: Mutex::new(Inner {
                buckets: HashMap::new(),
                proxies: 1,
                leases: HashMap::new(),
                until: None,
                arrivals: HashMap::new(),
                demand: HashMap::new(),
                reported_at: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `cfg` is this limiter's configuration (kept across reloads).
    pub fn same(&self, cfg: &RateLimitConfig) -> bool {
        self.config == *cfg
    }

    /// Carries what is known about a global limit's sharing over from the limiter
    /// this one replaces (a changed rate keeps the same set of proxies).
    pub fn inherit(&self, prev: &RateLimiter) {
        let n = prev.lock().proxies;
        self.lock().proxies = n;
    }

    /// The fail-safe share: `1/N` of the limit.
    fn fallback(&self, proxies: u32) -> KeyShare {
        let n = f64::from(proxies.max(1));
        KeyShare {
            rate: self.config.requests_per_second / n,
            burst: ((f64::from(self.config.burst) / n).ceil() as u32).max(1),
        }
    }

    /// The rate and burst in force for `key` now.
    pub fn share(&self, key: &str, now: Instant) -> KeyShare {
        let inner = self.lock();
        self.share_locked(&inner, key, now)
    }

    fn share_locked(&self, inner: &Inner, key: &str, now: Instant) -> KeyShare {
        if !self.config.global {
            return KeyShare {
                rate: self.config.requests_per_second,
                burst: self.config.burst,
            };
        }
        match inner.until {
            Some(t) if t > now => inner
                .leases
                .get(key)
                .copied()
                .unwrap_or_else(|| self.fallback(inner.proxies)),
            _ => self.fallback(inner.proxies),
        }
    }

    /// Takes a token for `key`, or says how long until one is there.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut inner = self.lock();
        let mut key = key;
        if inner.buckets.len() >= MAX_KEYS && !inner.buckets.contains_key(key) {
            // Forget buckets that have refilled (they are equivalent to new ones).
            // A global limit's keys refill at their share; the fail-safe one stands in.
            let base = self.share_locked(&inner, "\0none", now);
            let (rate, burst) = (base.rate, f64::from(base.burst));
            inner.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if inner.buckets.len() >= MAX_KEYS {
                // Still full (a flood of distinct keys): new keys share one bucket, so
                // memory stays bounded and known keys keep their own limits.
                key = OVERFLOW_KEY;
            }
        }
        if self.config.global {
            let n = inner.arrivals.len();
            match inner.arrivals.get_mut(key) {
                Some(c) => *c += 1,
                None if n < MAX_KEYS => {
                    inner.arrivals.insert(key.to_owned(), 1);
                }
                None => {}
            }
        }
        let share = self.share_locked(&inner, key, now);
        let (rate, burst) = (share.rate, f64::from(share.burst));
        let b = inner.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else if rate > 0.0 {
            Err(Duration::from_secs_f64(
                ((1.0 - b.tokens) / rate).min(3600.0),
            ))
        } else {
            Err(Duration::from_secs(1))
        }
    }

    /// The demand since the last call, per key in requests per second (smoothed
    /// over reports; at most [`MAX_REPORTED_KEYS`], the busiest), for a global limit.
    pub fn take_demand(&self, now: Instant) -> HashMap<String, f64> {
        let mut inner = self.lock();
        let elapsed = inner
            .reported_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        inner.reported_at = Some(now);
        let arrivals = std::mem::take(&mut inner.arrivals);
        let mut demand = std::mem::take(&mut inner.demand);
        if elapsed > 0.0 {
            for d in demand.values_mut() {
                *d *= 0.5;
            }
            for (k, c) in arrivals {
                *demand.entry(k).or_insert(0.0) += 0.5 * c as f64 / elapsed;
            }
        }
        // Idle keys fade out of the report.
        demand.retain(|_, d| *d >= 0.01);
        if demand.len() > MAX_REPORTED_KEYS {
            let mut v: Vec<(String, f64)> = demand.into_iter().collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v.truncate(MAX_REPORTED_KEYS);
            demand = v.into_iter().collect();
        }
        inner.demand = demand.clone();
        demand
    }

    /// Installs the control plane's leases, valid until `until`.
    pub fn set_leases(&self, proxies: u32, leases: HashMap<String, KeyShare>, until: Instant) {
        let mut inner = self.lock();
        inner.proxies = proxies.max(1);
        inner.leases = leases;
        inner.until = Some(until);
    }

    /// What the admin `/ratelimits` shows: the limit, and for a global one how many
    /// share it, whether a lease holds, and the shares in force (busiest keys first).
    pub fn status(&self, now: Instant) -> serde_json::Value {
        let inner = self.lock();
        let c = &self.config;
        let mut v = serde_json::json!({
            "name": c.name,
            "global": c.global,
            "requestsPerSecond": c.requests_per_second,
            "burst": c.burst,
        });
        if c.global {
            let leased = inner.until.is_some_and(|t| t > now);
            let fallback = self.fallback(inner.proxies);
            let mut keys: Vec<(&String, f64)> = inner.demand.iter().map(|(k, d)| (k, *d)).collect();
            keys.sort_by(|a, b| b.1.total_cmp(&a.1));
            let shares: serde_json::Map<String, serde_json::Value> = keys
                .into_iter()
                .take(50)
                .map(|(k, d)| {
                    let s = self.share_locked(&inner, k, now);
                    (
                        k.clone(),
                        serde_json::json!({"demand": d, "requestsPerSecond": s.rate, "burst": s.burst}),
                    )
                })
                .collect();
            v["proxies"] = inner.proxies.into();
            v["leased"] = leased.into();
            v["defaultShare"] =
                serde_json::json!({"requestsPerSecond": fallback.rate, "burst": fallback.burst});
            v["shares"] = shares.into();
        }
        v
    }

    /// Drops the leases (the control plane is away): the fail-safe share holds.
    pub fn lapse(&self) {
        let mut inner = self.lock();
        inner.leases.clear();
        inner.until = None;
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
            global: false,
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

    fn global(rps: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            name: "g".into(),
            matches: vec![],
            key: None,
            requests_per_second: rps,
            burst,
            global: true,
        })
    }

    #[test]
    fn a_global_limit_enforces_its_lease_and_falls_back_to_one_nth() {
        let l = global(90.0, 30);
        let t0 = Instant::now();
        // Before any lease: the whole limit (no one is known to share it).
        assert_eq!(
            l.share("", t0),
            KeyShare {
                rate: 90.0,
                burst: 30
            }
        );
        let lease = KeyShare {
            rate: 60.0,
            burst: 20,
        };
        l.set_leases(
            3,
            [(String::new(), lease)].into(),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(l.share("", t0), lease);
        // A key without a lease gets 1/N.
        assert_eq!(
            l.share("other", t0),
            KeyShare {
                rate: 30.0,
                burst: 10
            }
        );
        // The bucket holds the leased burst, then refills at the leased rate.
        assert_eq!((0..40).filter(|_| l.take("", t0).is_ok()).count(), 20);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..40).filter(|_| l.take("", t1).is_ok()).count(), 20);
        // The lease lapses: 1/3 of the limit, and the bucket is capped to that burst.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(
            l.share("", t2),
            KeyShare {
                rate: 30.0,
                burst: 10
            }
        );
        assert_eq!((0..40).filter(|_| l.take("", t2).is_ok()).count(), 10);
        // Dropped at once when the control plane goes away.
        l.set_leases(
            3,
            [(String::new(), lease)].into(),
            t2 + Duration::from_secs(1),
        );
        l.lapse();
        assert_eq!(
            l.share("", t2),
            KeyShare {
                rate: 30.0,
                burst: 10
            }
        );
    }

    #[test]
    fn demand_counts_every_arrival_per_key_and_fades() {
        let l = global(10.0, 1);
        let t0 = Instant::now();
        assert!(l.take_demand(t0).is_empty());
        // 40 arrivals in one second, most of them refused: the demand is 40 rps,
        // smoothed by half per report.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..40 {
            let _ = l.take("a", t1);
        }
        let _ = l.take("b", t1);
        let d = l.take_demand(t1);
        assert_eq!(d.get("a").copied(), Some(20.0));
        assert_eq!(d.get("b").copied(), Some(0.5));
        for _ in 0..40 {
            let _ = l.take("a", t1);
        }
        let d = l.take_demand(t1 + Duration::from_secs(1));
        assert_eq!(d.get("a").copied(), Some(30.0));
        assert_eq!(d.get("b").copied(), Some(0.25));
        // Idle keys fade out.
        let mut t = t1 + Duration::from_secs(1);
        for _ in 0..12 {
            t += Duration::from_secs(1);
            let _ = l.take_demand(t);
        }
        assert!(l.take_demand(t + Duration::from_secs(1)).is_empty());
        // Reports are bounded to the busiest keys.
        for i in 0..(MAX_REPORTED_KEYS + 50) {
            for _ in 0..(1 + i % 3) {
                let _ = l.take(&i.to_string(), t);
            }
        }
        let d = l.take_demand(t + Duration::from_secs(2));
        assert_eq!(d.len(), MAX_REPORTED_KEYS);
        assert!(d.values().all(|v| *v >= 0.5), "the busiest keys are kept");
    }

    #[test]
    fn keys_are_bounded() {
        let l = limiter(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS + 100) {
            let _ = l.take(&i.to_string(), t0 + Duration::from_secs(1));
        }
        assert!(l.lock().buckets.len() <= MAX_KEYS + 1);
        // The flood shares one bucket: of 100 more new keys, one gets through.
        let t1 = t0 + Duration::from_secs(1);
        let through = (0..100)
            .filter(|i| l.take(&format!("new-{i}"), t1).is_ok())
            .count();
        assert!(through <= 1, "{through}");
    }
}
