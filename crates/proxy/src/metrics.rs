//! Prometheus metrics on the admin `/metrics` endpoint.
//!
//! Label sets are small and fixed (direction, status class, listener kind, error
//! reason): no raw paths or hosts, so cardinality stays bounded. Hot counters are
//! resolved once at start-up, so a request increments an atomic and takes no lock.

use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use crate::types::{Direction, RequestMeta};

/// The golden-signal series a connection's last request was counted in.
///
/// Families never drop a series, so a held handle counts into what `/metrics`
/// shows. Configuration names are shared `Arc<str>`s: the same pointer is the same
/// label, and a new configuration's names (new pointers) only cost one lookup.
#[derive(Debug, Default)]
pub struct LastSeries(std::sync::Mutex<Option<Series>>);

#[derive(Debug)]
struct Series {
    dir: Direction,
    service: Option<Arc<str>>,
    route: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    status: u16,
    grpc_status: &'static str,
    latency: Histogram,
    http: Counter,
}

impl Series {
    /// Whether a request with these labels counts here. Compared by pointer, so a hit
    /// neither hashes nor clones a name.
    fn counts(
        &self,
        dir: Direction,
        meta: &RequestMeta,
        peer: Option<&Arc<str>>,
        status: u16,
        grpc_status: &str,
    ) -> bool {
        fn same(a: Option<&Arc<str>>, b: Option<&Arc<str>>) -> bool {
            a.map(|a| Arc::as_ptr(a).cast::<u8>()) == b.map(|b| Arc::as_ptr(b).cast::<u8>())
        }
        self.dir == dir
            && self.status == status
            && self.grpc_status == grpc_status
            && same(self.service.as_ref(), meta.service.as_ref())
            && same(self.route.as_ref(), meta.route.as_ref())
            && same(self.peer.as_ref(), peer)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    class: &'static str,
}

/// Golden-signal labels: every value comes from configuration (service, route),
/// from the CA (identities) or from a bounded set (status, gRPC status), never from
/// raw request data, so cardinality stays bounded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    direction: &'static str,
    /// Outbound: the service the application addressed. Inbound: this workload's.
    service: Arc<str>,
    /// `namespace/name` of the route (`default` for the implicit one; "" inbound).
    route: Arc<str>,
    /// Inbound: the caller's verified SPIFFE id ("" for plaintext). Outbound: "".
    peer_identity: Arc<str>,
    status_code: u16,
    /// The gRPC status when the answer carries it in its head (trailers-only), else "".
    grpc_status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    direction: &'static str,
    service: Arc<str>,
    route: Arc<str>,
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    flow: &'static str,
}

/// The empty label value.
static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

const GRPC_STATUSES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    decision: &'static str,
    policy: String,
    rule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaptureLabels {
    direction: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// All of the proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: [[Counter; 5]; 2],
    errors: Family<ErrorLabels, Counter>,
    connections: Family<ListenerLabels, Counter>,
    open: Family<ListenerLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    generation: Gauge,
    cert_expiry: Gauge,
    authz: Family<AuthzLabels, Counter>,
    retries: Counter,
    hedges: Counter,
    http: Family<HttpLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    /// Bytes spliced through tunnels and TCP streams: from downstream, to downstream.
    pub bytes_in: Counter,
    /// See `bytes_in`.
    pub bytes_out: Counter,
    pushes: Family<ResultLabels, Counter>,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Endpoints ejected by outlier detection.
    pub ejections: Counter,
    captured: Family<CaptureLabels, Counter>,
    /// Captured connections whose client sent nothing within the detection timeout
    /// (treated as opaque TCP: a server-speaks-first protocol on an undeclared port).
    pub detect_timeouts: Counter,
}

