//! Request counters and a fixed-bucket latency histogram.
//!
//! A demo app keeps one [`Recorder`] and serves it at `GET /stats` as [`Stats`]. The
//! counters are cumulative, so a reader takes two snapshots and works on their
//! difference ([`Counters::since`]) to get the rate, success rate and percentiles of
//! that interval ([`Counters::summarize`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (inclusive, in milliseconds) of the latency buckets. One more bucket,
/// `+Inf`, follows the last bound.
pub const BUCKET_BOUNDS_MS: [f64; 21] = [
    0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0,
    500.0, 750.0, 1000.0, 2000.0, 5000.0,
];

const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;

/// Counts requests, errors and latencies; cheap to share between tasks.
#[derive(Debug)]
pub struct Recorder {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder.
    #[must_use]
    pub fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Records one finished request: how long it took and whether it succeeded.
    pub fn record(&self, elapsed: Duration, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let index = BUCKET_BOUNDS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(BUCKET_BOUNDS_MS.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a failed request that never got an answer (so has no latency).
    pub fn record_unanswered(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    #[must_use]
    pub fn snapshot(&self) -> Counters {
        Counters {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_ms_buckets: Buckets {
                le: BUCKET_BOUNDS_MS.to_vec(),
                counts: self
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
            },
        }
    }
}

/// A latency histogram: `counts[i]` requests took at most `le[i]` ms (and more than
/// `le[i - 1]`); the last count, one past the end of `le`, is the `+Inf` bucket.
/// Counts are per bucket, not cumulative.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Buckets {
    /// Bucket upper bounds in milliseconds, ascending.
    pub le: Vec<f64>,
    /// Requests per bucket; `le.len() + 1` entries.
    pub counts: Vec<u64>,
}

/// Cumulative request counters (or, from [`Counters::since`], those of an interval).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests answered (`GET /` and gRPC `Hello`; not `/stats` or `/healthz`).
    pub requests: u64,
    /// Of those, the ones answered with a 5xx status (or a gRPC error).
    pub errors: u64,
    /// Latency histogram of the same requests.
    pub latency_ms_buckets: Buckets,
}

/// What `GET /stats` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Service name.
    pub service: String,
    /// Service version.
    pub version: String,
    /// Instance id.
    pub instance: String,
    /// The counters.
    #[serde(flatten)]
    pub counters: Counters,
}

/// One interval, summarised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Requests in the interval.
    pub requests: u64,
    /// Requests per second.
    pub rate: f64,
    /// Percentage of requests that succeeded; `None` without requests.
    pub success_pct: Option<f64>,
    /// Median latency (ms), estimated from the buckets; `None` without requests.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency (ms), estimated from the buckets; `None` without requests.
    pub p99_ms: Option<f64>,
}

impl Counters {
    /// The counters of the interval from `earlier` to `self`. A counter that went
    /// backwards (the app restarted) counts from zero.
    #[must_use]
    pub fn since(&self, earlier: &Counters) -> Counters {
        let restarted = self.requests < earlier.requests
            || self.latency_ms_buckets.le != earlier.latency_ms_buckets.le;
        if restarted {
            return self.clone();
        }
        let counts = self
            .latency_ms_buckets
            .counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                n.saturating_sub(
                    earlier
                        .latency_ms_buckets
                        .counts
                        .get(i)
                        .copied()
                        .unwrap_or(0),
                )
            })
            .collect();
        Counters {
            requests: self.requests - earlier.requests,
            errors: self.errors.saturating_sub(earlier.errors),
            latency_ms_buckets: Buckets {
                le: self.latency_ms_buckets.le.clone(),
                counts,
            },
        }
    }

    /// Estimates the `q` quantile (0..=1) of latency in ms by linear interpolation
    /// inside the bucket that holds it. Requests in the `+Inf` bucket count as the
    /// largest bound. `None` without requests.
    #[must_use]
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let Buckets { le, counts } = &self.latency_ms_buckets;
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let lower = if i == 0 {
                    0.0
                } else {
                    le.get(i - 1).copied().unwrap_or(0.0)
                };
                let Some(&upper) = le.get(i) else {
                    return Some(lower);
                };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        le.last().copied()
    }

    /// Rate, success rate and percentiles of these counters over `elapsed`.
    #[must_use]
    pub fn summarize(&self, elapsed: Duration) -> Summary {
        let secs = elapsed.as_secs_f64();
        Summary {
            requests: self.requests,
            rate: if secs > 0.0 {
                self.requests as f64 / secs
            } else {
                0.0
            },
            success_pct: (self.requests > 0).then(|| {
                100.0 * self.requests.saturating_sub(self.errors) as f64 / self.requests as f64
            }),
            p50_ms: self.quantile_ms(0.50),
            p99_ms: self.quantile_ms(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn records_into_the_right_buckets_and_summarises_an_interval() {
        let r = Recorder::new();
        r.record(Duration::from_micros(300), true); // <= 0.5
        r.record(Duration::from_millis(4), true); // <= 5
        let before = r.snapshot();
        for _ in 0..98 {
            r.record(Duration::from_millis(4), true);
        }
        r.record(Duration::from_millis(40), false); // <= 50
        r.record(Duration::from_secs(9), false); // +Inf
        let delta = r.snapshot().since(&before);
        assert_eq!(delta.requests, 100);
        assert_eq!(delta.errors, 2);
        assert_eq!(
            delta.latency_ms_buckets.counts.len(),
            BUCKET_BOUNDS_MS.len() + 1
        );
        assert_eq!(delta.latency_ms_buckets.counts[0], 0);
        assert_eq!(delta.latency_ms_buckets.counts[4], 98);
        assert_eq!(delta.latency_ms_buckets.counts[BUCKET_BOUNDS_MS.len()], 1);

        let s = delta.summarize(Duration::from_secs(2));
        assert_eq!(s.requests, 100);
        assert!((s.rate - 50.0).abs() < 1e-9);
        assert!((s.success_pct.unwrap() - 98.0).abs() < 1e-9);
        let p50 = s.p50_ms.unwrap();
        assert!((3.0..=5.0).contains(&p50), "{p50}");
        let p99 = s.p99_ms.unwrap();
        assert!((30.0..=50.0).contains(&p99), "{p99}");
        assert_eq!(delta.quantile_ms(1.0), Some(5000.0));
    }

    #[test]
    fn empty_intervals_have_no_percentiles_and_restarts_count_from_zero() {
        let empty = Counters::default();
        let s = empty.summarize(Duration::from_secs(1));
        assert_eq!((s.requests, s.success_pct, s.p50_ms), (0, None, None));

        let r = Recorder::new();
        r.record(Duration::from_millis(1), true);
        let later = r.snapshot();
        let mut earlier = later.clone();
        earlier.requests = 10;
        assert_eq!(later.since(&earlier), later);
    }

    #[test]
    fn stats_json_has_the_documented_fields() {
        let r = Recorder::new();
        r.record(Duration::from_millis(1), true);
        let stats = Stats {
            service: "s".into(),
            version: "v1".into(),
            instance: "s-0".into(),
            counters: r.snapshot(),
        };
        let v = serde_json::to_value(&stats).unwrap();
        for key in ["service", "version", "instance", "requests", "errors"] {
            assert!(v.get(key).is_some(), "{key} in {v}");
        }
        assert!(v["latency_ms_buckets"]["le"].is_array());
        assert!(v["latency_ms_buckets"]["counts"].is_array());
        let back: Stats = serde_json::from_value(v).unwrap();
        assert_eq!(back, stats);
    }
}
