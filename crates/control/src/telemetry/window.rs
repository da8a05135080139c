//! One proxy's recent traffic: its reports added into a ring of time slots.
//!
//! Rows (direction, service, route, peer identity, mTLS) keep [`SLOTS`] slots of
//! [`SLOT`] each, enough for a window of [`WINDOW`]; paths keep [`PATH_SLOTS`], for
//! `sinew top`, which is about now. A slot is cleared when the ring comes round to it
//! again, so nothing needs a timer. Counts are `u32` per slot and saturate.
//!
//! Reports come from the network, so everything is bounded: at most [`MAX_ROWS`]
//! rows and [`MAX_PATHS`] paths are held per proxy (a new path replaces the quietest
//! one only if it is busier), strings past their limits are refused with their row,
//! and methods outside the standard set become `OTHER`. Requests that could not be
//! held are counted, not lost silently.
//!
//! Memory: names (services, routes, identities, paths) are shared between rows and
//! proxies through [`Names`]; latency buckets are `u16`, scaled down by a per-slot
//! power of two when a bucket would overflow, which keeps every bucket's share (what
//! quantiles are made of) and never turns a non-empty bucket into an empty one.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use sinew_api::latency;
use sinew_api::v1::{PathRow, StatsReport, TrafficRow};

/// One slot of the ring.
pub const SLOT: Duration = Duration::from_secs(10);
/// The longest window a query may ask for.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Slots per row: a window of `WINDOW` spans this many slots, the current one partly.
pub const SLOTS: usize = (WINDOW.as_secs() / SLOT.as_secs()) as usize + 1;
/// Slots per path: `sinew top` looks at the current slot and the one before.
pub const PATH_SLOTS: usize = 2;
/// Rows held per proxy.
pub const MAX_ROWS: usize = 64;
/// Paths held per proxy.
pub const MAX_PATHS: usize = 32;
/// Rows and paths read from one report; the rest are counted as not held.
pub const REPORT_ROWS: usize = 64;
/// See [`REPORT_ROWS`].
pub const REPORT_PATHS: usize = 20;
/// Longest service or route name accepted.
pub const MAX_NAME: usize = 320;
/// Longest identity accepted.
pub const MAX_IDENTITY: usize = 512;
/// Longest path accepted (the proxies cut theirs to 128 bytes).
pub const MAX_PATH: usize = 128;

/// A slot id: whole slots since the telemetry started. `NONE` marks a slot never used.
pub type SlotId = u32;
const NONE: SlotId = SlotId::MAX;

/// Counts of one row in one slot.
#[derive(Debug, Default, Clone, Copy)]
pub struct RowSlot {
    /// Requests.
    pub requests: u32,
    /// Failures.
    pub failures: u32,
    /// Requests per latency bucket ([`sinew_api::latency`]), divided by
    /// `2^shift` (rounded up).
    latency: [u16; latency::BUCKETS],
    shift: u8,
}

impl RowSlot {
    /// Adds reported bucket counts, scaling the slot down while one would overflow.
    fn add_latency(&mut self, counts: &[u64]) {
        let scaled = |n: u64, shift: u8| {
            if shift >= 64 {
                u64::from(n > 0)
            } else {
                n.div_ceil(1u64 << shift)
            }
        };
        while self.shift < 64
            && counts
                .iter()
                .zip(&self.latency)
                .any(|(n, b)| u64::from(*b) + scaled(*n, self.shift) > u64::from(u16::MAX))
        {
            for b in &mut self.latency {
                *b = b.div_ceil(2);
            }
            self.shift += 1;
        }
        for (b, n) in self.latency.iter_mut().zip(counts) {
            let add = u16::try_from(scaled(*n, self.shift)).unwrap_or(u16::MAX);
            *b = b.saturating_add(add);
        }
    }

    /// The latency buckets, scaled back up.
    pub fn latency(&self) -> [u64; latency::BUCKETS] {
        let shift = u32::from(self.shift);
        self.latency.map(|b| {
            let b = u64::from(b);
            if b == 0 {
                0
            } else if b.leading_zeros() < shift {
                u64::MAX
            } else {
                b << shift
            }
        })
    }
}

