//! The applied configuration snapshot and the state shared by every connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sinew_model::ProxyConfig;
use tokio::sync::watch;

use crate::balance::{Balancer, Endpoint};
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::pool::ConnPool;
use crate::types::{HYPER_MAX_HEADERS, HeadLimits, MESH_HEADER_ROOM};

/// One applied configuration, immutable. A request loads it once and uses it from
/// start to end; a reload swaps in a new one without touching requests in flight.
#[derive(Debug)]
pub struct Snapshot {
    /// Content hash of the source, as hex.
    pub version: String,
    /// Counts applied configurations from 1.
    pub generation: u64,
    /// When it was applied.
    pub applied_at: SystemTime,
    /// The compiled configuration.
    pub config: ProxyConfig,
    /// (Looked up on every request: hashed with foldhash, several times cheaper than
    /// the default SipHash for short keys. Keys come from configuration, not clients.)
    balancers: HashMap<String, Vec<(u16, Arc<Balancer>)>, foldhash::fast::RandomState>,
    app_pools: Vec<(u16, Arc<ConnPool>)>,
    /// Verifies end-user JWTs at the inbound (`None` without RequestAuthentication).
    pub jwt: Option<crate::jwt::JwtVerifier>,
    /// Retry budgets by rule, keyed by the address of this snapshot's own
    /// `Arc<RuleConfig>`: the snapshot holds those rules, so an address names one rule
    /// while it lives, and a request's lookup hashes one word instead of copying and
    /// hashing the route's name.
    budgets: HashMap<usize, Arc<crate::resilience::RetryBudget>, foldhash::fast::RandomState>,
    /// Rate limits of this proxy's own service, enforced at its inbound.
    pub rate_limits: Vec<Arc<crate::ratelimit::RateLimiter>>,
    /// The tracing pipeline (`None`: tracing off).
    pub tracing: Option<Arc<crate::trace::Tracing>>,
    /// This workload's service (`name.namespace`), the inbound requests' label.
    pub inbound_service: Option<Arc<str>>,
    /// Original destinations of captured traffic → services (`None` without capture).
    capture: Option<Box<CaptureTargets>>,
}

/// A snapshot's key for one of its rules: the rule's address.
fn rule_key(rule: &Arc<sinew_model::compile::RuleConfig>) -> usize {
    Arc::as_ptr(rule) as usize
}

/// Where captured connections go: a service's virtual IP, or a workload's
/// address:port, names the service (and port) they are for.
#[derive(Debug, Default)]
struct CaptureTargets {
    vips: HashMap<std::net::IpAddr, String>,
    endpoints: HashMap<SocketAddr, (String, u16)>,
}

impl CaptureTargets {
    fn new(config: &ProxyConfig) -> CaptureTargets {
        let mut t = CaptureTargets::default();
        for (key, svc) in &config.services {
            for ip in svc.virtual_ip.iter().chain(&svc.virtual_ips) {
                t.vips.entry(*ip).or_insert_with(|| key.clone());
            }
            for port in &svc.ports {
                for ep in &port.endpoints {
                    t.endpoints
                        .entry(ep.address)
                        .or_insert_with(|| (key.clone(), port.port));
                }
            }
        }
        t
    }
}

impl Snapshot {
    /// The balancer of a service port (`name.namespace`, port number).
    pub fn balancer(&self, service: &str, port: u16) -> Option<&Arc<Balancer>> {
        self.balancers
            .get(service)?
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, b)| b)
    }

    /// The retry budget of a route rule of this snapshot.
    pub fn budget(
        &self,
        rule: &Arc<sinew_model::compile::RuleConfig>,
    ) -> Option<&Arc<crate::resilience::RetryBudget>> {
        self.budgets.get(&rule_key(rule))
    }

    /// The mesh service (key, service port) a captured connection to `dst` is for:
    /// `dst` is a service's virtual IP and one of its ports, or a workload's
    /// address:port. `None`: not a mesh destination.
    pub fn captured(&self, dst: SocketAddr) -> Option<(&str, u16)> {
        let t = self.capture.as_deref()?;
        if let Some(key) = t.vips.get(&dst.ip()) {
            let svc = self.config.service(key)?;
            return svc.port(dst.port()).map(|p| (key.as_str(), p.port));
        }
        t.endpoints.get(&dst).map(|(k, p)| (k.as_str(), *p))
    }

    /// True when a captured connection to `dst` was addressed to a workload itself
    /// (its address:port), not to a service's virtual IP.
    pub fn addresses_workload(&self, dst: SocketAddr) -> bool {
        self.capture
            .as_deref()
            .is_some_and(|t| !t.vips.contains_key(&dst.ip()) && t.endpoints.contains_key(&dst))
    }

    /// The connection pool for a local application port (inbound).
    pub fn app_pool(&self, port: u16) -> Option<&Arc<ConnPool>> {
        self.app_pools
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, pool)| pool)
    }
}

