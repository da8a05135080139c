//! Endpoint selection: power of two choices over peak-EWMA latency (the default), or
//! round robin.
//!
//! Peak EWMA (Finagle, Linkerd): each endpoint keeps an exponentially weighted moving
//! average of response latency that jumps up at once on a slow response and decays
//! slowly back; its cost is that average times (outstanding requests + 1). Two
//! endpoints are drawn at random and the cheaper one wins, which avoids slow or busy
//! endpoints without the herding of "always pick the best".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sinew_model::compile::EndpointConfig;
use sinew_model::compile::TrafficConfig;
use sinew_model::resource::LoadBalancer;

use crate::pool::ConnPool;

/// Latency assumed for an endpoint with no history.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Decay time constant of the average.
const DECAY: Duration = Duration::from_secs(10);
/// Latency charged for a failed request, so a fast failure never looks attractive.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// The most a run of failures charges.
const MAX_PENALTY: Duration = Duration::from_secs(60);

/// One endpoint and what is known of it.
#[derive(Debug)]
pub struct Endpoint {
    /// The endpoint as configured.
    pub config: EndpointConfig,
    /// Connections to where requests go: the sidecar when there is one, else the app.
    pub pool: Arc<ConnPool>,
    pending: AtomicU32,
    ewma: Mutex<Ewma>,
    outlier: Mutex<OutlierState>,
    healthy: std::sync::atomic::AtomicBool,
    /// A probe connect is under way (one at a time, however many tries fail).
    probing: std::sync::atomic::AtomicBool,
}

/// How a try went, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not a 5xx.
    Ok,
    /// A 5xx, a reset, a timeout, a failed handshake.
    Failed,
    /// The connection was refused: nothing listens on the endpoint's port.
    Refused,
}

/// What outlier detection knows of an endpoint.
#[derive(Debug, Default)]
struct OutlierState {
    consecutive: u32,
    /// Refused connections in a row.
    refused: u32,
    window_start: Option<Instant>,
    window_ok: u32,
    window_failed: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

#[derive(Debug)]
struct Ewma {
    nanos: f64,
    at: Instant,
}

impl Endpoint {
    /// A fresh endpoint.
    pub fn new(config: EndpointConfig, pool: Arc<ConnPool>) -> Endpoint {
        Endpoint {
            config,
            pool,
            pending: AtomicU32::new(0),
            ewma: Mutex::new(Ewma {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
            }),
            outlier: Mutex::new(OutlierState::default()),
            healthy: std::sync::atomic::AtomicBool::new(true),
            probing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// False while active health checks say the endpoint is down.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Set by the health checker.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// True while outlier detection keeps the endpoint out.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ejected_until
            .is_some_and(|t| t > now)
    }

    /// Where the request is dialled: the sidecar, or the application itself.
    pub fn dial_addr(&self) -> SocketAddr {
        self.config.sidecar.unwrap_or(self.config.address)
    }

    fn cost(&self, now: Instant) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
        let decayed = e.nanos * (-elapsed / DECAY.as_secs_f64()).exp();
        let pending = self.pending.load(Ordering::Relaxed);
        decayed.max(1.0) * f64::from(pending + 1)
    }

    fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        let mut e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        if rtt > e.nanos {
            e.nanos = rtt;
        } else {
            let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            e.nanos = e.nanos * w + rtt * (1.0 - w);
        }
        e.at = now;
    }

    /// Marks a request outstanding until the returned guard completes or drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
            done: false,
        }
    }

    /// Requests outstanding now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// An outstanding request on an endpoint.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
    done: bool,
}

impl InFlight {
    /// Records the response latency (time to response headers).
    pub fn success(mut self) {
        self.endpoint.observe(self.started.elapsed());
        self.done = true;
    }

