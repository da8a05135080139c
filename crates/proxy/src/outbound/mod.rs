//! Outbound: the local application's requests into the mesh.
//!
//! A request is read once against one snapshot: find the service (by the listener's
//! binding, or by Host/`:authority` on the forward-proxy port), match a route, pick a
//! backend by weight, apply filters, pick an endpoint, and forward: HTTP/2 to the peer
//! sidecar when the endpoint has one, else the application's own protocol.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sinew_model::compile::{BackendConfig, PortConfig, RuleConfig, ServiceConfig};
use sinew_model::resource::Protocol;

use crate::balance::{Balancer, Endpoint, Outcome};
use crate::body::{ReqBody, RespBody};
use crate::error::{ProxyError, Reason};
use crate::http_util;
use crate::pool::{Reached, SendError, Version as UpVersion};

use crate::state::Snapshot;
use crate::stream::{UpstreamIo, spawn_splice};
use crate::types::{ConnCtx, Direction, RequestMeta, Role};

mod plan;
mod send;

use plan::Plan;

/// Handles one request from the local application.
pub fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> impl Future<Output = Response<RespBody>> + Send {
    crate::ending::handle::<Outbound>(ctx, req)
}

/// The outbound direction: requests forwarded by [`forward`].
struct Outbound;

impl crate::ending::Forward for Outbound {
    const DIRECTION: Direction = Direction::Outbound;

    fn forward(
        ctx: &Arc<ConnCtx>,
        req: Request<Incoming>,
        meta: &mut RequestMeta,
    ) -> impl Future<Output = Result<Response<RespBody>, ProxyError>> + Send {
        forward(ctx, req, meta)
    }
}

/// The `limits` of the listener a connection arrived at: its binding's, else the
/// proxy's.
fn listener_limits(ctx: &ConnCtx, snap: &Snapshot) -> sinew_model::resource::LimitsSpec {
    match ctx.role {
        Role::Upstream => snap
            .config
            .upstreams
            .iter()
            .find(|u| u.bind == ctx.bind)
            .map_or(snap.config.limits, |u| u.limits),
        _ => snap.config.limits,
    }
}

#[inline]
fn target<'s>(
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    authority: Option<&Authority>,
) -> Result<(&'s Arc<ServiceConfig>, &'s PortConfig), ProxyError> {
    match ctx.role {
        Role::Upstream => {
            let up = snap
                .config
                .upstreams
                .iter()
                .find(|u| u.bind == ctx.bind)
                .ok_or(ProxyError::NoRoute)?;
            let svc = snap
                .config
                .service(&up.service)
                .ok_or_else(|| ProxyError::UnknownService(up.service.clone()))?;
            let port = svc
                .port(up.port)
                .ok_or_else(|| ProxyError::UnknownService(up.service.clone()))?;
            Ok((svc, port))
        }
        Role::OutboundCapture => {
            let (key, number) = ctx
                .orig_dst
                .and_then(|dst| snap.captured(dst))
                .ok_or(ProxyError::NoRoute)?;
            let svc = snap
                .config
                .service(key)
                .ok_or_else(|| ProxyError::UnknownService(key.to_owned()))?;
            let port = svc
                .port(number)
                .ok_or_else(|| ProxyError::UnknownService(key.to_owned()))?;
            Ok((svc, port))
        }
        Role::HttpProxy | Role::Inbound | Role::InboundCapture => {
            let auth = authority.ok_or(ProxyError::Malformed(
                "no Host header or absolute URI to route by",
            ))?;
            let host = auth.host();
            let svc = snap
                .config
                .resolve_service(host)
                .ok_or_else(|| ProxyError::UnknownService(host.to_owned()))?;
            let port = match auth.port_u16() {
                Some(p) => svc.port(p),
                None => svc.default_http_port(),
            }
            .ok_or_else(|| ProxyError::UnknownService(auth.to_string()))?;
            Ok((svc, port))
        }
    }
}