/// A name shared through [`Names`]: one pointer wide (an `Arc<str>` is two), as a
/// window holds a few per row and per path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<Box<str>>);

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Name {
    /// True when `a` and `b` are the same shared copy.
    pub fn ptr_eq(a: &Name, b: &Name) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

/// Names shared by every proxy's window: a service's name, a caller's identity or a
/// busy path is held once however many rows and proxies name it. Names no row holds
/// any more are let go when the set has doubled since it was last swept.
#[derive(Debug, Default)]
pub struct Names {
    set: HashSet<Name>,
    swept_len: usize,
}

impl Names {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Name {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= 2 * self.swept_len.max(512) {
            self.set.retain(|a| Arc::strong_count(&a.0) > 1);
            self.set.shrink_to_fit();
            self.swept_len = self.set.len();
        }
        let a = Name(Arc::new(s.into()));
        self.set.insert(a.clone());
        a
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when no name is held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Bytes held on the heap: the set's buckets (one control byte each, 1/8 kept
    /// free) and each name: its two reference counts with the string's pointer and
    /// length, then the string.
    pub fn heap_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<Name>() + 1;
        self.set.capacity() * bucket * 8 / 7 + self.set.iter().map(|a| a.len() + 32).sum::<usize>()
    }
}

/// A row held: its key and its ring.
#[derive(Debug, Clone)]
pub struct HeldRow {
    /// Inbound (as the server saw it) or outbound.
    pub inbound: bool,
    /// Over mTLS.
    pub mtls: bool,
    /// `name.namespace`.
    pub service: Name,
    /// `namespace/name`, `default`, or "" (inbound).
    pub route: Name,
    /// The peer's SPIFFE id, or "".
    pub peer: Name,
    slots: [RowSlot; SLOTS],
}

/// Counts of one path in one slot. Packed to 4-byte alignment: 20 bytes, not 24
/// (fields are read and written by value).
#[derive(Debug, Default, Clone, Copy)]
#[repr(C, packed(4))]
pub struct PathSlot {
    /// Requests.
    pub requests: u32,
    /// Failures.
    pub failures: u32,
    /// Sum of latencies, µs.
    pub sum_us: u64,
    /// Largest latency, µs.
    pub max_us: u32,
}

/// A path held: its key and its ring.
#[derive(Debug, Clone)]
pub struct HeldPath {
    /// Inbound or outbound.
    pub inbound: bool,
    /// `name.namespace`.
    pub service: Name,
    /// A standard method or `OTHER`, as its index in [`METHODS`].
    method: u8,
    /// The path (no query).
    pub path: Name,
    slots: [PathSlot; PATH_SLOTS],
}

/// A row's counts summed over a window.
#[derive(Debug, Default, Clone)]
pub struct Sum {
    /// Requests.
    pub requests: u64,
    /// Failures.
    pub failures: u64,
    /// Requests per latency bucket.
    pub latency: [u64; latency::BUCKETS],
}

impl Sum {
    /// Adds `o`.
    pub fn add(&mut self, o: &Sum) {
        self.requests += o.requests;
        self.failures += o.failures;
        for (a, b) in self.latency.iter_mut().zip(o.latency) {
            *a = a.saturating_add(b);
        }
    }

    /// The `q` quantile (0..=1) in milliseconds, estimated by interpolating within
    /// its bucket; `None` without requests. Past the last bound, the bound (8192 ms).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.latency.iter().fold(0u64, |a, b| a.saturating_add(*b));
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, n) in self.latency.iter().enumerate() {
            if *n == 0 || ((below + n) as f64) < rank {
                below = below.saturating_add(*n);
                continue;
            }
            let lo = if i == 0 {
                0
            } else {
                latency::upper_us(i - 1).unwrap_or(0)
            };
            let Some(hi) = latency::upper_us(i) else {
                return Some(lo as f64 / 1000.0);
            };
            let within = (rank - below as f64) / *n as f64;
            return Some((lo as f64 + (hi - lo) as f64 * within) / 1000.0);
        }
        None
    }
}

/// A path's counts summed over a window.
#[derive(Debug, Default, Clone, Copy)]
pub struct PathSum {
    /// Requests.
    pub requests: u64,
    /// Failures.
    pub failures: u64,
    /// Sum of latencies, µs.
    pub sum_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
}