/// A health checker per (service, port, endpoint address, check).
type CheckerKey = (
    String,
    u16,
    SocketAddr,
    sinew_model::compile::HealthCheckConfig,
);

/// Pools are per dial address and, toward a sidecar, per expected peer identity.
type PoolKey = (SocketAddr, Option<String>);

/// Endpoints are per (service, port, endpoint).
type EndpointKey = (String, u16, sinew_model::compile::EndpointConfig);

/// The balancers of a snapshot, by service key, then port.
type Balancers = HashMap<String, Vec<(u16, Arc<Balancer>)>, foldhash::fast::RandomState>;

/// Builds snapshots, reusing endpoint state and connection pools across reloads so
/// a swap keeps latency history and open connections.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    /// Counts outlier ejections across snapshots (the proxy's metric).
    pub ejections: prometheus_client::metrics::counter::Counter,
    endpoints: HashMap<EndpointKey, Arc<Endpoint>>,
    pools: HashMap<PoolKey, Arc<ConnPool>>,
    generation: u64,
    jwt: Option<crate::jwt::JwtVerifier>,
    budgets: HashMap<(String, usize), Arc<crate::resilience::RetryBudget>>,
    rate_limits: Vec<Arc<crate::ratelimit::RateLimiter>>,
    checkers: HashMap<CheckerKey, tokio::task::AbortHandle>,
    tracing: Option<Arc<crate::trace::Tracing>>,
}

impl SnapshotBuilder {
    /// Builds the snapshot for `config`; `certs` is the proxy's identity, used for
    /// mTLS toward peer sidecars.
    pub fn build(
        &mut self,
        config: ProxyConfig,
        version: String,
        settings: &Settings,
        certs: &Arc<sinew_tls::CertStore>,
    ) -> Snapshot {
        self.generation += 1;
        let mut pools = HashMap::new();
        let (balancers, endpoints) = self.balancers(&config, &mut pools, settings, certs);
        let app_pools = config
            .inbound
            .iter()
            .flat_map(|inb| {
                inb.ports
                    .iter()
                    .map(|p| (*p, SocketAddr::new(inb.app_address, *p)))
                    .collect::<Vec<_>>()
            })
            .map(|(port, addr)| (port, self.pool((addr, None), &mut pools, settings, certs)))
            .collect();
        self.health_checks(&config, &endpoints);
        self.endpoints = endpoints;
        self.pools = pools;
        let jwt = self.jwt(&config);
        let budgets = self.budgets(&config);
        let rate_limits = self.rate_limits(&config);
        // Kept while its settings stay the same, so spans queued survive a reload.
        let tracing = crate::trace::Tracing::for_config(self.tracing.as_ref(), &config);
        self.tracing = tracing.clone();
        let inbound_service = config
            .identity
            .as_ref()
            .and_then(|i| i.service_key())
            .map(Arc::from);
        let capture = config
            .capture
            .as_ref()
            .map(|_| Box::new(CaptureTargets::new(&config)));
        Snapshot {
            capture,
            version,
            generation: self.generation,
            applied_at: SystemTime::now(),
            config,
            balancers,
            app_pools,
            jwt,
            budgets,
            rate_limits,
            tracing,
            inbound_service,
        }
    }

