//! The send loops. [`failover`] is the one every upstream attempt goes through that
//! has no plan of its own: a mirror's copy (one try), an opaque TCP connection (a
//! connect that fails goes to another endpoint). [`Tries`] carries out an HTTP
//! request's plan: the first try goes to the endpoint picked for it; a request no
//! endpoint saw (refused, GOAWAY) is resent elsewhere; a crashed endpoint costs a
//! safe request one more try; the route's retry policy retries within its budget,
//! after a backoff; a slow first try may be hedged. Each try is
//! [`super::send_attempt`], which reports to the balancer. Both pick the next
//! endpoint with [`elsewhere`], and build a head for an endpoint with [`mesh_marks`]
//! and [`target`].

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use sinew_model::compile::{HedgeConfig, RetryConfig, RuleConfig};
use tokio::time::Instant;

use super::plan::MESH_HEADERS;
use super::{MAX_RESENDS, Payload, RETRY_ATTEMPT, Resend, copy_head, send_attempt};
use crate::balance::{Balancer, Endpoint, Outcome};
use crate::body::{ReqBody, Watch};
use crate::error::{ProxyError, Reason};
use crate::http_util::{self, DST_PORT, ORIG_PROTO};
use crate::pool::{Reached, SendError, Version as UpVersion};
use crate::resilience::{self, RetryBudget};
use crate::types::{ConnCtx, Direction};

/// How [`failover`] tries endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failover {
    /// Endpoints tried at most: 1 tries only the first.
    pub tries: u32,
    /// Whether each try's outcome goes to outlier detection.
    pub report: bool,
}

impl Failover {
    /// A mirror's copy: one try, never retried (best effort, and never worth a
    /// second request), its outcome no sign of the endpoint's health for the
    /// primary traffic.
    pub const MIRROR: Failover = Failover {
        tries: 1,
        report: false,
    };
    /// Opaque TCP to a service: a connection that cannot be made is made to
    /// another endpoint (nothing was sent yet, so the application never notices).
    pub const TCP: Failover = Failover {
        tries: 2,
        report: true,
    };
    /// Opaque TCP to the one endpoint the application addressed: nowhere else.
    pub const PINNED: Failover = Failover {
        tries: 1,
        report: true,
    };
}

