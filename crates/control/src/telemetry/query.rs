//! Questions over the proxies' windows: golden signals by service, workload or route
//! (`Stat`), the busiest paths (`Top`), and who calls whom (`Edges`).
//!
//! Every request is seen twice when both ends have a sidecar: by the caller's proxy
//! (outbound) and by the callee's (inbound). Each answer counts it once. `Stat` and
//! `Top` take a group's server side when its proxies report one, else its callers'
//! side (a service without sidecars is still seen by its callers); `Edges` starts
//! from the callers' side, where the calling workload is known, and lets the servers'
//! side confirm the caller's identity and add callers without a proxy.
//!
//! Rates are requests over the part of the window that was observed: from the start
//! of the window's first slot, or from when the proxies began reporting if later, to
//! now. A report counts in the slot it arrives in and covers the report interval
//! before it, so either end of a window is off by up to one report interval's worth
//! of requests (2 s by default: 3% of a 60 s window).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use sinew_api::v1::{
    Edge, EdgesRequest, EdgesResponse, StatRequest, StatResponse, StatRow, TopRequest, TopResponse,
    TopRow,
};

use super::window::{PathSum, SLOT, SlotId, Sum, WINDOW};
use super::{ProxyEntry, Telemetry, sweep};

/// Adds a row's requests to an edge.
fn count(edge: &mut Edge, sum: &Sum, mtls: bool) {
    edge.requests += sum.requests;
    edge.failures += sum.failures;
    if mtls {
        edge.mtls_requests += sum.requests;
    }
}

/// The default window of `Stat` and `Edges`.
pub const DEFAULT_WINDOW: Duration = WINDOW;
/// `Top`'s window (at most: paths are kept for one slot before the current one).
pub const TOP_WINDOW: Duration = SLOT;
/// Rows `Top` returns by default, and at most.
const TOP_ROWS: usize = 20;
const MAX_TOP_ROWS: usize = 200;

/// A path across proxies: inbound, service, method, path.
type PathKey = (bool, String, &'static str, String);

/// How `Stat` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    Service,
    Workload,
    Route,
}

/// Which side a question reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Inbound when the group has it, else outbound.
    Auto,
    Inbound,
    Outbound,
}

fn side(s: &str) -> Result<Side, String> {
    match s {
        "" => Ok(Side::Auto),
        "inbound" => Ok(Side::Inbound),
        "outbound" => Ok(Side::Outbound),
        other => Err(format!("direction {other:?}: use inbound or outbound")),
    }
}

/// `name.namespace` → namespace.
fn service_ns(s: &str) -> &str {
    s.split_once('.').map_or("", |(_, ns)| ns)
}

/// `namespace/name` → namespace.
fn path_ns(s: &str) -> &str {
    s.split_once('/').map_or("", |(ns, _)| ns)
}

/// `name` or `name.namespace` matches the service key `name.namespace`.
fn service_matches(want: &str, key: &str) -> bool {
    want == key || key.split_once('.').is_some_and(|(n, _)| n == want)
}

fn dir(inbound: bool) -> &'static str {
    if inbound { "inbound" } else { "outbound" }
}

/// A window in seconds as asked (0: `default`), within 1 s and [`WINDOW`].
fn window_of(seconds: u32, default: Duration, max: Duration) -> Duration {
    match seconds {
        0 => default,
        s => Duration::from_secs(u64::from(s)).min(max),
    }
}

/// Requests, failures, latencies and contributors of one group.
#[derive(Debug, Default)]
struct Acc {
    sum: Sum,
    mtls: u64,
    proxies: BTreeSet<String>,
    since: Option<Instant>,
}

impl Acc {
    fn add(&mut self, proxy: &str, e: &ProxyEntry, sum: &Sum, mtls: bool) {
        self.sum.add(sum);
        if mtls {
            self.mtls += sum.requests;
        }
        if !self.proxies.contains(proxy) {
            self.proxies.insert(proxy.to_owned());
        }
        self.since = Some(self.since.map_or(e.since, |s| s.min(e.since)));
    }
}

impl Telemetry {
    /// Slots `from..=to` for a window of `w` ending `now`, and the span observed
    /// for rates given the earliest start of counting.
    fn span(&self, w: Duration, now: Instant) -> (SlotId, SlotId) {
        let from = self.slot(now.checked_sub(w).unwrap_or(self.epoch));
        (from, self.slot(now))
    }