impl PathSum {
    /// Adds `o`.
    pub fn add(&mut self, o: &PathSum) {
        self.requests += o.requests;
        self.failures += o.failures;
        self.sum_us = self.sum_us.saturating_add(o.sum_us);
        self.max_us = self.max_us.max(o.max_us);
    }
}

/// One proxy's rows and paths; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Window {
    row_slots: [SlotId; SLOTS],
    path_slots: [SlotId; PATH_SLOTS],
    /// Rows held.
    pub rows: Vec<HeldRow>,
    /// Paths held.
    pub paths: Vec<HeldPath>,
    /// Requests reported but not held (over a cap, or refused as malformed).
    pub unheld: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            row_slots: [NONE; SLOTS],
            path_slots: [NONE; PATH_SLOTS],
            rows: Vec::new(),
            paths: Vec::new(),
            unheld: 0,
        }
    }
}

fn sat(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The methods a path is held under: the standard ones, and `OTHER` (the last).
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "OTHER",
];

/// The method as held: a standard one, else `OTHER`.
fn method_index(m: &str) -> u8 {
    let i = METHODS
        .iter()
        .position(|k| *k == m)
        .unwrap_or(METHODS.len() - 1);
    i as u8
}

impl HeldPath {
    /// Its method: a standard one, or `OTHER`.
    pub fn method(&self) -> &'static str {
        METHODS[usize::from(self.method).min(METHODS.len() - 1)]
    }
}

fn row_ok(r: &TrafficRow) -> bool {
    r.service.len() <= MAX_NAME
        && r.route.len() <= MAX_NAME
        && r.peer_identity.len() <= MAX_IDENTITY
        && r.latency.len() <= latency::BUCKETS
}

fn path_ok(p: &PathRow) -> bool {
    p.service.len() <= MAX_NAME && p.path.len() <= MAX_PATH
}

/// Which ring positions hold slots in `from..=to`.
fn live<const N: usize>(ids: &[SlotId; N], from: SlotId, to: SlotId) -> [bool; N] {
    ids.map(|id| id != NONE && id >= from && id <= to)
}

impl Window {
    /// Makes `slot` current in both rings, clearing what the ring held there before.
    fn turn(&mut self, slot: SlotId) {
        let pos = slot as usize % SLOTS;
        if self.row_slots[pos] != slot {
            self.row_slots[pos] = slot;
            for r in &mut self.rows {
                r.slots[pos] = RowSlot::default();
            }
        }
        let pos = slot as usize % PATH_SLOTS;
        if self.path_slots[pos] != slot {
            self.path_slots[pos] = slot;
            for p in &mut self.paths {
                p.slots[pos] = PathSlot::default();
            }
        }
    }

    /// Adds a report that arrived during `slot`; new names are taken from `names`.
    pub fn add(&mut self, report: &StatsReport, slot: SlotId, names: &mut Names) {
        self.turn(slot);
        self.unheld = self.unheld.saturating_add(report.unreported);
        let pos = slot as usize % SLOTS;
        for (n, r) in report.rows.iter().enumerate() {
            if n >= REPORT_ROWS || !row_ok(r) {
                self.unheld = self.unheld.saturating_add(r.requests);
                continue;
            }
            let found = self.rows.iter().position(|h| {
                h.inbound == r.inbound
                    && h.mtls == r.mtls
                    && *h.service == *r.service
                    && *h.route == *r.route
                    && *h.peer == *r.peer_identity
            });
            let i = match found {
                Some(i) => i,
                None if self.rows.len() < MAX_ROWS => {
                    self.rows.push(HeldRow {
                        inbound: r.inbound,
                        mtls: r.mtls,
                        service: names.get(&r.service),
                        route: names.get(&r.route),
                        peer: names.get(&r.peer_identity),
                        slots: [RowSlot::default(); SLOTS],
                    });
                    self.rows.len() - 1
                }
                None => {
                    self.unheld = self.unheld.saturating_add(r.requests);
                    continue;
                }
            };
            let s = &mut self.rows[i].slots[pos];
            s.requests = s.requests.saturating_add(sat(r.requests));
            s.failures = s.failures.saturating_add(sat(r.failures.min(r.requests)));
            s.add_latency(&r.latency);
        }
        let pos = slot as usize % PATH_SLOTS;
        for p in report
            .paths
            .iter()
            .take(REPORT_PATHS)
            .filter(|p| path_ok(p))
        {
            let method = method_index(&p.method);
            let found = self.paths.iter().position(|h| {
                h.inbound == p.inbound
                    && h.method == method
                    && *h.service == *p.service
                    && *h.path == *p.path
            });
            let i = match found {
                Some(i) => i,
                None => {
                    let fresh = HeldPath {
                        inbound: p.inbound,
                        service: names.get(&p.service),
                        method,
                        path: names.get(&p.path),
                        slots: [PathSlot::default(); PATH_SLOTS],
                    };
                    if self.paths.len() < MAX_PATHS {
                        self.paths.push(fresh);
                        self.paths.len() - 1
                    } else {
                        // Full: the quietest path makes way, if this one is busier.
                        let quietest = self
                            .paths
                            .iter()
                            .enumerate()
                            .map(|(i, h)| {
                                (
                                    i,
                                    h.slots.iter().map(|s| u64::from(s.requests)).sum::<u64>(),
                                )
                            })
                            .min_by_key(|(_, n)| *n);
                        match quietest {
                            Some((i, n)) if n < p.requests => {
                                self.paths[i] = fresh;
                                i
                            }
                            _ => continue,
                        }
                    }
                }
            };
            let s = &mut self.paths[i].slots[pos];
            s.requests = s.requests.saturating_add(sat(p.requests));
            s.failures = s.failures.saturating_add(sat(p.failures.min(p.requests)));
            s.sum_us = s.sum_us.saturating_add(p.latency_sum_us);
            s.max_us = s.max_us.max(sat(p.latency_max_us));
        }
    }