/// The endpoint a captured connection was addressed to, when its original
/// destination is one of `balancer`'s endpoints (not a service's virtual IP).
pub(crate) fn pinned_endpoint(
    ctx: &ConnCtx,
    snap: &Snapshot,
    balancer: &Balancer,
) -> Option<Arc<Endpoint>> {
    if ctx.role != Role::OutboundCapture {
        return None;
    }
    let dst = ctx.orig_dst?;
    // A hash lookup first: calls to virtual IPs (the common case) never scan.
    if !snap.addresses_workload(dst) {
        return None;
    }
    balancer
        .endpoints()
        .iter()
        .find(|e| e.config.address == dst)
        .cloned()
}

async fn forward(
    ctx: &Arc<ConnCtx>,
    mut req: Request<Incoming>,
    meta: &mut RequestMeta,
) -> Result<Response<RespBody>, ProxyError> {
    let snap = ctx
        .shared
        .snapshot
        .load_full()
        .ok_or(ProxyError::ShuttingDown)?;
    // A bad head is answered here, before it can reach a shared connection.
    let body_limit = check_head(ctx, &snap, &mut req)?;
    // Parsed once: routing by host and the filters below both need it.
    let parsed = ctx.last_host.authority(&req);
    let (svc, port) = target(ctx, &snap, parsed.as_ref())?;
    crate::trace::note_service(req.extensions(), svc);
    meta.service = Some(svc.key.clone());

    if req.method() == Method::CONNECT && !http_util::is_extended_connect(&req) {
        // Rare branches are boxed so the common request future stays small.
        return Box::pin(connect_tunnel(ctx, &snap, svc, port, req)).await;
    }

    let route = plan::route(port, &req, |total| fastrand::u64(..total))?;
    let (rule, backend) = (route.rule, route.backend);
    meta.route = Some(rule.route.clone());
    let balancer = snap
        .balancer(&backend.service, backend.port)
        .ok_or_else(|| ProxyError::NoEndpoints(backend.service.clone()))?;
    let (pinned, endpoint) = first_endpoint(ctx, &snap, balancer, backend, &req)?;
    meta.upstream = Some(endpoint.config.address);
    meta.endpoint = Some(endpoint.clone());
    crate::trace::note_outbound(req.extensions(), rule, &backend.service, &endpoint.config);
    let plan = plan::plan(&snap.config, port, &route, &mut req, parsed)?;
    if plan.upgrade {
        let Plan {
            authority,
            new_path,
            ..
        } = plan;
        return Box::pin(forward_upgrade(ctx, req, &endpoint, &authority, new_path)).await;
    }
    let grpc = plan.grpc;
    // The deadline: the route's timeout, or less if the caller arrived with one.
    let now = tokio::time::Instant::now();
    let deadline = plan.timeout.map(|d| now + d);

    // Fault injection (chaos testing): delays, then aborts. Most requests have no
    // fault: they build no fault future (callgrind: ~25 instructions a request).
    if plan.faults.iter().any(Option::is_some)
        && let Some(aborted) = inject_faults(ctx, &plan, now, deadline).await?
    {
        return Ok(aborted);
    }

    let Plan {
        app_h2,
        authority,
        new_path,
        safe,
        retry,
        mirror,
        ..
    } = plan;
    let mirror = mirror.filter(|m| fastrand::u32(0..100) < m.percent);
    let (mut parts, body) = req.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, false);
    // The upstream request starts with no extensions; these (the trace note among
    // them) live until the answer is built, as the request itself did.
    let _extensions = std::mem::take(&mut parts.extensions);
    let replayable = retry.is_some() || mirror.is_some();
    let mut payload = match hold(body, replayable, body_limit) {
        Ok(held) => held,
        Err(body) => buffer(body).await?,
    };
    if let (Some(m), Payload::Bytes(bytes)) = (mirror, &payload) {
        let copy = (&parts, &authority, &new_path, bytes.clone());
        send_mirror(&snap, m, backend.port, copy);
    }
    let budget = retry.and_then(|_| snap.budget(rule));
    if let Some(b) = budget {
        b.request();
    }

    // A request with a streamed body and no retries has exactly one try (a hedge
    // needs retries too): it takes the head itself. Otherwise every try gets a copy:
    // a retry, or a resend after an endpoint that never saw the request, needs it.
    // (With one endpoint without a sidecar there is nowhere to resend to: no copy.
    // A sidecar's HTTP/2 connection may announce GOAWAY: then a new connection to
    // the same one takes the request.)
    let keep_head = retry.is_some()
        || (matches!(payload, Payload::Bytes(_))
            && (balancer.endpoints().len() > 1 || endpoint.config.sidecar.is_some()));
    let tries = send::Tries {
        ctx,
        rule,
        service: &backend.service,
        balancer,
        pinned,
        retry,
        budget: budget.map(|b| &**b),
        authority: &authority,
        new_path: &new_path,
        app_h2,
        grpc,
        safe,
        now,
        deadline,
        keep_head,
        body_limit,
    };
    let send::Sent {
        result: resp,
        attempt,
        hedged,
    } = tries.run(endpoint, &mut payload, parts).await;
    let resp = whole_request_time(resp, now, deadline)?;
    Ok(response(resp, rule, backend, attempt, hedged))
}