    /// The connection pool for `key` in the snapshot being built (`pools`): the
    /// previous snapshot's when it had one, else a new one (mTLS toward a sidecar
    /// with an expected identity).
    fn pool(
        &self,
        key: PoolKey,
        pools: &mut HashMap<PoolKey, Arc<ConnPool>>,
        settings: &Settings,
        certs: &Arc<sinew_tls::CertStore>,
    ) -> Arc<ConnPool> {
        let (connect_timeout, limits) = (settings.connect_timeout, settings.limits);
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                self.pools.get(&key).cloned().unwrap_or_else(|| {
                    let (addr, identity) = key;
                    match identity.and_then(|i| i.parse::<sinew_tls::SpiffeId>().ok()) {
                        Some(id) => Arc::new(
                            ConnPool::mesh(addr, connect_timeout, certs.clone(), id)
                                .with_limits(limits),
                        ),
                        None => Arc::new(ConnPool::new(addr, connect_timeout).with_limits(limits)),
                    }
                })
            })
            .clone()
    }

    /// A balancer per service port, over endpoints kept from the previous snapshot
    /// where they are the same (latency history, outlier state); and the endpoints.
    fn balancers(
        &self,
        config: &ProxyConfig,
        pools: &mut HashMap<PoolKey, Arc<ConnPool>>,
        settings: &Settings,
        certs: &Arc<sinew_tls::CertStore>,
    ) -> (Balancers, HashMap<EndpointKey, Arc<Endpoint>>) {
        let mut endpoints = HashMap::new();
        let local_zone = config.identity.as_ref().and_then(|i| i.zone.clone());
        let mut balancers: HashMap<String, Vec<(u16, Arc<Balancer>)>, _> = HashMap::default();
        for (key, svc) in &config.services {
            for port in &svc.ports {
                let eps = port
                    .endpoints
                    .iter()
                    .map(|ec| {
                        let k = (key.clone(), port.port, ec.clone());
                        let key: PoolKey = match ec.sidecar {
                            Some(sc) => (sc, ec.identity.clone()),
                            None => (ec.address, None),
                        };
                        let ep = self.endpoints.get(&k).cloned().unwrap_or_else(|| {
                            let pool = self.pool(key.clone(), pools, settings, certs);
                            Arc::new(Endpoint::new(ec.clone(), pool))
                        });
                        pools.entry(key).or_insert_with(|| ep.pool.clone());
                        ep.pool.set_max_connections(
                            svc.traffic.max_connections_per_endpoint,
                            svc.traffic.max_pending_requests_per_endpoint,
                        );
                        endpoints.insert(k, ep.clone());
                        ep
                    })
                    .collect();
                balancers.entry(key.clone()).or_default().push((
                    port.port,
                    Arc::new(
                        Balancer::full(
                            eps,
                            svc.load_balancer,
                            svc.traffic.clone(),
                            local_zone.clone(),
                        )
                        .count_ejections(self.ejections.clone()),
                    ),
                ));
            }
        }
        (balancers, endpoints)
    }

    /// Active health checks: one checker per (endpoint without a sidecar, check),
    /// kept across reloads, stopped when no longer wanted.
    fn health_checks(
        &mut self,
        config: &ProxyConfig,
        endpoints: &HashMap<EndpointKey, Arc<Endpoint>>,
    ) {
        let mut checkers = HashMap::new();
        for (key, svc) in &config.services {
            let Some(hc) = &svc.traffic.health_check else {
                continue;
            };
            for port in &svc.ports {
                for ec in port.endpoints.iter().filter(|e| e.sidecar.is_none()) {
                    let ck = (key.clone(), port.port, ec.address, hc.clone());
                    if checkers.contains_key(&ck) {
                        continue;
                    }
                    let handle = self.checkers.remove(&ck).or_else(|| {
                        endpoints
                            .get(&(key.clone(), port.port, ec.clone()))
                            .and_then(|ep| crate::health::spawn(ep, hc.clone()))
                    });
                    if let Some(h) = handle {
                        checkers.insert(ck, h);
                    }
                }
            }
        }
        for (_, stale) in self.checkers.drain() {
            stale.abort();
        }
        self.checkers = checkers;
    }

    /// The JWT verifier: the previous one (and the keys it fetched) while its rules
    /// stay the same.
    fn jwt(&mut self, config: &ProxyConfig) -> Option<crate::jwt::JwtVerifier> {
        let rules = config
            .inbound
            .as_ref()
            .map(|i| i.jwt.as_slice())
            .unwrap_or(&[]);
        let jwt = if rules.is_empty() {
            None
        } else {
            match &self.jwt {
                Some(v) if v.same_rules(rules) => Some(v.clone()),
                _ => {
                    let v = crate::jwt::JwtVerifier::new(rules);
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        v.spawn_refresh(&rt);
                    }
                    Some(v)
                }
            }
        };
        self.jwt = jwt.clone();
        jwt
    }

    /// One retry budget per route rule, kept while its settings stay the same; by
    /// the address of this snapshot's rule.
    fn budgets(
        &mut self,
        config: &ProxyConfig,
    ) -> HashMap<usize, Arc<crate::resilience::RetryBudget>, foldhash::fast::RandomState> {
        let mut budgets = HashMap::new();
        let mut by_rule = HashMap::default();
        for svc in config.services.values() {
            for port in &svc.ports {
                for entry in port.routes.entries() {
                    let Some(retry) = &entry.rule.retry else {
                        continue;
                    };
                    let key = (entry.rule.route.to_string(), entry.rule.rule);
                    let b = match self.budgets.get(&key) {
                        Some(b) if b.same(retry) => b.clone(),
                        _ => Arc::new(crate::resilience::RetryBudget::new(
                            retry.budget_ratio,
                            retry.budget_min_per_second,
                        )),
                    };
                    by_rule.insert(rule_key(&entry.rule), b.clone());
                    budgets.insert(key, b);
                }
            }
        }
        self.budgets = budgets;
        by_rule
    }

    /// The inbound's rate limits: those of this proxy's own service, kept while
    /// their settings stay the same (so buckets survive a reload).
    fn rate_limits(&mut self, config: &ProxyConfig) -> Vec<Arc<crate::ratelimit::RateLimiter>> {
        let own = config
            .identity
            .as_ref()
            .and_then(|i| i.service_key())
            .and_then(|k| config.services.get(&k).cloned());
        let rate_limits: Vec<_> = own
            .map(|svc| svc.traffic.rate_limits.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|cfg| {
                self.rate_limits
                    .iter()
                    .find(|l| l.same(&cfg))
                    .cloned()
                    .unwrap_or_else(|| {
                        let new = crate::ratelimit::RateLimiter::new(cfg);
                        if let Some(prev) = self
                            .rate_limits
                            .iter()
                            .find(|l| l.config.name == new.config.name)
                        {
                            new.inherit(prev);
                        }
                        Arc::new(new)
                    })
            })
            .collect();
        self.rate_limits = rate_limits.clone();
        rate_limits
    }
}

