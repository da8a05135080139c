//! Prometheus metrics on the admin `/metrics` endpoint.
//!
//! Label sets are small and fixed (direction, status class, listener kind, error
//! reason): no raw paths or hosts, so cardinality stays bounded. Hot counters are
//! resolved once at start-up, so a request increments an atomic and takes no lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which side of the proxy handled a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Mesh traffic to the local application.
    Inbound,
    /// Local application traffic to the mesh.
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    class: &'static str,
}

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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sinew");
        let requests_family = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests handled, by direction and response status class",
            requests_family.clone(),
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
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "proxy_errors",
            "Responses the proxy made itself, by sinew-error reason",
            errors.clone(),
        );
        let connections = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "Connections accepted, by listener",
            connections.clone(),
        );
        let open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "tcp_connections_open",
            "Connections open now, by listener",
            open.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration loads, by result (applied, rejected)",
            reloads.clone(),
        );
        let generation = Gauge::default();
        registry.register(
            "config_generation",
            "Generation of the applied configuration (0 before the first)",
            generation.clone(),
        );
        let authz = Family::<AuthzLabels, Counter>::default();
        registry.register(
            "authz_decisions",
            "Inbound authorization decisions, by decision and by the policy and rule that decided (policy \"default\" for the default)",
            authz.clone(),
        );
        let retries = Counter::default();
        registry.register("retries", "Retries sent (within budget)", retries.clone());
        let hedges = Counter::default();
        registry.register(
            "hedges",
            "Hedged second tries sent (within budget)",
            hedges.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the proxy's workload certificate expires (0 without one)",
            cert_expiry.clone(),
        );
        Metrics {
            hedges,
            retries,
            authz,
            cert_expiry,
            registry,
            requests,
            errors,
            connections,
            open,
            reloads,
            generation,
        }
    }

    /// Counts a request by its response status.
    pub fn request(&self, dir: Direction, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[dir as usize][class].inc();
    }

    /// Counts a proxy-made error.
    pub fn error(&self, dir: Direction, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                direction: dir.as_str(),
                reason,
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

    /// Prometheus/OpenMetrics text.
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