/// Checks the request head against the listener's limits; the body limit, if any.
#[inline]
fn check_head(
    ctx: &ConnCtx,
    snap: &Snapshot,
    req: &mut Request<Incoming>,
) -> Result<Option<u64>, ProxyError> {
    let (limits, body_limit) =
        http_util::listener_limits(&ctx.shared.settings.limits, &listener_limits(ctx, snap));
    http_util::check_request_head(req.headers_mut(), &limits)?;
    http_util::check_declared_length(req.headers(), body_limit)?;
    Ok(body_limit)
}

/// A timeout past the deadline is the whole request's, whichever try ran out.
#[inline]
fn whole_request_time(
    result: Result<Response<Incoming>, ProxyError>,
    now: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response<Incoming>, ProxyError> {
    match result {
        Err(ProxyError::Timeout(_))
            if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) =>
        {
            Err(ProxyError::Timeout(
                deadline.map_or(Duration::ZERO, |d| d - now),
            ))
        }
        other => other,
    }
}

/// The endpoint of the first try, and the one every try goes to when the request
/// is pinned: a captured connection to a workload's own address (a headless
/// Service's endpoint, a StatefulSet pod's DNS name) is for that workload, over
/// mTLS to its sidecar as to any endpoint. Otherwise the balancer picks, by the
/// head as it arrived when it hashes.
#[inline]
fn first_endpoint(
    ctx: &ConnCtx,
    snap: &Snapshot,
    balancer: &Balancer,
    backend: &BackendConfig,
    req: &Request<Incoming>,
) -> Result<(Option<Arc<Endpoint>>, Arc<Endpoint>), ProxyError> {
    let pinned = pinned_endpoint(ctx, snap, balancer);
    let endpoint = match &pinned {
        Some(e) => e.clone(),
        None => balancer
            .pick_for(ring_key(balancer, req, ctx.peer))
            .ok_or_else(|| {
                ProxyError::NoEndpoints(format!("{}:{}", backend.service, backend.port))
            })?
            .clone(),
    };
    Ok((pinned, endpoint))
}

