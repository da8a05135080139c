//! Traffic stats for the control plane (`sinew stat`, `top`, `edges`).
//!
//! Every finished HTTP request adds to one row (direction, service, route, peer
//! identity, mTLS or not: counts, failures, a latency histogram) and to one path
//! (method and path: counts and latency). Every report interval the proxy takes what
//! gathered, as a delta, and sends the busiest rows and paths over its control-plane
//! stream. Standalone proxies never turn this on and pay one atomic load per request.
//!
//! Bounded whatever the traffic: rows come from configuration and the CA (services,
//! routes, identities), and at most [`MAX_ROWS`] are held; paths come from requests,
//! so at most [`MAX_PATHS`] distinct ones are held per interval (later ones are
//! counted under `(other)`), each cut to [`MAX_PATH_LEN`] bytes, and methods outside
//! the standard set count as `OTHER`. Paths go to the control plane only, never into
//! metric labels.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sinew_api::latency;
use sinew_api::v1::{PathRow, StatsReport, TrafficRow};

/// Rows held per interval; requests of further kinds are only counted.
pub const MAX_ROWS: usize = 256;
/// Rows per report (the busiest).
pub const REPORT_ROWS: usize = 64;
/// Distinct paths held per interval; later ones count under `(other)`.
pub const MAX_PATHS: usize = 256;
/// Paths per report (the busiest).
pub const REPORT_PATHS: usize = 20;
/// Paths are cut to this many bytes.
pub const MAX_PATH_LEN: usize = 128;
/// What paths past [`MAX_PATHS`] are counted as.
pub const OTHER_PATH: &str = "(other)";

/// One finished request, as the stats see it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Inbound (mesh to app) or outbound.
    pub inbound: bool,
    /// Outbound: the service called; inbound: this workload's.
    pub service: &'a str,
    /// The route (outbound), else "".
    pub route: &'a str,
    /// Inbound: the caller's verified identity; outbound: the callee's when mTLS.
    pub peer_identity: &'a str,
    /// Over mesh mTLS.
    pub mtls: bool,
    /// A 5xx, or a gRPC status other than OK in the head.
    pub failed: bool,
    /// Time to the response head.
    pub elapsed: Duration,
    /// The request method.
    pub method: &'a http::Method,
    /// The request path (no query).
    pub path: &'a str,
}

/// Row and path keys, borrowed (for lookups) or owned (as held); both hash alike.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct RowKey<S> {
    inbound: bool,
    service: S,
    route: S,
    peer: S,
    mtls: bool,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct PathKey<S> {
    inbound: bool,
    service: S,
    method: &'static str,
    path: S,
}

impl RowKey<&str> {
    fn owned(&self) -> RowKey<Box<str>> {
        RowKey {
            inbound: self.inbound,
            service: self.service.into(),
            route: self.route.into(),
            peer: self.peer.into(),
            mtls: self.mtls,
        }
    }
}

impl PartialEq<RowKey<&str>> for RowKey<Box<str>> {
    fn eq(&self, o: &RowKey<&str>) -> bool {
        self.inbound == o.inbound
            && self.mtls == o.mtls
            && &*self.service == o.service
            && &*self.route == o.route
            && &*self.peer == o.peer
    }
}

impl PathKey<&str> {
    fn owned(&self) -> PathKey<Box<str>> {
        PathKey {
            inbound: self.inbound,
            service: self.service.into(),
            method: self.method,
            path: self.path.into(),
        }
    }
}

impl PartialEq<PathKey<&str>> for PathKey<Box<str>> {
    fn eq(&self, o: &PathKey<&str>) -> bool {
        self.inbound == o.inbound
            && self.method == o.method
            && &*self.service == o.service
            && &*self.path == o.path
    }
}

#[derive(Debug, Default, Clone)]
struct RowCounts {
    requests: u64,
    failures: u64,
    latency: [u64; latency::BUCKETS],
}

#[derive(Debug, Default, Clone)]
struct PathCounts {
    requests: u64,
    failures: u64,
    sum_us: u64,
    max_us: u64,
}