    fn observed(&self, from: SlotId, since: Option<Instant>, now: Instant) -> f64 {
        let start = since.map_or(self.slot_start(from), |s| s.max(self.slot_start(from)));
        now.saturating_duration_since(start)
            .max(Duration::from_secs(1))
            .as_secs_f64()
    }

    /// `Stat`: golden signals per service, workload or route over the window.
    pub fn stat(&self, req: &StatRequest, now: Instant) -> Result<StatResponse, String> {
        let by = match req.by.as_str() {
            "" | "service" | "services" | "svc" => By::Service,
            "workload" | "workloads" | "wl" | "proxy" => By::Workload,
            "route" | "routes" | "httproute" => By::Route,
            other => return Err(format!("by {other:?}: use service, workload or route")),
        };
        let side = side(&req.direction)?;
        let w = window_of(req.window_seconds, DEFAULT_WINDOW, WINDOW);
        let (from, to) = self.span(w, now);
        // (inbound, name, service) → counts.
        let mut groups: BTreeMap<(bool, String, String), Acc> = BTreeMap::new();
        let mut proxies = self.lock();
        sweep(&mut proxies, now);
        for (proxy, e) in proxies.iter() {
            for (row, sum) in e.window.rows_in(from, to) {
                let (name, service) = match by {
                    By::Service => (row.service.to_string(), row.service.to_string()),
                    By::Workload => (proxy.clone(), e.service.to_string()),
                    // Routes are chosen by the caller: outbound only.
                    By::Route if row.inbound => continue,
                    By::Route => (row.route.to_string(), row.service.to_string()),
                };
                groups
                    .entry((row.inbound, name, service))
                    .or_default()
                    .add(proxy, e, &sum, row.mtls);
            }
        }
        drop(proxies);
        let served: BTreeSet<(String, String)> = groups
            .keys()
            .filter(|(inbound, _, _)| *inbound)
            .map(|(_, n, s)| (n.clone(), s.clone()))
            .collect();
        let mut contributors = BTreeSet::new();
        let mut rows = Vec::new();
        for ((inbound, name, service), acc) in groups {
            let keep = match side {
                Side::Inbound => inbound,
                Side::Outbound => !inbound,
                Side::Auto => inbound || !served.contains(&(name.clone(), service.clone())),
            };
            let namespace = match by {
                By::Service => service_ns(&name).to_owned(),
                By::Workload => path_ns(&name).to_owned(),
                By::Route => service_ns(&service).to_owned(),
            };
            if !keep || (!req.namespace.is_empty() && req.namespace != namespace) {
                continue;
            }
            contributors.extend(acc.proxies.iter().cloned());
            let q = |p| acc.sum.quantile_ms(p).unwrap_or(0.0);
            rows.push(StatRow {
                rps: acc.sum.requests as f64 / self.observed(from, acc.since, now),
                p50_ms: q(0.5),
                p95_ms: q(0.95),
                p99_ms: q(0.99),
                name,
                namespace,
                service,
                direction: dir(inbound).to_owned(),
                requests: acc.sum.requests,
                failures: acc.sum.failures,
                mtls_requests: acc.mtls,
                proxies: acc.proxies.len() as u32,
            });
        }
        rows.sort_by(|a, b| (&a.name, &a.service).cmp(&(&b.name, &b.service)));
        Ok(StatResponse {
            rows,
            window_seconds: w.as_secs() as u32,
            proxies: contributors.len() as u32,
        })
    }