/// Injects the plan's faults (chaos testing), each drawn for on its own: a delay
/// (cut short by the deadline, which then answers), then an abort, which is the
/// answer.
async fn inject_faults(
    ctx: &ConnCtx,
    plan: &Plan<'_>,
    now: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<Response<RespBody>>, ProxyError> {
    for fault in plan.faults.into_iter().flatten() {
        if let Some((ms, pct)) = fault.delay
            && fastrand::f64() * 100.0 < pct
        {
            let until = now + Duration::from_millis(ms);
            match deadline {
                Some(d) if d < until => {
                    tokio::time::sleep_until(d).await;
                    return Err(ProxyError::Timeout(d - now));
                }
                _ => tokio::time::sleep_until(until).await,
            }
        }
        if let Some((status, grpc_code, pct)) = fault.abort
            && fastrand::f64() * 100.0 < pct
        {
            ctx.shared
                .metrics
                .error(Direction::Outbound, Reason::FaultInjected);
            return Ok(Some(fault_response(status, grpc_code, plan.grpc)));
        }
    }
    Ok(None)
}

/// The request body as the tries will send it.
///
/// `Err(body)`: the body is to be buffered first ([`buffer`]). Decided here without
/// a future, so a request that needs no buffering (most) pays for none.
fn hold(body: Incoming, replayable: bool, body_limit: Option<u64>) -> Result<Payload, Incoming> {
    // Retries and mirrors need the body again: hold it when it is small and of known
    // length; anything else streams once (and is neither retried nor mirrored).
    if replayable && (body_limit.is_none() || http_body::Body::size_hint(&body).exact().is_some()) {
        // (A body of unknown length on a listener with a body limit streams once,
        // watched for the limit, rather than being copied for a replay.)
        Err(body)
    } else if http_body::Body::is_end_stream(&body) {
        // No body (most GETs): sendable again at no cost, should the chosen
        // endpoint turn out never to have seen it.
        Ok(Payload::Bytes(None))
    } else {
        Ok(Payload::Stream(Some(body)))
    }
}

/// The upstream's response as the client gets it: hop-by-hop and mesh headers
/// dropped, the rule's then the backend's response edits applied, and the retries
/// and the hedge noted.
#[inline]
fn response(
    resp: Response<Incoming>,
    rule: &RuleConfig,
    backend: &BackendConfig,
    attempt: u32,
    hedged: bool,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, false);
    static MESH_RESPONSE_HEADERS: [HeaderName; 1] = [http_util::UNSENT];
    http_util::remove_headers(&mut parts.headers, &MESH_RESPONSE_HEADERS);
    for filters in [&rule.filters, &backend.filters] {
        if let Some(edits) = &filters.response_headers {
            edits.apply(&mut parts.headers);
        }
    }
    if attempt > 0 {
        parts
            .headers
            .insert(RETRY_ATTEMPT, HeaderValue::from(attempt));
    }
    if hedged {
        parts.headers.insert(HEDGED, HeaderValue::from_static("1"));
    }
    Response::from_parts(parts, RespBody::Upstream(body))
}

/// A request to send again elsewhere: the endpoint, and the request itself when it
/// came back whole.
type Resend = (Arc<Endpoint>, Option<Box<Request<ReqBody>>>);

/// On a response answered by the hedge (the second try).
const HEDGED: HeaderName = HeaderName::from_static("sinew-hedged");

/// One try: admitted by the circuit breaker (overflow is answered at once; the slot
/// is held until the response head), sent, and reported to outlier detection.
async fn send_attempt(
    balancer: &Arc<Balancer>,
    endpoint: &Arc<Endpoint>,
    req: Request<ReqBody>,
    version: UpVersion,
    per_try: Option<Duration>,
    body_failed: Option<&crate::body::Watch>,
) -> Result<Response<Incoming>, SendError> {
    let admitted = match balancer.admit(endpoint) {
        Ok(a) => a,
        Err(o) => {
            return Err(SendError {
                error: ProxyError::Overflow(o.as_str()),
                reached: Reached::Maybe,
            });
        }
    };
    let mut result = send_timed(endpoint, req, version, per_try, body_failed).await;
    drop(admitted);
    // The peer sidecar could not reach its application (killed, restarting): for
    // this proxy that endpoint refused, and the request was never seen.
    if let Ok(r) = &result
        && endpoint.config.sidecar.is_some()
        && r.headers().contains_key(http_util::UNSENT)
    {
        result = Err(SendError {
            error: ProxyError::Connect {
                addr: endpoint.config.address,
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "the peer sidecar could not reach its application",
                ),
            },
            reached: Reached::No(None),
        });
    }
    let outcome = match &result {
        Ok(r) if !r.status().is_server_error() => Outcome::Ok,
        Ok(_) => Outcome::Failed,
        Err(SendError {
            error: ProxyError::RequestBody { .. } | ProxyError::BodyTooLarge(_),
            ..
        }) => return result,
        Err(e) => send::outcome(Some(&e.error)),
    };
    balancer.report(endpoint, outcome);
    if matches!(
        result,
        Err(SendError {
            error: ProxyError::Upstream { .. },
            ..
        })
    ) {
        balancer.probe(endpoint);
    }
    result
}