/// The endpoint-failover loop: `attempt` against `first` (else the balancer's
/// pick), then, while the error says another endpoint may succeed
/// ([`ProxyError::retryable`]) and `policy` allows another try, against another
/// endpoint. Each outcome goes to outlier detection when `policy` says so (a refusal
/// as such: [`ProxyError::connection_refused`]). The error is the last try's, or
/// [`ProxyError::NoEndpoints`] (naming `service`) when there was no endpoint to try
/// first. Generic over the attempt: no boxing, one future.
pub(crate) async fn failover<T, F, Fut>(
    balancer: &Balancer,
    first: Option<Arc<Endpoint>>,
    policy: Failover,
    service: &str,
    mut attempt: F,
) -> Result<T, ProxyError>
where
    F: FnMut(Arc<Endpoint>) -> Fut,
    Fut: Future<Output = Result<T, ProxyError>>,
{
    let Some(mut endpoint) = first.or_else(|| balancer.pick().cloned()) else {
        return Err(ProxyError::NoEndpoints(service.to_owned()));
    };
    let mut tried = 1;
    loop {
        let result = attempt(endpoint.clone()).await;
        if policy.report {
            balancer.report(&endpoint, outcome(result.as_ref().err()));
        }
        let error = match result {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if !error.retryable() || tried >= policy.tries {
            return Err(error);
        }
        let Some(next) = elsewhere(balancer, None, &endpoint) else {
            return Err(error);
        };
        tracing::debug!(endpoint = %endpoint.config.address, %error, "trying another endpoint");
        endpoint = next;
        tried += 1;
    }
}

/// How a try went, for outlier detection: `None` is an answer.
pub(super) fn outcome(error: Option<&ProxyError>) -> Outcome {
    match error {
        None => Outcome::Ok,
        Some(e) if e.connection_refused() => Outcome::Refused,
        Some(_) => Outcome::Failed,
    }
}

/// The endpoint of a try after one to `not`: the pinned one when the request is
/// pinned, else another one when there is one, else any.
pub(super) fn elsewhere(
    balancer: &Balancer,
    pinned: Option<&Arc<Endpoint>>,
    not: &Arc<Endpoint>,
) -> Option<Arc<Endpoint>> {
    if let Some(p) = pinned {
        return Some(p.clone());
    }
    balancer
        .pick_other(not)
        .or_else(|| balancer.pick())
        .cloned()
}

/// Marks a head for `endpoint`: for its sidecar, the port to deliver to and (when
/// the application does not speak HTTP/2 itself) the protocol to speak to it; for
/// an application reached directly, no marks (a head built for a sidecar before,
/// a resend elsewhere, loses them). Says whether the try speaks HTTP/2.
#[inline]
pub(super) fn mesh_marks(endpoint: &Endpoint, app_h2: bool, headers: &mut http::HeaderMap) -> bool {
    if endpoint.config.sidecar.is_some() {
        headers.insert(DST_PORT, HeaderValue::from(endpoint.config.address.port()));
        if !app_h2 {
            headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        true
    } else {
        http_util::remove_headers(headers, &MESH_HEADERS);
        app_h2
    }
}

/// Sets a head's target (authority, path) for the try's protocol, and says which
/// that is.
#[inline]
pub(super) fn target(
    p: &mut Parts,
    authority: &Authority,
    new_path: Option<PathAndQuery>,
    upstream_h2: bool,
) -> Result<UpVersion, ProxyError> {
    http_util::set_target(p, authority, new_path, upstream_h2)?;
    Ok(if upstream_h2 {
        UpVersion::Http2
    } else {
        UpVersion::Http1
    })
}

/// What every try of one request shares, borrowed from the request's plan and
/// snapshot.
pub(super) struct Tries<'a> {
    pub ctx: &'a ConnCtx,
    pub rule: &'a RuleConfig,
    /// The backend's service key, for "no endpoints" errors.
    pub service: &'a str,
    pub balancer: &'a Arc<Balancer>,
    /// The one endpoint every try goes to, for a captured connection to it.
    pub pinned: Option<Arc<Endpoint>>,
    pub retry: Option<&'a RetryConfig>,
    pub budget: Option<&'a RetryBudget>,
    pub authority: &'a Authority,
    pub new_path: &'a Option<PathAndQuery>,
    pub app_h2: bool,
    pub grpc: bool,
    pub safe: bool,
    /// When the request started being sent, and its deadline.
    pub now: Instant,
    pub deadline: Option<Instant>,
    /// Every try gets a copy of the head (else the only try takes it).
    pub keep_head: bool,
    pub body_limit: Option<u64>,
}

/// How the tries ended: the answer (or the last error), the retries it took, and
/// whether the hedge answered.
pub(super) struct Sent {
    pub result: Result<Response<Incoming>, ProxyError>,
    pub attempt: u32,
    pub hedged: bool,
}

/// What changes from one try to the next.
struct State {
    attempt: u32,
    hedged: bool,
    previous: Option<Arc<Endpoint>>,
    /// A request an endpoint never saw, to send elsewhere: its endpoint and the
    /// request itself when it came back whole.
    resend: Option<Resend>,
    /// Set when a streamed request body failed on the client's side.
    body_failed: Option<Arc<Watch>>,
    resends: u32,
}

impl Tries<'_> {
    /// Sends the request, first to `endpoint`, until an answer is final.
    pub async fn run(&self, endpoint: Arc<Endpoint>, payload: &mut Payload, parts: Parts) -> Sent {
        let mut parts = Some(parts);
        let mut st = State {
            attempt: 0,
            hedged: false,
            previous: None,
            resend: None,
            body_failed: None,
            resends: 0,
        };
        let hedge_after = self.hedge_after(payload);
        loop {
            let result = self
                .one(&mut st, &endpoint, payload, &mut parts, hedge_after)
                .await;
            let (ep, result) = match result {
                Ok(x) => x,
                Err(e) => return self.sent(Err(e), &st),
            };
            let Some(result) = result else { continue };
            // A captured body becomes replayable once it has been sent whole.
            if let Payload::Captured(_, c) = &*payload
                && let Some(bytes) = c.replay()
            {
                *payload = Payload::Bytes(bytes);
            }
            if let Some(until) = self.again(&mut st, &ep, &result, payload) {
                // Decided without a future; only a retry's backoff waits.
                if let Some(until) = until {
                    tokio::time::sleep_until(until).await;
                }
                continue;
            }
            return self.sent(result, &st);
        }
    }

    fn sent(&self, result: Result<Response<Incoming>, ProxyError>, st: &State) -> Sent {
        Sent {
            result,
            attempt: st.attempt,
            hedged: st.hedged,
        }
    }

    /// One try (hedged, when it is the first and the policy hedges): the endpoint it
    /// went to and its result, or `None` when it goes to another endpoint unseen.
    async fn one(
        &self,
        st: &mut State,
        endpoint: &Arc<Endpoint>,
        payload: &mut Payload,
        parts: &mut Option<Parts>,
        hedge_after: Option<Duration>,
    ) -> Result<
        (
            Arc<Endpoint>,
            Option<Result<Response<Incoming>, ProxyError>>,
        ),
        ProxyError,
    > {
        let endpoint = if let Some((e, _)) = &st.resend {
            e.clone()
        } else if st.attempt == 0 {
            endpoint.clone()
        } else {
            // A retry goes elsewhere when there is anywhere else to go.
            let p = st.previous.clone().unwrap_or_else(|| endpoint.clone());
            self.elsewhere(&p)
                .ok_or_else(|| ProxyError::NoEndpoints(self.service.to_owned()))?
        };
        let (body, head_now) = match st.resend.take().and_then(|(_, r)| r) {
            Some(back) => {
                let (p, b) = back.into_parts();
                (b, p)
            }
            None => (self.body(st, payload), self.head(parts)?),
        };
        let (req, version, per_try) = self.build(&endpoint, st.attempt, body, head_now)?;
        let started = Instant::now();
        let result = {
            // One slot for this try, hedged or not, keeps the request's future small.
            let first = send_attempt(
                self.balancer,
                &endpoint,
                req,
                version,
                per_try,
                st.body_failed.as_deref(),
            );
            tokio::pin!(first);
            match (st.attempt, hedge_after, &*payload) {
                (0, Some(after), Payload::Bytes(bytes)) => {
                    let bytes = bytes.clone();
                    match tokio::time::timeout(after, &mut first).await {
                        Ok(r) => r,
                        Err(_) => {
                            // The hedge itself is the rare path, boxed so the common
                            // future stays small.
                            let (r, by_hedge) =
                                Box::pin(self.hedge(first, &endpoint, bytes, parts)).await;
                            st.hedged = by_hedge;
                            r
                        }
                    }
                }
                _ => first.await,
            }
        };
        if let (Some(b), Ok(_)) = (self.budget, &result) {
            b.record_latency(started.elapsed());
        }
        Ok((
            endpoint.clone(),
            self.unreached(st, &endpoint, result, payload),
        ))
    }

    /// The body of the next try.
    #[inline]
    fn body(&self, st: &mut State, payload: &mut Payload) -> ReqBody {
        match payload {
            Payload::Bytes(b) => ReqBody::Buffered(b.clone()),
            Payload::Stream(s) => s.take().map_or(ReqBody::Empty, |b| {
                let watch = st
                    .body_failed
                    .get_or_insert_with(|| Arc::new(Watch::new(self.body_limit)));
                ReqBody::Watched(b, watch.clone())
            }),
            Payload::Captured(s, c) => s
                .take()
                .map_or(ReqBody::Empty, |b| ReqBody::Captured(b, c.clone())),
        }
    }

    /// The head of the next try: a copy when there may be another.
    fn head(&self, parts: &mut Option<Parts>) -> Result<Parts, ProxyError> {
        if self.keep_head {
            parts
                .as_ref()
                .ok_or(ProxyError::Malformed("request head already sent"))
                .map(copy_head)
        } else {
            parts
                .take()
                .ok_or(ProxyError::Malformed("request head already sent"))
        }
    }

    /// How long the first try may take before a hedge goes out, when the policy
    /// hedges and the body can be sent twice.
    fn hedge_after(&self, payload: &Payload) -> Option<Duration> {
        self.retry
            .and_then(|r| r.hedge.as_ref())
            .filter(|_| matches!(payload, Payload::Bytes(_)))
            .and_then(|h| match h {
                HedgeConfig::DelayMs(ms) => Some(Duration::from_millis(*ms)),
                HedgeConfig::Percentile(p) => self.budget.and_then(|b| b.latency_percentile(*p)),
            })
    }

    /// Hedging: the first try is slow, so a second goes elsewhere; the first good
    /// answer wins and the other is dropped (cancelled). Says whether the hedge won.
    async fn hedge<F>(
        &self,
        mut first: std::pin::Pin<&mut F>,
        endpoint: &Arc<Endpoint>,
        bytes: Option<bytes::Bytes>,
        parts: &mut Option<Parts>,
    ) -> (Result<Response<Incoming>, SendError>, bool)
    where
        F: Future<Output = Result<Response<Incoming>, SendError>>,
    {
        let second = self
            .elsewhere(endpoint)
            .filter(|_| self.budget.is_none_or(|b| b.try_retry()));
        let Some(ep2) = second else {
            return (first.await, false);
        };
        self.ctx.shared.metrics.hedge();
        let Ok(head2) = self.head(parts) else {
            return (first.await, false);
        };
        let (req2, v2, t2) = match self.build(&ep2, 1, ReqBody::Buffered(bytes), head2) {
            Ok(x) => x,
            Err(_) => return (first.await, false),
        };
        let second = send_attempt(self.balancer, &ep2, req2, v2, t2, None);
        tokio::pin!(second);
        let good = |r: &Result<Response<Incoming>, SendError>| matches!(r, Ok(resp) if !resp.status().is_server_error());
        tokio::select! {
            r = &mut first => if good(&r) { (r, false) } else { (second.await, true) },
            r = &mut second => if good(&r) { (r, true) } else { (first.await, false) },
        }
    }

    /// Never seen by the endpoint: another one takes it, whatever the method and
    /// the route's retry policy (not a retry: the request was not tried). `None`
    /// when it is resent.
    #[inline]
    fn unreached(
        &self,
        st: &mut State,
        endpoint: &Arc<Endpoint>,
        result: Result<Response<Incoming>, SendError>,
        payload: &Payload,
    ) -> Option<Result<Response<Incoming>, ProxyError>> {
        let e = match result {
            Err(e) if e.never_reached() && st.resends < MAX_RESENDS => e,
            other => return Some(other.map_err(ProxyError::from)),
        };
        let back = match e.reached {
            Reached::No(back) => back,
            Reached::Maybe => None,
        };
        let replayable = back.is_some() || (self.keep_head && matches!(payload, Payload::Bytes(_)));
        // A stream the peer refused or excluded by its GOAWAY (an HTTP/2 error, not a
        // failed connect) may go to the same endpoint again, on a new connection,
        // when there is no other.
        let again = matches!(e.error, ProxyError::Upstream { .. }).then(|| endpoint.clone());
        match self
            .elsewhere(endpoint)
            .filter(|e| !Arc::ptr_eq(e, endpoint))
            .or(again)
        {
            Some(next) if replayable => {
                tracing::debug!(endpoint = %endpoint.config.address, error = %e.error, "not reached; sending elsewhere");
                self.ctx
                    .shared
                    .metrics
                    .error(Direction::Outbound, Reason::ResentUnreached);
                st.resends += 1;
                st.resend = Some((next, back));
                None
            }
            other => {
                tracing::debug!(replayable, next = ?other.map(|e| e.config.address), "not reached; nowhere else to send it");
                Some(Err(e.error))
            }
        }
    }

    /// Whether to try again after `result` from `endpoint`: `None` no; `Some(None)`
    /// at once (a crashed endpoint); `Some(Some(t))` at `t`, after a retry's backoff.
    fn again(
        &self,
        st: &mut State,
        endpoint: &Arc<Endpoint>,
        result: &Result<Response<Incoming>, ProxyError>,
        payload: &Payload,
    ) -> Option<Option<Instant>> {
        let bytes = matches!(payload, Payload::Bytes(_));
        // Without a retry policy, a safe request (GET, HEAD, OPTIONS, TRACE: RFC
        // 9110 §9.2.2 lets a client repeat them) whose endpoint broke the connection
        // before answering (a crash, a kill) is tried once more elsewhere: one
        // instance dying costs its callers nothing.
        if crashed(endpoint, result)
            && self.retry.is_none()
            && st.attempt == 0
            && self.safe
            && self.keep_head
            && bytes
        {
            st.attempt += 1;
            self.ctx.shared.metrics.retry();
            st.previous = Some(endpoint.clone());
            return Some(None);
        }
        let should_retry = match (result, self.retry) {
            (_, None) => false,
            _ if !bytes => false,
            (_, Some(cfg)) if st.attempt >= cfg.retries => false,
            (Ok(r), Some(cfg)) => resilience::retryable_response(r, cfg),
            (Err(e), Some(_)) => e.retryable(),
        };
        if should_retry && self.budget.is_none_or(|b| b.try_retry()) {
            st.attempt += 1;
            self.ctx.shared.metrics.retry();
            let pause = self.retry.map_or(Duration::ZERO, |r| {
                resilience::backoff(r.backoff, st.attempt)
            });
            let until = Instant::now() + pause;
            st.previous = Some(endpoint.clone());
            return Some(Some(self.deadline.map_or(until, |d| d.min(until))));
        }
        if should_retry {
            self.ctx
                .shared
                .metrics
                .error(Direction::Outbound, Reason::RetryBudgetExhausted);
        }
        None
    }

    /// Another endpoint than `not`, when there is one.
    fn elsewhere(&self, not: &Arc<Endpoint>) -> Option<Arc<Endpoint>> {
        elsewhere(self.balancer, self.pinned.as_ref(), not)
    }

    /// One try's request, for any endpoint.
    #[inline]
    fn build(
        &self,
        endpoint: &Arc<Endpoint>,
        attempt: u32,
        body: ReqBody,
        mut p: Parts,
    ) -> Result<(Request<ReqBody>, UpVersion, Option<Duration>), ProxyError> {
        let upstream_h2 = mesh_marks(endpoint, self.app_h2, &mut p.headers);
        if attempt > 0 {
            p.headers.insert(RETRY_ATTEMPT, HeaderValue::from(attempt));
        }
        let mut per_try = self.rule.backend_timeout;
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProxyError::Timeout(d - self.now));
            }
            // The callee learns how long it has, and never works past it.
            p.headers.insert(
                resilience::TIMEOUT_HEADER,
                HeaderValue::from(left.as_millis() as u64),
            );
            if self.grpc
                && let Ok(v) = HeaderValue::from_str(&resilience::format_grpc_timeout(left))
            {
                p.headers.insert(resilience::GRPC_TIMEOUT, v);
            }
            per_try = Some(per_try.map_or(left, |t| t.min(left)));
        }
        let version = target(&mut p, self.authority, self.new_path.clone(), upstream_h2)?;
        Ok((Request::from_parts(p, body), version, per_try))
    }
}