    /// Each row with its counts over slots `from..=to` (rows without any left out).
    pub fn rows_in(&self, from: SlotId, to: SlotId) -> impl Iterator<Item = (&HeldRow, Sum)> {
        let live = live(&self.row_slots, from, to);
        self.rows.iter().filter_map(move |r| {
            let mut sum = Sum::default();
            for (s, _) in r.slots.iter().zip(live).filter(|(_, l)| *l) {
                sum.requests += u64::from(s.requests);
                sum.failures += u64::from(s.failures);
                for (a, b) in sum.latency.iter_mut().zip(s.latency()) {
                    *a = a.saturating_add(b);
                }
            }
            (sum.requests > 0).then_some((r, sum))
        })
    }

    /// Each path with its counts over slots `from..=to` (paths without any left out).
    pub fn paths_in(&self, from: SlotId, to: SlotId) -> impl Iterator<Item = (&HeldPath, PathSum)> {
        let live = live(&self.path_slots, from, to);
        self.paths.iter().filter_map(move |p| {
            let mut sum = PathSum::default();
            for (s, _) in p.slots.iter().zip(live).filter(|(_, l)| *l) {
                sum.add(&PathSum {
                    requests: u64::from(s.requests),
                    failures: u64::from(s.failures),
                    sum_us: s.sum_us,
                    max_us: u64::from(s.max_us),
                });
            }
            (sum.requests > 0).then_some((p, sum))
        })
    }

    /// Drops rows and paths with nothing left in the ring (a route removed, a caller
    /// gone), so what is held follows what is current. `now` is the current slot.
    pub fn prune(&mut self, now: SlotId) {
        let from = now.saturating_sub(SLOTS as SlotId - 1);
        let rows = live(&self.row_slots, from, now);
        self.rows
            .retain(|r| r.slots.iter().zip(rows).any(|(s, l)| l && s.requests > 0));
        let from = now.saturating_sub(PATH_SLOTS as SlotId - 1);
        let paths = live(&self.path_slots, from, now);
        self.paths
            .retain(|p| p.slots.iter().zip(paths).any(|(s, l)| l && s.requests > 0));
        // Vectors grow by doubling: give back what the caps will not use.
        self.rows.shrink_to_fit();
        self.paths.shrink_to_fit();
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.paths.is_empty()
    }