/// Resends of a request no endpoint saw, before its failure is the answer.
const MAX_RESENDS: u32 = 3;

/// Retries so far: on the upstream request (which try this is) and on the response
/// (how many retries it took).
const RETRY_ATTEMPT: HeaderName = HeaderName::from_static("sinew-retry-attempt");

/// How long a body held for retries and mirrors may take to arrive.
const BUFFER_DEADLINE: Duration = Duration::from_secs(30);
/// Mirror requests in flight at once, for the whole proxy; more are not sent (a
/// mirror is best effort and must never cost the primary traffic memory).
const MAX_MIRRORS: usize = 256;
/// Most bytes of a mirror's response read (and dropped); past it the response is
/// abandoned.
const MAX_MIRROR_RESPONSE: usize = 1 << 20;
/// How long a mirror request may take, answer included.
const MIRROR_DEADLINE: Duration = Duration::from_secs(10);

/// Bodies up to this size are held for retries and mirrors.
const MAX_REPLAY: u64 = 64 * 1024;

/// A request body: streamed once, or held for replay.
enum Payload {
    Stream(Option<Incoming>),
    Bytes(Option<bytes::Bytes>),
    /// Streamed once, with a copy kept: replayable once it has ended.
    Captured(Option<Incoming>, Arc<crate::body::Capture>),
}

/// Holds a body of known length up to [`MAX_REPLAY`]; one of unknown length (a gRPC
/// call, a chunked upload) streams with a copy kept up to the same limit, so it is
/// never held back waiting for its end (a streaming call would stall) yet can be
/// replayed when it ended in time; anything longer streams once.
async fn buffer(body: Incoming) -> Result<Payload, ProxyError> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return Ok(Payload::Bytes(None));
    }
    match body.size_hint().exact() {
        Some(n) if n <= MAX_REPLAY => {
            // Held whole before the first try: a client sending it slowly gets a
            // deadline, not a task held open for as long as it likes.
            let bytes = tokio::time::timeout(BUFFER_DEADLINE, body.collect())
                .await
                .map_err(|_| ProxyError::RequestBody {
                    detail: format!("the {n}-byte body did not arrive within {BUFFER_DEADLINE:?}"),
                    source: None,
                })?
                .map_err(|_| ProxyError::Malformed("the request body ended early"))?
                .to_bytes();
            Ok(Payload::Bytes((!bytes.is_empty()).then_some(bytes)))
        }
        None if body.size_hint().upper().is_none_or(|u| u > 0) => Ok(Payload::Captured(
            Some(body),
            crate::body::Capture::new(MAX_REPLAY as usize),
        )),
        _ => Ok(Payload::Stream(Some(body))),
    }
}

/// A copy of a request head (method, target, version, headers), without its
/// extensions.
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r.into_parts().0
}