    /// Records a failure: charged at least [`FAILURE_PENALTY`], and twice what the
    /// endpoint cost before (up to [`MAX_PENALTY`]), so failures in a row make it
    /// costlier than any endpoint that answers, however slowly: a fast failure
    /// never looks attractive.
    pub fn failure(mut self) {
        let before = {
            let e = self.endpoint.ewma.lock().unwrap_or_else(|e| e.into_inner());
            Duration::from_nanos(e.nanos as u64)
        };
        let charge = self
            .started
            .elapsed()
            .max(FAILURE_PENALTY)
            .max(before.saturating_mul(2))
            .min(MAX_PENALTY);
        self.endpoint.observe(charge);
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one service port, how to choose among them, and the service's
/// circuit breaker and outlier detection.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    algorithm: LoadBalancer,
    next: AtomicUsize,
    traffic: TrafficConfig,
    in_flight: Arc<AtomicU32>,
    /// Consistent-hash ring: (point, endpoint index), sorted by point.
    ring: Vec<(u64, usize)>,
    /// This proxy's zone, for locality preference.
    local_zone: Option<String>,
    /// Counts outlier ejections (`sinew_outlier_ejections_total`), when attached.
    ejections: Option<prometheus_client::metrics::counter::Counter>,
}

/// Outlier detection for a service without a `TrafficPolicy`: an endpoint that
/// refuses a connection (nothing listens: a restart, a killed process) is ejected at
/// once, for 5 s, growing with each ejection; other failures eject nothing (only a
/// policy says how many are too many). At most half the endpoints are out at once.
const REFUSALS_ONLY: sinew_model::compile::OutlierConfig = sinew_model::compile::OutlierConfig {
    consecutive_failures: u32::MAX,
    consecutive_refusals: 1,
    failure_percent: None,
    minimum_requests: u32::MAX,
    interval_ms: 10_000,
    base_ejection_ms: 5_000,
    max_ejection_percent: 50,
};

/// Points per endpoint on the ring (more: smoother shares).
const VNODES: usize = 100;

/// A stable 64-bit hash (SipHash with fixed keys), for ring points and request keys.
pub fn hash64(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// Why the circuit breaker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Too many requests in flight to the service.
    MaxRequests,
    /// Too many requests in flight to the endpoint.
    MaxRequestsPerEndpoint,
}

impl Overflow {
    /// The limit's name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::MaxRequests => "maxRequests",
            Overflow::MaxRequestsPerEndpoint => "maxRequestsPerEndpoint",
        }
    }
}