/// Settings that do not come from the configuration file.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time allowed to open a connection to an endpoint.
    pub connect_timeout: Duration,
    /// Time a client has to send request headers.
    pub header_read_timeout: Duration,
    /// Request and response head limits, for every listener and upstream.
    pub limits: HeadLimits,
    /// Connections each listener holds open at once; at the cap it stops accepting
    /// until one closes.
    pub max_connections: usize,
    /// An HTTP/2 connection with no request for this long is closed gracefully
    /// (HTTP/1.1 ones close after `header_read_timeout` between requests).
    pub idle_timeout: Duration,
    /// A TCP stream (opaque, tunnelled, upgraded) with no byte either way for this
    /// long is closed.
    pub tcp_idle_timeout: Duration,
}

/// State shared by every listener and connection.
pub struct Shared {
    /// The applied configuration; `None` until the first load succeeds.
    pub snapshot: ArcSwapOption<Snapshot>,
    /// Metrics.
    pub metrics: Metrics,
    /// The drain: listeners, connections and relays watch it and hold its guards;
    /// [`crate::Proxy::shutdown`] runs it.
    pub drain: Drain,
    /// Settings.
    pub settings: Settings,
    /// The last configuration error, for `/config` and logs.
    pub last_error: Mutex<Option<String>>,
    /// False while a configured listener could not be bound.
    pub listeners_ok: AtomicBool,
    /// Configured listener address → the address actually bound.
    pub bound: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// The HTTP/1.1 server (a connection's protocol is detected by
    /// `serve::serve_http`).
    pub http1: http1::Builder,
    /// The HTTP/2 server (h2c by prior knowledge, and h2 inside the mesh's TLS).
    pub http2: http2::Builder<TokioExecutor>,
    /// This proxy's certificate and trust bundle (empty without an identity).
    pub certs: Arc<sinew_tls::CertStore>,
    /// The inbound's TLS config (its verifier and certificate follow `certs`).
    pub tls_server: Arc<rustls::ServerConfig>,
    /// True when the proxy must have a certificate to be ready (it has a join token).
    pub identity_required: AtomicBool,
    /// The access-log queue (its writer starts with the first line).
    pub access_log: crate::access::AccessLog,
    /// Live taps (`/tap`, and the control plane's).
    pub tap: crate::tap::Tap,
    /// Traffic stats for the control plane (on in control-plane mode).
    pub stats: crate::stats::Stats,
    /// Leaving the mesh at shutdown: asked by the proxy, done when the control
    /// plane has taken the workload out of every view.
    pub leave: watch::Sender<Leave>,
}