/// Fire and forget: a copy of the request to the mirror backend, its answer ignored.
/// The authority gets `-shadow` appended, so the mirror can tell copies apart. One
/// try through the shared send loop ([`send::Failover::MIRROR`]), its head built as
/// the primary's tries build theirs.
fn send_mirror(
    snap: &Snapshot,
    m: &sinew_model::compile::MirrorConfig,
    default_port: u16,
    (parts, authority, new_path, body): MirrorCopy<'_>,
) {
    let port = m.port.unwrap_or(default_port);
    let Some(balancer) = snap.balancer(&m.service, port) else {
        return;
    };
    let Some(endpoint) = balancer.pick().cloned() else {
        return;
    };
    let Ok(shadow) = Authority::try_from(format!("{}-shadow", authority.host())) else {
        return;
    };
    let protocol = snap
        .config
        .service(&m.service)
        .and_then(|s| s.port(port))
        .map_or(Protocol::Http, |p| p.protocol);
    let app_h2 = plan::app_speaks_h2(protocol, http_util::is_grpc(&parts.headers));
    static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= MAX_MIRRORS {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!("mirror skipped: {MAX_MIRRORS} already in flight");
        return;
    }
    let (balancer, service) = (balancer.clone(), m.service.clone());
    let mut head = Some(copy_head(parts));
    let new_path = new_path.clone();
    tokio::spawn(async move {
        let try_once = |endpoint: Arc<Endpoint>| {
            let (head, shadow, new_path) = (head.take(), shadow.clone(), new_path.clone());
            let body = body.clone();
            async move {
                let mut p = head.ok_or(ProxyError::Malformed("mirror head already sent"))?;
                let upstream_h2 = send::mesh_marks(&endpoint, app_h2, &mut p.headers);
                let version = send::target(&mut p, &shadow, new_path, upstream_h2)?;
                let req = Request::from_parts(p, ReqBody::Buffered(body));
                let resp = endpoint.pool.send(req, version).await?;
                drain_mirror_answer(resp).await;
                Ok(())
            }
        };
        let mirrored = send::failover(
            &balancer,
            Some(endpoint),
            send::Failover::MIRROR,
            &service,
            try_once,
        );
        if let Ok(Err(e)) = tokio::time::timeout(MIRROR_DEADLINE, mirrored).await {
            tracing::debug!(error = %e, "mirror request failed");
        }
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    });
}

/// What a mirror's copy is made of: the primary's head, authority, path and body.
type MirrorCopy<'a> = (
    &'a http::request::Parts,
    &'a Authority,
    &'a Option<PathAndQuery>,
    Option<bytes::Bytes>,
);

/// Reads (and drops) a mirror's answer so the connection can be reused; never holds
/// it, and gives up on one that is too long.
async fn drain_mirror_answer(resp: Response<Incoming>) {
    let mut body = resp.into_body();
    let mut read = 0usize;
    while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
        read += frame.data_ref().map_or(0, |d| d.len());
        if read > MAX_MIRROR_RESPONSE {
            break;
        }
    }
}

/// An injected abort: the HTTP status, or a trailers-only gRPC status.
fn fault_response(status: Option<u16>, grpc_code: Option<u8>, grpc: bool) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(
        "fault-injected: aborted by a Fault filter\n",
    ));
    match (grpc, grpc_code) {
        (true, Some(code)) => {
            *r.status_mut() = StatusCode::OK;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from(u16::from(code)));
            r.headers_mut()
                .insert("grpc-message", HeaderValue::from_static("fault injected"));
            *r.body_mut() = RespBody::empty();
        }
        _ => {
            *r.status_mut() = status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    r.headers_mut().insert(
        crate::error::SINEW_ERROR,
        HeaderValue::from_static("fault-injected"),
    );
    r
}

/// The request's ring key (sticky sessions), when the service hashes and the request
/// has the key.
fn ring_key(
    balancer: &Balancer,
    req: &Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Option<u64> {
    use sinew_model::compile::HashKey;
    match balancer.hash_key()? {
        HashKey::Header(h) => req
            .headers()
            .get(h.as_str())
            .map(|v| crate::balance::hash64(v.as_bytes())),
        HashKey::SourceIp => Some(crate::balance::hash64(peer.ip().to_string().as_bytes())),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name.as_str())
            .map(|(_, v)| crate::balance::hash64(v.as_bytes())),
    }
}