/// Entries looked up by the hash of a borrowed key, so that counting a request
/// allocates nothing once its row exists. A hash shared by two keys falls back to a
/// scan (rare and still correct).
#[derive(Debug)]
struct Table<K, V> {
    entries: Vec<(K, V)>,
    index: HashMap<u64, usize>,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            entries: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<K, V: Default> Table<K, V> {
    /// Where `key` (hashing to `hash`) is held.
    fn find<Q>(&self, hash: u64, key: &Q) -> Option<usize>
    where
        K: PartialEq<Q>,
    {
        match self.index.get(&hash) {
            Some(&i) if self.entries[i].0 == *key => Some(i),
            _ => self.entries.iter().position(|(k, _)| *k == *key),
        }
    }

    /// Holds `key` (not held yet), with zero counts.
    fn insert(&mut self, hash: u64, key: K) -> usize {
        self.entries.push((key, V::default()));
        let i = self.entries.len() - 1;
        self.index.entry(hash).or_insert(i);
        i
    }

    /// Where `key` is held, holding it if it is not and `room` allows.
    fn slot<Q>(&mut self, hash: u64, key: &Q, make: impl FnOnce() -> K, room: bool) -> Option<usize>
    where
        K: PartialEq<Q>,
    {
        match self.find(hash, key) {
            Some(i) => Some(i),
            None if room => Some(self.insert(hash, make())),
            None => None,
        }
    }
}

/// What gathered since the last report.
#[derive(Debug, Default)]
struct Gathered {
    rows: Table<RowKey<Box<str>>, RowCounts>,
    paths: Table<PathKey<Box<str>>, PathCounts>,
    /// Requests whose row did not fit.
    unreported: u64,
}

/// The proxy's stats; see the [module docs](self).
#[derive(Debug, Default)]
pub struct Stats {
    on: AtomicBool,
    hasher: std::hash::RandomState,
    gathered: Mutex<Gathered>,
}

/// The method as counted: a standard one, else `OTHER` (methods are request data).
fn method_name(m: &http::Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN
        .into_iter()
        .find(|k| *k == m.as_str())
        .unwrap_or("OTHER")
}

/// `path` cut to [`MAX_PATH_LEN`] bytes, on a character boundary.
fn cut(path: &str) -> &str {
    if path.len() <= MAX_PATH_LEN {
        return path;
    }
    let mut end = MAX_PATH_LEN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

impl Stats {
    /// Turns gathering on or off (on while the proxy has a control plane to report to).
    pub fn enable(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// True while gathering.
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Counts a finished request.
    // Never inlined: a whole-program (fat LTO) build would otherwise spread its work
    // into the caller, where bench/run's callgrind attribution (scenario 9) cannot see
    // what the stats cost. A call per request is the price.
    #[inline(never)]
    pub fn record(&self, r: &Request<'_>) {
        let us = u64::try_from(r.elapsed.as_micros()).unwrap_or(u64::MAX);
        let row = RowKey {
            inbound: r.inbound,
            service: r.service,
            route: r.route,
            peer: r.peer_identity,
            mtls: r.mtls,
        };
        let row_hash = self.hasher.hash_one(row);
        let path = PathKey {
            inbound: r.inbound,
            service: r.service,
            method: method_name(r.method),
            path: cut(r.path),
        };
        let path_hash = self.hasher.hash_one(path);
        let other = PathKey {
            path: OTHER_PATH,
            ..path
        };
        let mut g = self.gathered.lock().unwrap_or_else(|e| e.into_inner());
        let room = g.rows.entries.len() < MAX_ROWS;
        match g.rows.slot(row_hash, &row, || row.owned(), room) {
            Some(i) => {
                let c = &mut g.rows.entries[i].1;
                c.requests += 1;
                c.failures += u64::from(r.failed);
                c.latency[latency::bucket(us)] += 1;
            }
            None => g.unreported += 1,
        }
        let room = g.paths.entries.len() < MAX_PATHS;
        let i = match g.paths.slot(path_hash, &path, || path.owned(), room) {
            Some(i) => i,
            // Past the cap: one `(other)` entry per service and method, which both
            // come from bounded sets.
            None => {
                let h = self.hasher.hash_one(other);
                match g.paths.slot(h, &other, || other.owned(), true) {
                    Some(i) => i,
                    None => return,
                }
            }
        };
        let counts = &mut g.paths.entries[i].1;
        counts.requests += 1;
        counts.failures += u64::from(r.failed);
        counts.sum_us = counts.sum_us.saturating_add(us);
        counts.max_us = counts.max_us.max(us);
    }

    /// Takes what gathered since the last call as a report (the busiest rows and
    /// paths), or `None` when there was no traffic.
    pub fn take(&self, identity: String) -> Option<StatsReport> {
        let g = std::mem::take(&mut *self.gathered.lock().unwrap_or_else(|e| e.into_inner()));
        if g.rows.entries.is_empty() && g.unreported == 0 {
            return None;
        }
        let mut rows = g.rows.entries;
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.requests));
        let unreported = g.unreported
            + rows
                .iter()
                .skip(REPORT_ROWS)
                .map(|(_, c)| c.requests)
                .sum::<u64>();
        let rows = rows
            .into_iter()
            .take(REPORT_ROWS)
            .map(|(k, c)| {
                let used = c.latency.iter().rposition(|n| *n > 0).map_or(0, |i| i + 1);
                TrafficRow {
                    inbound: k.inbound,
                    service: k.service.into(),
                    route: k.route.into(),
                    peer_identity: k.peer.into(),
                    mtls: k.mtls,
                    requests: c.requests,
                    failures: c.failures,
                    latency: c.latency[..used].to_vec(),
                }
            })
            .collect();
        let mut paths = g.paths.entries;
        paths.sort_by_key(|p| std::cmp::Reverse(p.1.requests));
        let paths = paths
            .into_iter()
            .take(REPORT_PATHS)
            .map(|(k, c)| PathRow {
                inbound: k.inbound,
                service: k.service.into(),
                method: k.method.to_owned(),
                path: k.path.into(),
                requests: c.requests,
                failures: c.failures,
                latency_sum_us: c.sum_us,
                latency_max_us: c.max_us,
            })
            .collect();
        Some(StatsReport {
            identity,
            rows,
            paths,
            unreported,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(service: &'a str, path: &'a str, ms: u64, failed: bool) -> Request<'a> {
        Request {
            inbound: true,
            service,
            route: "",
            peer_identity: "spiffe://cluster.local/ns/shop/sa/web",
            mtls: true,
            failed,
            elapsed: Duration::from_millis(ms),
            method: &http::Method::GET,
            path,
        }
    }

    #[test]
    fn requests_add_up_per_row_and_path_and_a_report_is_a_delta() {
        let s = Stats::default();
        for i in 0..10 {
            s.record(&req("catalog.shop", "/a", 3, i % 5 == 0));
        }
        s.record(&req("catalog.shop", "/b", 700, false));
        let r = s.take(String::new()).unwrap_or_default();
        assert_eq!(r.rows.len(), 1);
        let row = &r.rows[0];
        assert_eq!((row.requests, row.failures), (11, 2));
        // 3 ms lands in (2, 4] ms = bucket 4; 700 ms in (512, 1024] = bucket 12.
        assert_eq!(row.latency.len(), 13, "trailing empty buckets are left out");
        assert_eq!((row.latency[4], row.latency[12]), (10, 1));
        assert_eq!(r.paths[0].path, "/a");
        assert_eq!((r.paths[0].requests, r.paths[0].failures), (10, 2));
        assert_eq!(r.paths[1].latency_max_us, 700_000);
        assert!(
            s.take(String::new()).is_none(),
            "nothing new since the report"
        );
    }

    #[test]
    fn hostile_paths_and_methods_stay_bounded() {
        let s = Stats::default();
        let long = format!("/{}", "é".repeat(200));
        let odd = http::Method::from_bytes(b"BREW").unwrap_or_default();
        for i in 0..(MAX_PATHS * 4) {
            let p = format!("/user/{i}");
            let mut r = req("catalog.shop", &p, 1, false);
            if i % 2 == 0 {
                r.method = &odd;
            }
            s.record(&r);
        }
        s.record(&req("catalog.shop", &long, 1, false));
        {
            let g = s.gathered.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                g.paths.entries.len() <= MAX_PATHS + 2,
                "{}",
                g.paths.entries.len()
            );
            assert!(
                g.paths
                    .entries
                    .iter()
                    .all(|(k, _)| k.path.len() <= MAX_PATH_LEN
                        && ["GET", "OTHER"].contains(&k.method))
            );
        }
        let r = s.take(String::new()).unwrap_or_default();
        assert_eq!(r.paths.len(), REPORT_PATHS);
        // Everything past the cap is in `(other)`: the busiest path.
        assert_eq!(r.paths[0].path, OTHER_PATH);
        let total: u64 = r.rows.iter().map(|r| r.requests).sum();
        assert_eq!(total, MAX_PATHS as u64 * 4 + 1, "every request is in a row");
    }

    #[test]
    fn rows_past_the_cap_are_counted_not_held() {
        let s = Stats::default();
        let services: Vec<String> = (0..MAX_ROWS + 10).map(|i| format!("s{i}.ns")).collect();
        for (i, svc) in services.iter().enumerate() {
            for _ in 0..=(i % 3) {
                s.record(&req(svc, "/", 1, false));
            }
        }
        let r = s.take(String::new()).unwrap_or_default();
        assert_eq!(r.rows.len(), REPORT_ROWS);
        let reported: u64 = r.rows.iter().map(|r| r.requests).sum();
        let all: u64 = (0..MAX_ROWS + 10).map(|i| (i % 3) as u64 + 1).sum();
        assert_eq!(reported + r.unreported, all);
        assert!(r.rows.windows(2).all(|w| w[0].requests >= w[1].requests));
    }
}