    /// `Top`: the busiest paths now.
    pub fn top(&self, req: &TopRequest, now: Instant) -> TopResponse {
        let w = window_of(req.window_seconds, TOP_WINDOW, TOP_WINDOW);
        let (from, to) = self.span(w, now);
        let mut paths: HashMap<PathKey, (PathSum, Option<Instant>)> = HashMap::new();
        let mut proxies = self.lock();
        sweep(&mut proxies, now);
        for e in proxies.values() {
            for (p, sum) in e.window.paths_in(from, to) {
                if !req.service.is_empty() && !service_matches(&req.service, &p.service) {
                    continue;
                }
                if !req.namespace.is_empty() && service_ns(&p.service) != req.namespace {
                    continue;
                }
                let slot = paths
                    .entry((
                        p.inbound,
                        p.service.to_string(),
                        p.method(),
                        p.path.to_string(),
                    ))
                    .or_default();
                slot.0.add(&sum);
                slot.1 = Some(slot.1.map_or(e.since, |s| s.min(e.since)));
            }
        }
        drop(proxies);
        let served: BTreeSet<String> = paths.keys().filter(|k| k.0).map(|k| k.1.clone()).collect();
        let mut rows: Vec<TopRow> = paths
            .into_iter()
            .filter(|((inbound, service, _, _), _)| *inbound || !served.contains(service))
            .map(|((inbound, service, method, path), (sum, since))| TopRow {
                rps: sum.requests as f64 / self.observed(from, since, now),
                mean_ms: sum.sum_us as f64 / sum.requests.max(1) as f64 / 1000.0,
                max_ms: sum.max_us as f64 / 1000.0,
                service,
                method: method.to_owned(),
                path,
                direction: dir(inbound).to_owned(),
                requests: sum.requests,
                failures: sum.failures,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| (&a.service, &a.path).cmp(&(&b.service, &b.path)))
        });
        let limit = match req.limit {
            0 => TOP_ROWS,
            n => (n as usize).min(MAX_TOP_ROWS),
        };
        rows.truncate(limit);
        TopResponse {
            rows,
            window_seconds: w.as_secs() as u32,
        }
    }

    /// `Edges`: who calls whom over the window.
    pub fn edges(&self, req: &EdgesRequest, now: Instant) -> EdgesResponse {
        let w = window_of(req.window_seconds, DEFAULT_WINDOW, WINDOW);
        let (from, to) = self.span(w, now);
        let mut edges: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
        let mut proxies = self.lock();
        sweep(&mut proxies, now);
        // The callers' side: the calling workload is the reporting proxy.
        for (proxy, e) in proxies.iter() {
            for (row, sum) in e.window.rows_in(from, to).filter(|(r, _)| !r.inbound) {
                let edge = edges
                    .entry((
                        proxy.clone(),
                        e.identity.to_string(),
                        row.service.to_string(),
                    ))
                    .or_insert_with(|| Edge {
                        src: proxy.clone(),
                        src_service: e.service.to_string(),
                        client_identity: e.identity.to_string(),
                        dst: row.service.to_string(),
                        ..Edge::default()
                    });
                count(edge, &sum, row.mtls);
                if row.mtls
                    && !row.peer.is_empty()
                    && edge.server_identities.len() < 4
                    && !edge.server_identities.iter().any(|s| *s == *row.peer)
                {
                    edge.server_identities.push(row.peer.to_string());
                }
            }
        }
        // The servers' side: confirms callers by identity, and adds callers that
        // have no proxy reporting (known by their identity, if any).
        for (proxy, e) in proxies.iter() {
            for (row, sum) in e.window.rows_in(from, to).filter(|(r, _)| r.inbound) {
                // The callers this row stands for. Over mTLS: those with the caller's
                // identity that reached this proxy's identity (a route may have sent
                // them here from another service name, as a canary does) or called
                // its service. In plaintext: those that called its service so.
                let caller = |x: &Edge| {
                    !x.src.is_empty()
                        && if row.peer.is_empty() {
                            x.dst == *row.service && x.mtls_requests < x.requests
                        } else {
                            x.client_identity == *row.peer
                                && (x.dst == *row.service
                                    || (!e.identity.is_empty()
                                        && x.server_identities.iter().any(|s| *s == *e.identity)))
                        }
                };
                let edges_for_row: Vec<&mut Edge> = if edges.values().any(caller) {
                    edges.values_mut().filter(|x| caller(x)).collect()
                } else {
                    let edge = edges
                        .entry((String::new(), row.peer.to_string(), row.service.to_string()))
                        .or_insert_with(|| Edge {
                            client_identity: row.peer.to_string(),
                            dst: row.service.to_string(),
                            ..Edge::default()
                        });
                    count(edge, &sum, row.mtls);
                    vec![edge]
                };
                for edge in edges_for_row {
                    edge.verified_by_server |= row.mtls && !row.peer.is_empty();
                    if !edge.dst_workloads.iter().any(|w| w == proxy)
                        && edge.dst_workloads.len() < 16
                    {
                        edge.dst_workloads.push(proxy.clone());
                    }
                }
            }
        }
        drop(proxies);
        let ns = &req.namespace;
        let mut edges: Vec<Edge> = edges
            .into_values()
            .filter(|e| ns.is_empty() || path_ns(&e.src) == ns || service_ns(&e.dst) == ns)
            .collect();
        for e in &mut edges {
            e.dst_workloads.sort();
        }
        edges.sort_by(|a, b| (&a.dst, &a.src).cmp(&(&b.dst, &b.src)));
        EdgesResponse {
            edges,
            window_seconds: w.as_secs() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_api::v1::{PathRow, StatsReport, TrafficRow};
    use tokio::sync::mpsc;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const CAT: &str = "spiffe://cluster.local/ns/shop/sa/catalog";

    fn row(inbound: bool, service: &str, peer: &str, requests: u64, failures: u64) -> TrafficRow {
        TrafficRow {
            inbound,
            service: service.into(),
            route: if inbound {
                String::new()
            } else {
                "shop/catalog".into()
            },
            peer_identity: peer.into(),
            mtls: !peer.is_empty(),
            requests,
            failures,
            // All between 2 and 4 ms.
            latency: vec![0, 0, 0, 0, requests],
        }
    }

    fn report(identity: &str, rows: Vec<TrafficRow>, paths: Vec<PathRow>) -> StatsReport {
        StatsReport {
            identity: identity.into(),
            rows,
            paths,
            unreported: 0,
        }
    }

    /// web (caller) → catalog (two replicas), plus a plaintext caller with no proxy.
    fn mesh(t0: Instant) -> Telemetry {
        let tel = Telemetry::new(t0);
        for (p, svc) in [
            ("shop/web", ""),
            ("shop/catalog-1", "catalog"),
            ("shop/catalog-2", "catalog"),
        ] {
            tel.connect_at(p, svc, 1, mpsc::channel(1).0, t0);
        }
        let at = t0 + Duration::from_secs(5);
        tel.add_report(
            "shop/web",
            &report(WEB, vec![row(false, "catalog.shop", CAT, 100, 10)], vec![]),
            at,
        );
        let path = |p: &str, n: u64| PathRow {
            inbound: true,
            service: "catalog.shop".into(),
            method: "GET".into(),
            path: p.into(),
            requests: n,
            failures: 0,
            latency_sum_us: n * 3000,
            latency_max_us: 9000,
        };
        tel.add_report(
            "shop/catalog-1",
            &report(
                CAT,
                vec![
                    row(true, "catalog.shop", WEB, 60, 6),
                    row(true, "catalog.shop", "", 7, 0),
                ],
                vec![path("/a", 50), path("/b", 17)],
            ),
            at,
        );
        tel.add_report(
            "shop/catalog-2",
            &report(
                CAT,
                vec![row(true, "catalog.shop", WEB, 40, 4)],
                vec![path("/a", 40)],
            ),
            at,
        );
        tel
    }

    #[test]
    fn stat_counts_each_request_once_from_the_server_side() {
        let t0 = Instant::now();
        let tel = mesh(t0);
        let now = t0 + Duration::from_secs(10);
        let r = tel.stat(&StatRequest::default(), now).unwrap_or_default();
        assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
        let c = &r.rows[0];
        assert_eq!(
            (c.name.as_str(), c.direction.as_str()),
            ("catalog.shop", "inbound")
        );
        assert_eq!(
            (c.requests, c.failures, c.mtls_requests, c.proxies),
            (107, 10, 100, 2)
        );
        // Counting began 10 s ago.
        assert!((c.rps - 10.7).abs() < 1e-9, "{}", c.rps);
        assert!((2.0..=4.0).contains(&c.p50_ms) && (2.0..=4.0).contains(&c.p99_ms));
        // The callers' side on request.
        let out = tel
            .stat(
                &StatRequest {
                    direction: "outbound".into(),
                    ..Default::default()
                },
                now,
            )
            .unwrap_or_default();
        assert_eq!((out.rows[0].requests, out.rows[0].failures), (100, 10));
        let wl = tel
            .stat(
                &StatRequest {
                    by: "workload".into(),
                    ..Default::default()
                },
                now,
            )
            .unwrap_or_default();
        let names: Vec<(&str, &str, u64)> = wl
            .rows
            .iter()
            .map(|r| (r.name.as_str(), r.direction.as_str(), r.requests))
            .collect();
        assert_eq!(
            names,
            [
                ("shop/catalog-1", "inbound", 67),
                ("shop/catalog-2", "inbound", 40),
                ("shop/web", "outbound", 100)
            ]
        );
        let routes = tel
            .stat(
                &StatRequest {
                    by: "route".into(),
                    ..Default::default()
                },
                now,
            )
            .unwrap_or_default();
        assert_eq!(routes.rows[0].name, "shop/catalog");
        assert_eq!(routes.rows[0].service, "catalog.shop");
        let other_ns = tel
            .stat(
                &StatRequest {
                    namespace: "prod".into(),
                    ..Default::default()
                },
                now,
            )
            .unwrap_or_default();
        assert!(other_ns.rows.is_empty());
        assert!(
            tel.stat(
                &StatRequest {
                    by: "colour".into(),
                    ..Default::default()
                },
                now
            )
            .is_err()
        );
        // Past the window, nothing.
        let later = tel
            .stat(&StatRequest::default(), t0 + Duration::from_secs(200))
            .unwrap_or_default();
        assert!(later.rows.is_empty());
    }

    #[test]
    fn top_merges_replicas_and_ranks_by_requests() {
        let t0 = Instant::now();
        let tel = mesh(t0);
        let r = tel.top(&TopRequest::default(), t0 + Duration::from_secs(10));
        let rows: Vec<(&str, u64)> = r
            .rows
            .iter()
            .map(|r| (r.path.as_str(), r.requests))
            .collect();
        assert_eq!(rows, [("/a", 90), ("/b", 17)]);
        assert!((r.rows[0].mean_ms - 3.0).abs() < 1e-9);
        assert!((r.rows[0].max_ms - 9.0).abs() < 1e-9);
        let none = tel.top(
            &TopRequest {
                service: "reviews".into(),
                ..Default::default()
            },
            t0 + Duration::from_secs(10),
        );
        assert!(none.rows.is_empty());
    }

    #[test]
    fn edges_join_both_sides_by_identity() {
        let t0 = Instant::now();
        let tel = mesh(t0);
        let r = tel.edges(&EdgesRequest::default(), t0 + Duration::from_secs(10));
        assert_eq!(r.edges.len(), 2, "{:?}", r.edges);
        let (plain, web) = (&r.edges[0], &r.edges[1]);
        assert_eq!(web.src, "shop/web");
        assert_eq!(web.client_identity, WEB);
        assert_eq!(web.dst, "catalog.shop");
        assert_eq!(web.server_identities, [CAT]);
        assert_eq!(
            (web.requests, web.failures, web.mtls_requests),
            (100, 10, 100)
        );
        assert!(web.verified_by_server);
        assert_eq!(web.dst_workloads, ["shop/catalog-1", "shop/catalog-2"]);
        // The plaintext caller without a proxy: known only as a caller of catalog.
        assert_eq!(
            (plain.src.as_str(), plain.client_identity.as_str()),
            ("", "")
        );
        assert_eq!((plain.requests, plain.mtls_requests), (7, 0));
        assert!(!plain.verified_by_server);
    }

    #[test]
    fn a_canary_behind_a_route_is_joined_by_identity() {
        // web addresses `catalog`; its route sends some to `catalog-canary`, whose
        // proxy has its own identity and service.
        const CANARY: &str = "spiffe://cluster.local/ns/shop/sa/catalog-canary";
        let t0 = Instant::now();
        let tel = mesh(t0);
        tel.connect_at("shop/canary-1", "catalog-canary", 1, mpsc::channel(1).0, t0);
        let at = t0 + Duration::from_secs(6);
        tel.add_report(
            "shop/web",
            &report(WEB, vec![row(false, "catalog.shop", CANARY, 11, 0)], vec![]),
            at,
        );
        tel.add_report(
            "shop/canary-1",
            &report(
                CANARY,
                vec![row(true, "catalog-canary.shop", WEB, 11, 0)],
                vec![],
            ),
            at,
        );
        let r = tel.edges(&EdgesRequest::default(), t0 + Duration::from_secs(10));
        let web: Vec<&Edge> = r.edges.iter().filter(|e| e.src == "shop/web").collect();
        assert_eq!(web.len(), 1, "{:?}", r.edges);
        assert_eq!(web[0].requests, 111);
        assert_eq!(web[0].server_identities, [CAT, CANARY]);
        assert_eq!(
            web[0].dst_workloads,
            ["shop/canary-1", "shop/catalog-1", "shop/catalog-2"]
        );
        assert!(
            r.edges.iter().all(|e| e.dst != "catalog-canary.shop"),
            "no caller left unknown: {:?}",
            r.edges
        );
    }
}