/// Whether `endpoint` broke the connection before answering (a crash, a kill), or
/// its sidecar said its application did.
fn crashed(endpoint: &Endpoint, result: &Result<Response<Incoming>, ProxyError>) -> bool {
    match result {
        Err(ProxyError::Upstream { .. }) => true,
        Ok(r) => {
            endpoint.config.sidecar.is_some()
                && r.status() == StatusCode::BAD_GATEWAY
                && r.headers()
                    .get(crate::types::SINEW_ERROR)
                    .is_some_and(|v| v.as_bytes() == Reason::UpstreamFailed.as_str().as_bytes())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Mutex;

    use sinew_model::resource::LoadBalancer;

    use super::*;

    use crate::balance::tests::ep as endpoint;

    fn refused(port: u16) -> ProxyError {
        ProxyError::Connect {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        }
    }

    /// Runs `failover` over endpoints on ports 1 and 2, first to port 1, each try
    /// answered by `answer` (by port); the ports tried, in order, and the result.
    async fn run(
        policy: Failover,
        answer: impl Fn(u16) -> Result<u16, ProxyError>,
    ) -> (Vec<u16>, Result<u16, ProxyError>, Arc<Balancer>) {
        let (one, two) = (endpoint(1), endpoint(2));
        let balancer = Arc::new(Balancer::new(
            vec![one.clone(), two],
            LoadBalancer::RoundRobin,
        ));
        let tried = Mutex::new(Vec::new());
        let result = failover(&balancer, Some(one), policy, "svc", |e: Arc<Endpoint>| {
            let port = e.config.address.port();
            tried.lock().unwrap().push(port);
            let answer = answer(port);
            async move { answer }
        })
        .await;
        (tried.into_inner().unwrap(), result, balancer)
    }

    #[tokio::test]
    async fn a_refused_endpoint_is_reported_and_the_next_one_tried() {
        let (tried, result, balancer) = run(Failover::TCP, |port| match port {
            1 => Err(refused(1)),
            p => Ok(p),
        })
        .await;
        assert_eq!(tried, vec![1, 2]);
        assert_eq!(result.unwrap(), 2);
        // Reported as a refusal: the default outlier detection ejects it at once.
        let first = &balancer.endpoints()[0];
        assert!(first.is_ejected(std::time::Instant::now()));
        assert!(!balancer.endpoints()[1].is_ejected(std::time::Instant::now()));
    }

    #[tokio::test]
    async fn tries_stop_at_the_policys_count_with_the_last_error() {
        let (tried, result, _) = run(Failover::TCP, |port| Err(refused(port))).await;
        assert_eq!(tried, vec![1, 2]);
        assert!(matches!(result, Err(ProxyError::Connect { addr, .. }) if addr.port() == 2));
    }

    #[tokio::test]
    async fn an_error_no_other_endpoint_can_help_stops_the_loop() {
        let (tried, result, balancer) = run(Failover::TCP, |port| match port {
            1 => Err(ProxyError::Overflow("max-requests")),
            p => Ok(p),
        })
        .await;
        assert_eq!(tried, vec![1]);
        assert!(matches!(result, Err(ProxyError::Overflow(_))));
        // A failure, not a refusal: one is not enough to eject.
        assert!(!balancer.endpoints()[0].is_ejected(std::time::Instant::now()));
    }

    #[tokio::test]
    async fn a_mirror_is_never_retried_nor_reported() {
        let (tried, result, balancer) = run(Failover::MIRROR, |port| match port {
            1 => Err(refused(1)),
            p => Ok(p),
        })
        .await;
        assert_eq!(tried, vec![1]);
        assert!(result.unwrap_err().connection_refused());
        assert!(!balancer.endpoints()[0].is_ejected(std::time::Instant::now()));
    }

    #[tokio::test]
    async fn a_pinned_endpoint_is_the_only_one_tried() {
        let (tried, result, balancer) = run(Failover::PINNED, |port| match port {
            1 => Err(refused(1)),
            p => Ok(p),
        })
        .await;
        assert_eq!(tried, vec![1]);
        assert!(result.is_err());
        assert!(balancer.endpoints()[0].is_ejected(std::time::Instant::now()));
    }

    #[tokio::test]
    async fn with_no_endpoint_nothing_is_tried() {
        let balancer = Balancer::new(Vec::new(), LoadBalancer::RoundRobin);
        let result = failover(&balancer, None, Failover::TCP, "svc.ns", |_| async {
            Ok::<_, ProxyError>(())
        })
        .await;
        assert!(matches!(result, Err(ProxyError::NoEndpoints(s)) if s == "svc.ns"));
    }

    #[tokio::test]
    async fn without_a_first_endpoint_the_balancer_picks() {
        let balancer = Balancer::new(vec![endpoint(7)], LoadBalancer::RoundRobin);
        let result = failover(&balancer, None, Failover::TCP, "svc", |e: Arc<Endpoint>| {
            let port = e.config.address.port();
            async move { Ok::<_, ProxyError>(port) }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
    }
}