/// Registers `metric` (a handle to it: the registry keeps a clone) and returns it.
fn reg<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers a new metric of the type asked for.
fn def<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    reg(registry, name, help, M::default())
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s, doubling.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric (in the order `/metrics` lists them: each field's
    /// expression registers its metric, and fields are evaluated as written).
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("sinew");
        let requests_family = reg(
            &mut r,
            "http_requests",
            "HTTP requests handled, by direction and response status class",
            Family::<RequestLabels, Counter>::default(),
        );
        let requests = [Direction::Inbound, Direction::Outbound].map(|d| {
            CLASSES.map(|class| {
                requests_family
                    .get_or_create(&RequestLabels {
                        direction: d.as_str(),
                        class,
                    })
                    .clone()
            })
        });
        let flows = Family::<FlowLabels, Counter>::default();
        let flow = |flow| flows.get_or_create(&FlowLabels { flow }).clone();
        Metrics {
            requests,
            errors: def(
                &mut r,
                "proxy_errors",
                "Responses the proxy made itself, by sinew-error reason",
            ),
            connections: def(
                &mut r,
                "tcp_connections",
                "Connections accepted, by listener",
            ),
            open: def(
                &mut r,
                "tcp_connections_open",
                "Connections open now, by listener",
            ),
            reloads: def(
                &mut r,
                "config_reloads",
                "Configuration loads, by result (applied, rejected)",
            ),
            generation: def(
                &mut r,
                "config_generation",
                "Generation of the applied configuration (0 before the first)",
            ),
            authz: def(
                &mut r,
                "authz_decisions",
                "Inbound authorization decisions, by decision and by the policy and rule that decided (policy \"default\" for the default)",
            ),
            retries: def(&mut r, "retries", "Retries sent (within budget)"),
            hedges: def(&mut r, "hedges", "Hedged second tries sent (within budget)"),
            cert_expiry: def(
                &mut r,
                "certificate_expiry_timestamp_seconds",
                "When the proxy's workload certificate expires (0 without one)",
            ),
            http: def(
                &mut r,
                "requests",
                "HTTP requests by direction, service, route, caller identity, status code and gRPC status",
            ),
            latency: reg(
                &mut r,
                "request_duration_seconds",
                "Time from a request's arrival to its response head, by direction, service, route and status class",
                Family::new_with_constructor(latency_histogram),
            ),
            bytes_in: {
                reg(
                    &mut r,
                    "stream_bytes",
                    "Bytes spliced through TCP streams and tunnels, by flow (from or to the downstream side)",
                    flows.clone(),
                );
                flow("from_downstream")
            },
            bytes_out: flow("to_downstream"),
            pushes: def(
                &mut r,
                "control_plane_pushes",
                "Control-plane pushes, by result (acked, nacked)",
            ),
            access_log_dropped: def(
                &mut r,
                "access_log_dropped",
                "Access-log lines dropped because the writer fell behind",
            ),
            ejections: def(
                &mut r,
                "outlier_ejections",
                "Endpoints ejected by outlier detection",
            ),
            captured: def(
                &mut r,
                "captured_connections",
                "Connections redirected to the proxy by capture rules, by direction and what became of them (http, tcp: to a mesh service; passthrough: to an unknown destination; mtls, plaintext: inbound; refused)",
            ),
            detect_timeouts: def(
                &mut r,
                "protocol_detect_timeouts",
                "Captured connections treated as opaque TCP because the client sent nothing within the detection timeout",
            ),
            registry: r,
        }
    }

    /// Counts a request by its response status.
    pub fn request(&self, dir: Direction, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[dir as usize][class].inc();
    }

    /// Records a finished request: the golden signals by service and route, with the
    /// time to the end of its response.
    // Never inlined: a whole-program (fat LTO) build would otherwise spread its work
    // into the caller, where bench/run's callgrind attribution (scenario 9) cannot see
    // what the metrics cost. A call per request is the price.
    #[inline(never)]
    pub fn http(
        &self,
        dir: Direction,
        meta: &RequestMeta,
        peer_identity: Option<&Arc<str>>,
        outcome: &crate::types::Outcome,
        last: &LastSeries,
    ) {
        let status = outcome.status;
        let elapsed = outcome.duration.as_secs_f64();
        self.request(dir, status);
        let grpc_status = outcome
            .grpc_status
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map_or("", |v| {
                GRPC_STATUSES
                    .iter()
                    .find(|s| **s == v)
                    .copied()
                    .unwrap_or("other")
            });
        let status = status.as_u16();
        // Another request of the connection with the same labels (the usual case on a
        // keep-alive connection) skips hashing them into both families. Contended (h2
        // streams ending at once on several workers): the families, as without it.
        let mut slot = last.0.try_lock().ok();
        if let Some(Some(hit)) = slot.as_deref()
            && hit.counts(dir, meta, peer_identity, status, grpc_status)
        {
            hit.latency.observe(elapsed);
            hit.http.inc();
            return;
        }
        let class_idx = (status / 100).clamp(1, 5) as usize - 1;
        // Labels share the configuration's names: a request copies no string.
        let empty = || EMPTY.clone();
        let service = meta.service.clone().unwrap_or_else(empty);
        let route = meta.route.clone().unwrap_or_else(empty);
        let latency = self
            .latency
            .get_or_create(&LatencyLabels {
                direction: dir.as_str(),
                service: service.clone(),
                route: route.clone(),
                class: CLASSES[class_idx],
            })
            .clone();
        let http = self
            .http
            .get_or_create(&HttpLabels {
                direction: dir.as_str(),
                service,
                route,
                peer_identity: peer_identity.cloned().unwrap_or_else(empty),
                status_code: status,
                grpc_status,
            })
            .clone();
        latency.observe(elapsed);
        http.inc();
        if let Some(slot) = slot.as_mut() {
            **slot = Some(Series {
                dir,
                service: meta.service.clone(),
                route: meta.route.clone(),
                peer: peer_identity.cloned(),
                status,
                grpc_status,
                latency,
                http,
            });
        }
    }

    /// Counts a control-plane push by whether it was applied.
    pub fn push(&self, acked: bool) {
        let result = if acked { "acked" } else { "nacked" };
        self.pushes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a proxy-made error.
    pub fn error(&self, dir: Direction, reason: crate::error::Reason) {
        self.errors
            .get_or_create(&ErrorLabels {
                direction: dir.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts an accepted connection and returns a guard that keeps it in the open
    /// gauge until dropped.
    pub fn connection(&self, listener: &'static str) -> OpenConnection {
        self.connections
            .get_or_create(&ListenerLabels { listener })
            .inc();
        let gauge = self
            .open
            .get_or_create(&ListenerLabels { listener })
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts a configuration load.
    pub fn reload(&self, applied: bool, generation: u64) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if applied {
            self.generation.set(generation as i64);
        }
    }

    /// Counts a captured connection by what became of it.
    pub fn captured(&self, dir: Direction, outcome: &'static str) {
        self.captured
            .get_or_create(&CaptureLabels {
                direction: dir.as_str(),
                outcome,
            })
            .inc();
    }

    /// Counts a hedged try.
    pub fn hedge(&self) {
        self.hedges.inc();
    }

    /// Counts a retry.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// Counts an authorization decision.
    pub fn authz(&self, d: &sinew_model::authz::Decision) {
        use sinew_model::authz::DecidedBy;
        let (policy, rule) = match &d.by {
            DecidedBy::Rule { policy, rule, .. } => (policy.to_string(), rule.to_string()),
            DecidedBy::NoAllowMatch => ("no-allow-match".to_owned(), String::new()),
            DecidedBy::Default(_) => ("default".to_owned(), String::new()),
        };
        let decision = if d.allowed { "allow" } else { "deny" };
        self.authz
            .get_or_create(&AuthzLabels {
                decision,
                policy,
                rule,
            })
            .inc();
    }

    /// Records the installed certificate's expiry.
    pub fn certificate(&self, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.cert_expiry
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that do
    /// not ask for OpenMetrics (`promtool check metrics`, curl): counter metadata
    /// names the `_total` series, and there is no `# EOF` or `# UNIT`.
    pub fn encode_prometheus(&self) -> String {
        let open = self.encode();
        let mut out = String::with_capacity(open.len());
        let mut counters = std::collections::HashSet::new();
        for line in open.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ")
                && let Some(name) = rest.strip_suffix(" counter")
            {
                counters.insert(name.to_owned());
            }
        }
        for line in open.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let meta = ["# HELP ", "# TYPE "]
                .into_iter()
                .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
            match meta {
                Some((p, rest)) => {
                    let name = rest.split(' ').next().unwrap_or_default();
                    if counters.contains(name) {
                        out.push_str(p);
                        out.push_str(name);
                        out.push_str("_total");
                        out.push_str(&rest[name.len()..]);
                    } else {
                        out.push_str(line);
                    }
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Keeps a connection counted as open.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(status: u16) -> crate::types::Outcome {
        crate::types::Outcome {
            status: http::StatusCode::from_u16(status).unwrap(),
            grpc_status: None,
            error: None,
            duration: Duration::from_millis(3),
            head: Duration::from_millis(1),
            response_bytes: 0,
            end: crate::types::End::Complete,
        }
    }

    /// The value of the one line of `text` that starts with `series`.
    fn value(text: &str, series: &str) -> Option<f64> {
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(series)).collect();
        assert!(lines.len() <= 1, "{series} is ambiguous: {lines:?}");
        lines.first()?.rsplit(' ').next()?.parse().ok()
    }

    #[test]
    fn a_connections_requests_count_in_the_series_metrics_shows() {
        let m = Metrics::new();
        let last = LastSeries::default();
        let service: Arc<str> = Arc::from("web.shop");
        let route: Arc<str> = Arc::from("shop/web");
        let meta = RequestMeta {
            service: Some(service.clone()),
            route: Some(route.clone()),
            ..Default::default()
        };
        // Two alike (the second from the held series), one other status in between
        // and after it the first again, then the same names from a new configuration
        // (equal strings, other pointers), and an inbound request with a caller.
        for status in [200, 200, 503, 200, 200] {
            m.http(Direction::Outbound, &meta, None, &outcome(status), &last);
        }
        let reloaded = RequestMeta {
            service: Some(Arc::from("web.shop")),
            route: Some(Arc::from("shop/web")),
            ..Default::default()
        };
        m.http(Direction::Outbound, &reloaded, None, &outcome(200), &last);
        let caller: Arc<str> = Arc::from("spiffe://cluster.local/ns/shop/sa/front");
        for _ in 0..2 {
            m.http(
                Direction::Inbound,
                &meta,
                Some(&caller),
                &outcome(200),
                &last,
            );
        }

        let text = m.encode();
        let ok = r#"sinew_requests_total{direction="outbound",service="web.shop",route="shop/web",peer_identity="",status_code="200",grpc_status=""}"#;
        let failed = r#"sinew_requests_total{direction="outbound",service="web.shop",route="shop/web",peer_identity="",status_code="503",grpc_status=""}"#;
        let inbound = r#"sinew_requests_total{direction="inbound",service="web.shop",route="shop/web",peer_identity="spiffe://cluster.local/ns/shop/sa/front",status_code="200",grpc_status=""}"#;
        assert_eq!(value(&text, ok), Some(5.0), "{text}");
        assert_eq!(value(&text, failed), Some(1.0), "{text}");
        assert_eq!(value(&text, inbound), Some(2.0), "{text}");
        let latency_ok = r#"sinew_request_duration_seconds_count{direction="outbound",service="web.shop",route="shop/web",class="2xx"}"#;
        let latency_5xx = r#"sinew_request_duration_seconds_count{direction="outbound",service="web.shop",route="shop/web",class="5xx"}"#;
        assert_eq!(value(&text, latency_ok), Some(5.0), "{text}");
        assert_eq!(value(&text, latency_5xx), Some(1.0), "{text}");
    }
}