    /// Bytes this window holds on the heap (capacities, not lengths: what the
    /// allocator was asked for); the names are shared, and counted by [`Names`].
    pub fn heap_bytes(&self) -> usize {
        self.rows.capacity() * std::mem::size_of::<HeldRow>()
            + self.paths.capacity() * std::mem::size_of::<HeldPath>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(service: &str, requests: u64, failures: u64, latency: Vec<u64>) -> TrafficRow {
        TrafficRow {
            inbound: true,
            service: service.into(),
            route: String::new(),
            peer_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            mtls: true,
            requests,
            failures,
            latency,
        }
    }

    fn report(rows: Vec<TrafficRow>, paths: Vec<PathRow>) -> StatsReport {
        StatsReport {
            identity: String::new(),
            rows,
            paths,
            unreported: 0,
        }
    }

    fn path(p: &str, requests: u64) -> PathRow {
        PathRow {
            inbound: true,
            service: "catalog.shop".into(),
            method: "GET".into(),
            path: p.into(),
            requests,
            failures: 0,
            latency_sum_us: requests * 1000,
            latency_max_us: 1000,
        }
    }

    #[test]
    fn reports_merge_per_slot_and_leave_the_window_when_the_ring_turns() {
        let mut w = Window::default();
        let mut names = Names::default();
        w.add(
            &report(vec![row("catalog.shop", 10, 1, vec![0, 0, 10])], vec![]),
            0,
            &mut names,
        );
        w.add(
            &report(vec![row("catalog.shop", 5, 0, vec![0, 0, 0, 5])], vec![]),
            0,
            &mut names,
        );
        w.add(
            &report(vec![row("catalog.shop", 7, 2, vec![7])], vec![]),
            3,
            &mut names,
        );
        let sum = |w: &Window, from, to| {
            w.rows_in(from, to)
                .map(|(_, s)| (s.requests, s.failures))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        assert_eq!(sum(&w, 0, 3), (22, 3));
        assert_eq!(sum(&w, 1, 3), (7, 2), "slot 0 is outside 1..=3");
        assert_eq!(sum(&w, 0, 0), (15, 1));
        // Slot 7 lands where slot 0 was: slot 0's counts are gone.
        w.add(
            &report(vec![row("catalog.shop", 1, 0, vec![1])], vec![]),
            SLOTS as SlotId,
            &mut names,
        );
        assert_eq!(sum(&w, 0, SLOTS as SlotId), (8, 2));
        let (_, s) = w.rows_in(0, 100).next().unwrap_or_else(|| unreachable!());
        assert_eq!(s.latency[0], 8);
        // Once every slot it used has turned over, a row is pruned.
        w.prune(SLOTS as SlotId + 3);
        assert_eq!(w.rows.len(), 1, "slot 7 is still in the ring");
        w.prune(2 * SLOTS as SlotId);
        assert!(w.rows.is_empty());
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        // 100 requests: 90 at about 3 ms (bucket (2, 4] ms), 10 at about 600 ms
        // (bucket (512, 1024] ms).
        let mut s = Sum::default();
        s.latency[4] = 90;
        s.latency[12] = 10;
        s.requests = 100;
        let p50 = s.quantile_ms(0.5).unwrap_or_default();
        assert!((2.0..=4.0).contains(&p50), "{p50}");
        let p95 = s.quantile_ms(0.95).unwrap_or_default();
        assert!((512.0..=1024.0).contains(&p95), "{p95}");
        let p99 = s.quantile_ms(0.99).unwrap_or_default();
        assert!(p99 > p95 && p99 <= 1024.0, "{p99}");
        // Interpolation: the median of 90 requests in (2, 4] sits 50/90 of the way.
        assert!((p50 - (2.0 + 2.0 * 50.0 / 90.0)).abs() < 1e-9, "{p50}");
        assert_eq!(Sum::default().quantile_ms(0.5), None);
        let mut slow = Sum::default();
        slow.latency[16] = 3;
        assert_eq!(
            slow.quantile_ms(0.99),
            Some(8192.0),
            "the last bound, not infinity"
        );
        let mut fast = Sum::default();
        fast.latency[0] = 1;
        assert!(fast.quantile_ms(0.5).unwrap_or(1.0) <= 0.25);
    }

    #[test]
    fn hostile_reports_stay_bounded_and_are_counted() {
        let mut w = Window::default();
        let mut names = Names::default();
        for round in 0..10u64 {
            // Malformed rows first (over-long, too many buckets), then more rows
            // than any cap, each claiming more failures than requests.
            let rows = [
                row(&"x".repeat(10_000), 1000, 0, vec![]),
                row("wide.ns", 7, 0, vec![1; 40]),
            ]
            .into_iter()
            .chain((0..200).map(|i| row(&format!("s{round}-{i}.ns"), 1, 5, vec![1])))
            .collect();
            let paths = (0..100)
                .map(|i| path(&format!("/{round}/{i}"), 1))
                .chain([path(&"p".repeat(MAX_PATH + 1), 1)])
                .collect();
            w.add(&report(rows, paths), 0, &mut names);
        }
        assert_eq!(w.rows.len(), MAX_ROWS);
        assert!(w.paths.len() <= MAX_PATHS);
        assert!(w.rows.iter().all(|r| r.service.len() <= MAX_NAME));
        assert!(w.paths.iter().all(|p| p.path.len() <= MAX_PATH));
        // Failures never exceed requests; malformed rows (over-long, too many
        // buckets) and rows past the caps are counted as not held.
        for (_, s) in w.rows_in(0, 100) {
            assert!(s.failures <= s.requests);
        }
        let held: u64 = w.rows_in(0, 100).map(|(_, s)| s.requests).sum();
        assert_eq!(held + w.unheld, 10 * (1000 + 7 + 200));
        // A busier newcomer displaces the quietest path.
        w.add(&report(vec![], vec![path("/hot", 50)]), 10, &mut names);
        assert!(w.paths.iter().any(|p| &*p.path == "/hot"));
        assert!(w.heap_bytes() < 64 * 1024, "{}", w.heap_bytes());
    }

    #[test]
    fn busy_rows_scale_their_buckets_and_keep_rare_ones() {
        let mut s = RowSlot::default();
        // 10 reports of 20,000 requests at about 1 ms and 3 at about 1 s: far past
        // what a u16 bucket holds unscaled.
        let mut counts = vec![0u64; latency::BUCKETS];
        counts[2] = 20_000;
        counts[12] = 3;
        for _ in 0..10 {
            s.add_latency(&counts);
        }
        let got = s.latency();
        assert!(s.shift > 0, "scaled");
        let fast = got[2] as f64;
        assert!((fast - 200_000.0).abs() / 200_000.0 < 0.01, "{got:?}");
        assert!(got[12] > 0, "a rare slow bucket survives scaling: {got:?}");
        let sum = Sum {
            requests: 200_030,
            failures: 0,
            latency: got,
        };
        let p50 = sum.quantile_ms(0.5).unwrap_or_default();
        assert!((0.5..=1.0).contains(&p50), "{p50}");
        // Counts past any scale saturate instead of wrapping.
        let mut huge = RowSlot::default();
        huge.add_latency(&[u64::MAX; latency::BUCKETS]);
        huge.add_latency(&[u64::MAX; latency::BUCKETS]);
        assert!(
            huge.latency().iter().all(|n| *n > 0),
            "{:?} {}",
            huge.latency(),
            huge.shift
        );
    }

    #[test]
    fn names_are_shared_and_let_go_when_unused() {
        let mut names = Names::default();
        let a = names.get("catalog.shop");
        let b = names.get("catalog.shop");
        assert!(Name::ptr_eq(&a, &b));
        drop((a, b));
        // Unused names go at the next sweep, which comes as the set grows.
        for i in 0..2000 {
            let _ = names.get(&format!("/path/{i}"));
        }
        assert!(names.len() < 1100, "{}", names.len());
        let kept = names.get("kept");
        for i in 0..5000 {
            let _ = names.get(&format!("/other/{i}"));
        }
        assert!(
            Name::ptr_eq(&kept, &names.get("kept")),
            "a name in use stays"
        );
    }

    #[test]
    fn methods_are_normalised() {
        let mut w = Window::default();
        let mut names = Names::default();
        let mut p = path("/", 1);
        p.method = "BREW".into();
        w.add(&report(vec![], vec![p]), 0, &mut names);
        assert_eq!(w.paths[0].method(), "OTHER");
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn rows_and_paths_take_what_the_figures_assume() {
        // The unit test `a_hundred_proxies_cost_under_a_megabyte` and bench/run's
        // scenario 9 rest on these: a typical proxy holds 8 rows and 20 paths.
        assert_eq!(std::mem::size_of::<RowSlot>(), 44);
        assert_eq!(std::mem::size_of::<HeldRow>(), 336);
        assert_eq!(std::mem::size_of::<PathSlot>(), 20);
        assert_eq!(std::mem::size_of::<HeldPath>(), 64);
    }
}