/// Sends with the route's timeout (until response headers) and feeds the balancer.
async fn send_timed(
    endpoint: &Arc<Endpoint>,
    req: Request<ReqBody>,
    version: UpVersion,
    timeout: Option<Duration>,
    body_failed: Option<&crate::body::Watch>,
) -> Result<Response<Incoming>, SendError> {
    let inflight = endpoint.start();
    let fut = endpoint.pool.send(req, version);
    let mut res = match timeout {
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or(Err(SendError {
            error: ProxyError::Timeout(t),
            reached: Reached::Maybe,
        })),
        None => fut.await,
    };
    if let (Err(e), Some(watch)) = (&mut res, body_failed) {
        // The client's body broke (malformed chunking, a client gone) or went past
        // the listener's limit: whatever the upstream then said, that is the client's.
        if watch.too_large() {
            e.error = ProxyError::BodyTooLarge(watch.limit().unwrap_or(0));
            e.reached = Reached::Maybe;
        } else if watch.failed() {
            // Taken out to become the source (the placeholder is overwritten at once).
            let upstream = std::mem::replace(&mut e.error, ProxyError::ShuttingDown);
            e.error = ProxyError::RequestBody {
                detail: upstream.to_string(),
                source: Some(Box::new(upstream)),
            };
            e.reached = Reached::Maybe;
        }
    }
    match &res {
        Ok(r) if !r.status().is_server_error() => inflight.success(),
        // The client's fault: says nothing about the endpoint.
        Err(SendError {
            error: ProxyError::RequestBody { .. } | ProxyError::BodyTooLarge(_),
            ..
        }) => drop(inflight),
        _ => inflight.failure(),
    }
    res
}

/// Forwards an HTTP/1.1 upgrade (e.g. WebSocket) on a dedicated connection: the
/// handshake goes to the application (through a tunnel when it has a sidecar), and
/// after `101 Switching Protocols` both sides are joined byte for byte.
async fn forward_upgrade(
    ctx: &Arc<ConnCtx>,
    mut req: Request<Incoming>,
    endpoint: &Arc<Endpoint>,
    authority: &Authority,
    new_path: Option<PathAndQuery>,
) -> Result<Response<RespBody>, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    // An HTTP/2 client's extended CONNECT (RFC 8441) becomes the HTTP/1.1 upgrade
    // the app expects (RFC 6455 §4.1); its answer, a 101, goes back as a 200.
    let h2_connect = http_util::is_extended_connect(&req);
    let (mut parts, body) = req.into_parts();
    let body = if h2_connect {
        let protocol = parts
            .extensions
            .remove::<hyper::ext::Protocol>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let upgrade = HeaderValue::from_str(&protocol)
            .map_err(|_| ProxyError::Malformed("invalid :protocol"))?;
        parts.method = Method::GET;
        parts.headers.insert(header::UPGRADE, upgrade);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if protocol.eq_ignore_ascii_case("websocket") {
            use base64::Engine as _;
            let key: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            if let Ok(v) = HeaderValue::from_str(&key) {
                parts.headers.insert(header::SEC_WEBSOCKET_KEY, v);
            }
        }
        // The stream's bytes are the tunnel's, after the answer: no request body.
        drop(body);
        ReqBody::Empty
    } else {
        ReqBody::Incoming(body)
    };
    http_util::strip_hop_by_hop(&mut parts.headers, true);
    http_util::set_target(&mut parts, authority, new_path, false)?;
    let up_req = Request::from_parts(parts, body);
    let addr = endpoint.config.address;
    let io = UpstreamIo::open(endpoint).await?;
    let mut resp = crate::stream::http1_upgrade(io, addr, up_req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        http_util::strip_hop_by_hop(&mut parts.headers, false);
        return Ok(Response::from_parts(parts, RespBody::Upstream(body)));
    }
    crate::stream::splice_upgrades(&ctx.shared, downstream, &mut resp, "upgrade");
    let (mut parts, _) = resp.into_parts();
    if h2_connect {
        http_util::strip_hop_by_hop(&mut parts.headers, false);
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        parts.status = StatusCode::OK;
        parts.version = http::Version::HTTP_2;
    } else {
        http_util::strip_hop_by_hop(&mut parts.headers, true);
    }
    Ok(Response::from_parts(parts, RespBody::empty()))
}