/// Where a proxy is in leaving the mesh (see [`Shared::leave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// Serving as usual.
    Staying,
    /// Shutting down: the control plane is to take the workload out of every view.
    Asked,
    /// The control plane has published the views without it.
    Done,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// New shared state, with an empty certificate store (a control plane fills it).
    pub fn new(settings: Settings) -> Shared {
        Self::with_certs(settings, sinew_tls::CertStore::new())
    }

    /// New shared state whose identity is `certs`: given in process (an embedding
    /// program, or a test with its own CA) instead of issued by a control plane.
    pub fn with_certs(settings: Settings, certs: Arc<sinew_tls::CertStore>) -> Shared {
        let limits = settings.limits;
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            // A head over the limits is answered 431 by hyper itself, before any
            // handler runs (the handler checks the exact byte count again).
            .max_buf_size((limits.request_header_bytes + MESH_HEADER_ROOM).max(8192))
            .keep_alive(true);
        if limits.request_headers > HYPER_MAX_HEADERS {
            // Only when raised: with a count set, hyper allocates and fills that many
            // header slots for every request it parses (~3,000 instructions a
            // request measured under callgrind), instead of its stack array of 100.
            http1.max_headers(limits.request_headers + 16);
        }
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            // Requests over it get a 431 on their own stream; the connection (shared
            // by a peer sidecar's clients) lives on.
            .max_header_list_size((limits.request_header_bytes + MESH_HEADER_ROOM) as u32)
            .enable_connect_protocol()
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        Shared {
            snapshot: ArcSwapOption::empty(),
            metrics: Metrics::new(),
            drain: Drain::new(),
            settings,
            last_error: Mutex::new(None),
            listeners_ok: AtomicBool::new(true),
            bound: Mutex::new(HashMap::new()),
            http1,
            http2,
            tls_server: certs.server_config(),
            certs,
            identity_required: AtomicBool::new(false),
            access_log: crate::access::AccessLog::default(),
            tap: crate::tap::Tap::default(),
            stats: crate::stats::Stats::default(),
            leave: watch::Sender::new(Leave::Staying),
        }
    }

    /// True when mesh TLS rules apply: the proxy has, or is waiting for, an identity.
    pub fn mtls_enforced(&self) -> bool {
        self.identity_required.load(Ordering::Relaxed) || self.certs.is_ready()
    }

    /// Ready: a configuration is applied, every listener is bound, the certificate
    /// is installed (when the proxy has an identity), not draining.
    pub fn is_ready(&self) -> bool {
        (!self.identity_required.load(Ordering::Relaxed) || self.certs.is_ready())
            && self.snapshot.load().is_some()
            && self.listeners_ok.load(Ordering::Relaxed)
            && !self.drain.is_draining()
            && *self.leave.borrow() == Leave::Staying
    }

    /// The last configuration or listener error, if the latest attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
impl Settings {
    /// Short timeouts and a small cap, for tests that need a [`Shared`].
    pub(crate) fn for_tests() -> Settings {
        Settings {
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            limits: Default::default(),
            max_connections: 16,
            idle_timeout: Duration::from_secs(300),
            tcp_idle_timeout: Duration::from_secs(3600),
        }
    }
}
