//! Retries with budgets, deadlines, and the pieces they share.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Response};
use sinew_model::compile::RetryConfig;

/// The window a retry budget looks back over.
const WINDOW: Duration = Duration::from_secs(10);

/// Caps retries at `ratio` × requests + `min_per_second` × seconds, over a sliding
/// window, so retries can never amplify an outage beyond a known factor. One per
/// route rule, kept across configuration swaps.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    // (second since start, requests, retries), oldest first.
    buckets: Mutex<VecDeque<(u64, u64, u64)>>,
    start: Instant,
    // Recent latencies (microseconds) of the rule's answers, for hedging by percentile.
    latencies: Mutex<(Vec<u32>, usize)>,
}

/// Latencies kept per rule for hedging by percentile.
const LATENCY_SAMPLES: usize = 256;

impl RetryBudget {
    /// A budget.
    pub fn new(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            ratio,
            min_per_second,
            buckets: Mutex::new(VecDeque::new()),
            start: Instant::now(),
            latencies: Mutex::new((Vec::with_capacity(LATENCY_SAMPLES), 0)),
        }
    }

    /// Records how long an answer took.
    pub fn record_latency(&self, d: Duration) {
        let micros = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let (ring, next) = &mut *l;
        if ring.len() < LATENCY_SAMPLES {
            ring.push(micros);
        } else {
            ring[*next] = micros;
        }
        *next = (*next + 1) % LATENCY_SAMPLES;
    }

    /// The `p`th percentile of recent latencies, once 20 are known.
    pub fn latency_percentile(&self, p: f64) -> Option<Duration> {
        let mut v = self
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        if v.len() < 20 {
            return None;
        }
        let i = (((p / 100.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        let (_, x, _) = v.select_nth_unstable(i);
        Some(Duration::from_micros(u64::from(*x)))
    }

    /// True when the settings are the same (the budget is kept across reloads).
    pub fn same(&self, cfg: &RetryConfig) -> bool {
        self.ratio == cfg.budget_ratio && self.min_per_second == cfg.budget_min_per_second
    }

    fn with_bucket<T>(&self, f: impl FnOnce(&mut VecDeque<(u64, u64, u64)>) -> T) -> T {
        let now = self.start.elapsed().as_secs();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        while b
            .front()
            .is_some_and(|(s, _, _)| s + WINDOW.as_secs() <= now)
        {
            b.pop_front();
        }
        if b.back().is_none_or(|(s, _, _)| *s != now) {
            b.push_back((now, 0, 0));
        }
        f(&mut b)
    }

    /// Counts a request.
    pub fn request(&self) {
        self.with_bucket(|b| {
            if let Some(last) = b.back_mut() {
                last.1 += 1;
            }
        });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self) -> bool {
        let ratio = self.ratio;
        let floor = u64::from(self.min_per_second);
        self.with_bucket(|b| {
            let (requests, retries) = b
                .iter()
                .fold((0u64, 0u64), |(q, r), (_, q2, r2)| (q + q2, r + r2));
            let this_second = b.back().map_or(0, |(_, _, r)| *r);
            let by_ratio = (ratio * requests as f64).floor() as u64;
            let allowed = retries < by_ratio || this_second < floor;
            if allowed && let Some(last) = b.back_mut() {
                last.2 += 1;
            }
            allowed
        })
    }
}

/// Backoff before retry `n` (1-based): full jitter over `base` × 2^(n-1), at most 1 s.
pub fn backoff(base: Duration, n: u32) -> Duration {
    let cap = base
        .saturating_mul(1u32 << (n.saturating_sub(1)).min(10))
        .min(Duration::from_secs(1));
    cap.mul_f64(fastrand::f64())
}

/// Methods that may be repeated without changing the result.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// True when a response asks for a retry: a listed status, or a listed gRPC status
/// in the headers (a trailers-only gRPC error).
pub fn retryable_response<B>(resp: &Response<B>, cfg: &RetryConfig) -> bool {
    if cfg.codes.contains(&resp.status().as_u16()) {
        return true;
    }
    if cfg.grpc_codes.is_empty() {
        return false;
    }
    resp.headers()
        .get(crate::http_util::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok())
        .is_some_and(|c| cfg.grpc_codes.contains(&c))
}

/// Header carrying the caller's remaining time, in milliseconds, so a callee (and its
/// own sidecar) never works past it.
/// (Header names are constants: a name given as a string is parsed on every use.)
pub const TIMEOUT_HEADER: http::HeaderName = http::HeaderName::from_static("sinew-timeout-ms");
/// gRPC's own deadline header.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The time a request arrives with: `grpc-timeout` or `sinew-timeout-ms`.
pub fn incoming_timeout(headers: &HeaderMap) -> Option<Duration> {
    // Most requests carry neither.
    static NAMES: [http::HeaderName; 2] = [GRPC_TIMEOUT, TIMEOUT_HEADER];
    if !crate::http_util::carries_any(headers, &NAMES) {
        return None;
    }
    let grpc = headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let ours = headers
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    [grpc, ours].into_iter().flatten().min()
}

/// Parses a gRPC timeout: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    // ASCII only: the unit is the last byte, and splitting before a multi-byte last
    // character would panic (found by fuzzing; header values reach here as visible
    // ASCII, but the function takes any text).
    if s.len() < 2 || s.len() > 9 || !s.is_ascii() {
        return None;
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a gRPC timeout in milliseconds (at least 1).
pub fn format_grpc_timeout(d: Duration) -> String {
    format!("{}m", d.as_millis().clamp(1, 99_999_999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_caps_retries_at_the_ratio_plus_the_floor() {
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.request();
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 20);
        let floor = RetryBudget::new(0.0, 5);
        assert_eq!(
            (0..100).filter(|_| floor.try_retry()).count(),
            5,
            "the floor allows a few per second"
        );
    }

    #[test]
    fn grpc_timeouts_parse_and_format() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        // Found by fuzzing (fuzz/corpus/grpc_timeout/crash-*): a multi-byte last
        // character panicked instead of being refused.
        assert_eq!(parse_grpc_timeout("\u{2ce}"), None);
        assert_eq!(parse_grpc_timeout("10\u{2ce}"), None);
        assert_eq!(format_grpc_timeout(Duration::from_micros(10)), "1m");
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for n in 1..20 {
            assert!(backoff(Duration::from_millis(25), n) <= Duration::from_secs(1));
        }
    }
}