/// A request admitted by the circuit breaker; its slot is released on drop.
#[derive(Debug)]
pub struct Admitted(Arc<AtomicU32>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Arc<Endpoint>>, algorithm: LoadBalancer) -> Balancer {
        Self::with_traffic(endpoints, algorithm, TrafficConfig::default())
    }

    /// A balancer with a circuit breaker and outlier detection.
    pub fn with_traffic(
        endpoints: Vec<Arc<Endpoint>>,
        algorithm: LoadBalancer,
        traffic: TrafficConfig,
    ) -> Balancer {
        Self::full(endpoints, algorithm, traffic, None)
    }

    /// A balancer with every policy, for a proxy in `local_zone`.
    pub fn full(
        endpoints: Vec<Arc<Endpoint>>,
        algorithm: LoadBalancer,
        traffic: TrafficConfig,
        local_zone: Option<String>,
    ) -> Balancer {
        let mut ring = Vec::new();
        if traffic.ring_hash.is_some() {
            for (i, e) in endpoints.iter().enumerate() {
                for v in 0..VNODES {
                    ring.push((hash64(format!("{}#{v}", e.config.address).as_bytes()), i));
                }
            }
            ring.sort_unstable();
        }
        let mut traffic = traffic;
        if traffic.outlier.is_none() {
            traffic.outlier = Some(REFUSALS_ONLY);
        }
        Balancer {
            endpoints,
            algorithm,
            next: AtomicUsize::new(0),
            local_zone: local_zone.filter(|_| traffic.locality_preference),
            traffic,
            in_flight: Arc::new(AtomicU32::new(0)),
            ring,
            ejections: None,
        }
    }

    /// Counts this balancer's ejections on `counter`.
    pub fn count_ejections(
        mut self,
        counter: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        self.ejections = Some(counter);
        self
    }

    /// The ring's key setting, if the service hashes.
    pub fn hash_key(&self) -> Option<&sinew_model::compile::HashKey> {
        self.traffic.ring_hash.as_ref()
    }

    /// The circuit breaker: admits a request to `endpoint`, or says which limit it
    /// would exceed. Overflow is answered at once, never queued.
    pub fn admit(&self, endpoint: &Endpoint) -> Result<Admitted, Overflow> {
        if let Some(max) = self.traffic.max_requests_per_endpoint
            && endpoint.pending() >= max
        {
            return Err(Overflow::MaxRequestsPerEndpoint);
        }
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(self.in_flight.clone());
        if let Some(max) = self.traffic.max_requests
            && now >= max
        {
            return Err(Overflow::MaxRequests);
        }
        Ok(admitted)
    }

    /// After a try failed on a broken connection: the endpoint may be gone, and the
    /// balancer may not send it another try for a while (peak EWMA charges a failure
    /// 1 s), so one connect tells; a refusal ejects it. At most one probe per
    /// endpoint at a time, and only with outlier detection on.
    pub fn probe(self: &Arc<Self>, endpoint: &Arc<Endpoint>) {
        if self.traffic.outlier.is_none() || endpoint.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (balancer, endpoint) = (self.clone(), endpoint.clone());
        tokio::spawn(async move {
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(endpoint.pool.addr()),
            )
            .await;
            if let Ok(Err(e)) = probe
                && e.kind() == std::io::ErrorKind::ConnectionRefused
            {
                balancer.report(&endpoint, Outcome::Refused);
            }
            endpoint.probing.store(false, Ordering::Release);
        });
    }

    /// Outlier detection: records how a request to `endpoint` went, and ejects it
    /// after too many failures, or refused connections, in a row (never more than
    /// the maximum share at once). Its ejection time grows with every ejection.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        let ok = outcome == Outcome::Ok;
        let Some(cfg) = &self.traffic.outlier else {
            return;
        };
        let now = Instant::now();
        let mut st = endpoint.outlier.lock().unwrap_or_else(|e| e.into_inner());
        let window = Duration::from_millis(cfg.interval_ms);
        if st
            .window_start
            .is_none_or(|t| now.duration_since(t) >= window)
        {
            st.window_start = Some(now);
            st.window_ok = 0;
            st.window_failed = 0;
        }
        if ok {
            st.consecutive = 0;
            st.refused = 0;
            st.window_ok += 1;
            return;
        }
        st.consecutive = st.consecutive.saturating_add(1);
        st.refused = if outcome == Outcome::Refused {
            st.refused + 1
        } else {
            0
        };
        st.window_failed += 1;
        if st.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        let total = st.window_ok + st.window_failed;
        let by_rate = cfg
            .failure_percent
            .is_some_and(|p| total >= cfg.minimum_requests && st.window_failed * 100 >= p * total);
        if st.consecutive < cfg.consecutive_failures
            && st.refused < cfg.consecutive_refusals
            && !by_rate
        {
            return;
        }
        drop(st);
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let limit = self.endpoints.len() * cfg.max_ejection_percent as usize / 100;
        if ejected >= limit.max(if self.endpoints.len() > 1 { 1 } else { 0 }) {
            return;
        }
        let mut st = endpoint.outlier.lock().unwrap_or_else(|e| e.into_inner());
        st.ejections += 1;
        st.ejected_until = Some(now + Duration::from_millis(cfg.base_ejection_ms) * st.ejections);
        st.consecutive = 0;
        st.refused = 0;
        st.window_start = None;
        tracing::warn!(endpoint = %endpoint.config.address, ejections = st.ejections, "endpoint ejected");
        if let Some(c) = &self.ejections {
            c.inc();
        }
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Another endpoint than `not`, for a retry or a resend: an available one when
    /// there is one (chosen by the algorithm), else any other. `None` when `not` is
    /// the only endpoint.
    pub fn pick_other(&self, not: &Arc<Endpoint>) -> Option<&Arc<Endpoint>> {
        let now = Instant::now();
        let others: Vec<&Arc<Endpoint>> = self
            .endpoints
            .iter()
            .filter(|e| !Arc::ptr_eq(e, not))
            .collect();
        let usable: Vec<&Arc<Endpoint>> = others
            .iter()
            .copied()
            .filter(|e| e.is_healthy() && !e.is_ejected(now))
            .collect();
        if usable.is_empty() {
            self.pick_from(others)
        } else {
            self.pick_from(usable)
        }
    }

    /// Picks an endpoint, skipping unavailable ones (unhealthy, ejected) unless every
    /// one is: then any, rather than none. `None` when there are none.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        self.pick_for(None)
    }

    /// Like [`pick`](Self::pick), for a request whose ring key hashes to `key`: with
    /// a ring, the first available endpoint clockwise from it (sticky); otherwise the
    /// algorithm, preferring the proxy's zone when asked to.
    pub fn pick_for(&self, key: Option<u64>) -> Option<&Arc<Endpoint>> {
        let now = Instant::now();
        let usable = |e: &Arc<Endpoint>| {
            e.is_healthy() && (self.traffic.outlier.is_none() || !e.is_ejected(now))
        };
        if let (Some(h), false) = (key, self.ring.is_empty()) {
            let start = self.ring.partition_point(|(p, _)| *p < h);
            for k in 0..self.ring.len() {
                let (_, i) = self.ring[(start + k) % self.ring.len()];
                if usable(&self.endpoints[i]) {
                    return self.endpoints.get(i);
                }
            }
            return self.endpoints.first();
        }
        if let Some(zone) = &self.local_zone {
            let local: Vec<&Arc<Endpoint>> = self
                .endpoints
                .iter()
                .filter(|e| e.config.zone.as_deref() == Some(zone.as_str()) && usable(e))
                .collect();
            if !local.is_empty() {
                return self.pick_from(local);
            }
            // Spill over: nothing available in the zone.
        }
        let n = self.endpoints.iter().filter(|e| usable(e)).count();
        if n == 0 {
            return self.pick_from(self.endpoints.iter().collect());
        }
        if n == self.endpoints.len() {
            return self.pick_among(&self.endpoints);
        }
        self.pick_from(self.endpoints.iter().filter(|e| usable(e)).collect())
    }

    fn pick_from<'a>(&'a self, eps: Vec<&'a Arc<Endpoint>>) -> Option<&'a Arc<Endpoint>> {
        let i = self.choose(eps.len(), |i| eps[i])?;
        eps.get(i).copied()
    }

    fn pick_among<'a>(&'a self, eps: &'a [Arc<Endpoint>]) -> Option<&'a Arc<Endpoint>> {
        let i = self.choose(eps.len(), |i| &eps[i])?;
        eps.get(i)
    }

    fn choose<'a>(&self, n: usize, at: impl Fn(usize) -> &'a Arc<Endpoint>) -> Option<usize> {
        match n {
            0 => None,
            1 => Some(0),
            _ => match self.algorithm {
                LoadBalancer::RoundRobin => Some(self.next.fetch_add(1, Ordering::Relaxed) % n),
                LoadBalancer::PeakEwma => {
                    let a = fastrand::usize(..n);
                    let mut b = fastrand::usize(..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let now = Instant::now();
                    Some(if at(a).cost(now) <= at(b).cost(now) {
                        a
                    } else {
                        b
                    })
                }
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    /// An endpoint on loopback `port`, no sidecar (also for the send loop's tests).
    pub(crate) fn ep(port: u16) -> Arc<Endpoint> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        Arc::new(Endpoint::new(
            EndpointConfig {
                workload: format!("test/{port}"),
                address: addr,
                sidecar: None,
                identity: None,
                zone: None,
            },
            Arc::new(ConnPool::new(addr, Duration::from_secs(1))),
        ))
    }

    #[test]
    fn round_robin_cycles() {
        let b = Balancer::new(vec![ep(1), ep(2), ep(3)], LoadBalancer::RoundRobin);
        let ports: Vec<u16> = (0..6)
            .filter_map(|_| b.pick().map(|e| e.config.address.port()))
            .collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn peak_ewma_avoids_a_slow_endpoint() {
        let slow = ep(1);
        let fast = ep(2);
        slow.observe(Duration::from_millis(500));
        fast.observe(Duration::from_millis(1));
        let b = Balancer::new(vec![slow, fast], LoadBalancer::PeakEwma);
        for _ in 0..100 {
            assert_eq!(b.pick().map(|e| e.config.address.port()), Some(2));
        }
    }

    #[test]
    fn peak_ewma_avoids_a_busy_endpoint() {
        let busy = ep(1);
        let idle = ep(2);
        let _guards: Vec<InFlight> = (0..10).map(|_| busy.start()).collect();
        let b = Balancer::new(vec![busy.clone(), idle], LoadBalancer::PeakEwma);
        let mut idle_picks = 0;
        for _ in 0..100 {
            if b.pick().map(|e| e.config.address.port()) == Some(2) {
                idle_picks += 1;
            }
        }
        assert_eq!(idle_picks, 100);
        assert_eq!(busy.pending(), 10);
    }

    #[test]
    fn in_flight_guard_releases_on_drop_and_failure_is_penalised() {
        let e = ep(1);
        let g = e.start();
        assert_eq!(e.pending(), 1);
        g.failure();
        assert_eq!(e.pending(), 0);
        assert!(e.cost(Instant::now()) >= FAILURE_PENALTY.as_nanos() as f64 * 0.99);
    }

    #[test]
    fn a_refused_connection_ejects_at_once_other_failures_need_a_run() {
        let outlier = sinew_model::compile::OutlierConfig {
            consecutive_failures: 3,
            consecutive_refusals: 1,
            failure_percent: None,
            minimum_requests: 20,
            interval_ms: 10_000,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
        };
        let traffic = TrafficConfig {
            outlier: Some(outlier.clone()),
            ..TrafficConfig::default()
        };
        let (a, b, c) = (ep(1), ep(2), ep(3));
        let bal = Balancer::with_traffic(
            vec![a.clone(), b.clone(), c.clone()],
            LoadBalancer::RoundRobin,
            traffic,
        );
        let now = Instant::now();
        // 5xx-like failures: ejected at the third in a row, a success resets.
        bal.report(&a, Outcome::Failed);
        bal.report(&a, Outcome::Failed);
        bal.report(&a, Outcome::Ok);
        bal.report(&a, Outcome::Failed);
        bal.report(&a, Outcome::Failed);
        assert!(!a.is_ejected(now));
        bal.report(&a, Outcome::Failed);
        assert!(a.is_ejected(Instant::now()));
        // A refusal: at once (its own count; the 50% cap leaves room for one).
        let traffic = TrafficConfig {
            outlier: Some(outlier),
            ..TrafficConfig::default()
        };
        let bal = Balancer::with_traffic(
            vec![b.clone(), c.clone()],
            LoadBalancer::RoundRobin,
            traffic,
        );
        bal.report(&b, Outcome::Refused);
        assert!(b.is_ejected(Instant::now()));
        // Never more than the maximum share: c stays in even when refused.
        bal.report(&c, Outcome::Refused);
        assert!(!c.is_ejected(Instant::now()));
        let picked: Vec<u16> = (0..4)
            .filter_map(|_| bal.pick().map(|e| e.config.address.port()))
            .collect();
        assert_eq!(
            picked,
            vec![3, 3, 3, 3],
            "the ejected endpoint gets nothing"
        );
    }
}