/// `CONNECT catalog:5432` on the forward-proxy port: a TCP tunnel to the service.
async fn connect_tunnel(
    ctx: &Arc<ConnCtx>,
    snap: &Snapshot,
    svc: &ServiceConfig,
    port: &PortConfig,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, ProxyError> {
    let key = &svc.key;
    let endpoint = snap
        .balancer(key, port.port)
        .and_then(|b| b.pick())
        .ok_or_else(|| ProxyError::NoEndpoints(format!("{key}:{}", port.port)))?
        .clone();
    let io = UpstreamIo::open(&endpoint).await?;
    let downstream = hyper::upgrade::on(&mut req);
    let shared = ctx.shared.clone();
    tokio::spawn(async move {
        match downstream.await {
            Ok(d) => spawn_splice(&shared, TokioIo::new(d), io),
            Err(e) => tracing::debug!(error = %e, "CONNECT did not complete"),
        }
    });
    let mut resp = Response::new(RespBody::empty());
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(resp)
}

/// Handles one opaque TCP connection on a TCP upstream binding.
pub async fn tcp(ctx: Arc<ConnCtx>, downstream: tokio::net::TcpStream) {
    let Some(snap) = ctx.shared.snapshot.load_full() else {
        return;
    };
    let Some(up) = snap.config.upstreams.iter().find(|u| u.bind == ctx.bind) else {
        return;
    };
    let service = up.service.clone();
    let balancer = snap.balancer(&up.service, up.port).cloned();
    drop(snap);
    let result = match balancer {
        Some(b) => tcp_to(&ctx, downstream, &b, &service, None).await,
        None => {
            let e = ProxyError::NoEndpoints(service);
            ctx.shared.metrics.error(Direction::Outbound, e.reason());
            Err(e)
        }
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "TCP connection closed");
    }
}

/// Joins `downstream` to an endpoint of `balancer` (through its sidecar's tunnel
/// when it has one): `pinned` when given, and only that one, else the balancer's
/// pick and, when it cannot be reached, another ([`send::Failover::TCP`]). Each
/// failure is counted; the error is the last one.
pub(crate) async fn tcp_to<D>(
    ctx: &ConnCtx,
    downstream: D,
    balancer: &Balancer,
    service: &str,
    pinned: Option<Arc<Endpoint>>,
) -> Result<(), ProxyError>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let metrics = &ctx.shared.metrics;
    let policy = match pinned {
        Some(_) => send::Failover::PINNED,
        None => send::Failover::TCP,
    };
    let open = |endpoint: Arc<Endpoint>| async move {
        UpstreamIo::open(&endpoint).await.inspect_err(|e| {
            metrics.error(Direction::Outbound, e.reason());
            tracing::debug!(endpoint = %endpoint.config.address, error = %e, "TCP: endpoint unreachable");
        })
    };
    let io = send::failover(balancer, pinned, policy, service, open)
        .await
        .inspect_err(|e| {
            // Every try's failure is counted as it happened; none is not a try.
            if matches!(e, ProxyError::NoEndpoints(_)) {
                metrics.error(Direction::Outbound, e.reason());
            }
        })?;
    spawn_splice(&ctx.shared, downstream, io);
    Ok(())
}
