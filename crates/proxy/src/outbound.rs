//! Outbound: the local application's requests into the mesh.
//!
//! A request is read once against one snapshot: find the service (by the listener's
//! binding, or by Host/`:authority` on the forward-proxy port), match a route, pick a
//! backend by weight, apply filters, pick an endpoint, and forward: HTTP/2 to the peer
//! sidecar when the endpoint has one, else the application's own protocol.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use sinew_model::compile::{Filters, PortConfig, ServiceConfig};
use sinew_model::resource::Protocol;
use sinew_model::route::RequestView;

use crate::balance::Endpoint;
use crate::body::{ReqBody, RespBody};
use crate::error::ProxyError;
use crate::http_util::{self, DST_PORT, ORIG_PROTO};
use crate::listeners::{ConnCtx, Role};
use crate::metrics::Direction;
use crate::pool::Version as UpVersion;
use crate::state::Snapshot;
use crate::stream::{UpstreamIo, spawn_splice};

/// Handles one request from the local application.
pub async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<RespBody> {
    let grpc = http_util::is_grpc(req.headers());
    let resp = match forward(&ctx, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, peer = %ctx.peer, "outbound request failed");
            ctx.shared.metrics.error(Direction::Outbound, e.reason());
            e.to_response(grpc)
        }
    };
    ctx.shared
        .metrics
        .request(Direction::Outbound, resp.status());
    resp
}

fn target<'s>(
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    req: &Request<Incoming>,
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
        Role::HttpProxy | Role::Inbound => {
            let auth = http_util::authority(req).ok_or(ProxyError::Malformed(
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

async fn forward(
    ctx: &Arc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, ProxyError> {
    let snap = ctx
        .shared
        .snapshot
        .load_full()
        .ok_or(ProxyError::ShuttingDown)?;
    let (svc, port) = target(ctx, &snap, &req)?;

    if req.method() == Method::CONNECT {
        // Rare branches are boxed so the common request future stays small.
        return Box::pin(connect_tunnel(ctx, &snap, svc, port, req)).await;
    }

    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let entry = port.routes.select(&view).ok_or(ProxyError::NoRoute)?;
    let rule = entry.rule.clone();
    let prefix_len = entry.matcher.path.prefix_len();
    let backend = rule.pick_backend(fastrand::u64(..rule.total_weight.max(1)));
    let balancer = snap
        .balancer(&backend.service, backend.port)
        .ok_or_else(|| ProxyError::NoEndpoints(backend.service.clone()))?;
    let endpoint = balancer
        .pick()
        .ok_or_else(|| ProxyError::NoEndpoints(format!("{}:{}", backend.service, backend.port)))?
        .clone();
    let protocol = snap
        .config
        .service(&backend.service)
        .and_then(|s| s.port(backend.port))
        .map_or(port.protocol, |p| p.protocol);

    // A client must not be able to steer the peer sidecar.
    req.headers_mut().remove(DST_PORT);
    req.headers_mut().remove(ORIG_PROTO);

    // Filters: the rule's, then the backend's.
    let mut authority = http_util::authority(&req)
        .ok_or(ProxyError::Malformed("no Host header or absolute URI"))?;
    let mut new_path: Option<PathAndQuery> = None;
    for filters in [&rule.filters, &backend.filters] {
        apply_request_filters(filters, &mut req, &mut authority, &mut new_path, prefix_len)?;
    }

    if http_util::is_upgrade(&req) {
        return Box::pin(forward_upgrade(ctx, req, &endpoint, &authority, new_path)).await;
    }

    let downstream_h2 = req.version() == Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, false);
    let upstream_h2 = endpoint.config.sidecar.is_some()
        || downstream_h2
        || matches!(protocol, Protocol::Http2 | Protocol::Grpc);
    if endpoint.config.sidecar.is_some() {
        parts
            .headers
            .insert(DST_PORT, HeaderValue::from(endpoint.config.address.port()));
        if !downstream_h2 && protocol == Protocol::Http {
            parts
                .headers
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
    }
    http_util::set_target(&mut parts, &authority, new_path, upstream_h2)?;
    let upstream_req = Request::from_parts(parts, ReqBody::Incoming(body));

    let timeout = match (rule.request_timeout, rule.backend_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let version = if upstream_h2 {
        UpVersion::Http2
    } else {
        UpVersion::Http1
    };
    let resp = send_timed(&endpoint, upstream_req, version, timeout).await?;

    let (mut parts, body) = resp.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, false);
    for filters in [&rule.filters, &backend.filters] {
        if let Some(edits) = &filters.response_headers {
            edits.apply(&mut parts.headers);
        }
    }
    Ok(Response::from_parts(parts, RespBody::Upstream(body)))
}

/// Sends with the route's timeout (until response headers) and feeds the balancer.
async fn send_timed(
    endpoint: &Arc<Endpoint>,
    req: Request<ReqBody>,
    version: UpVersion,
    timeout: Option<Duration>,
) -> Result<Response<Incoming>, ProxyError> {
    let inflight = endpoint.start();
    let fut = endpoint.pool.send(req, version);
    let res = match timeout {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or(Err(ProxyError::Timeout(t))),
        None => fut.await,
    };
    match &res {
        Ok(r) if !r.status().is_server_error() => inflight.success(),
        _ => inflight.failure(),
    }
    res
}

fn apply_request_filters(
    filters: &Filters,
    req: &mut Request<Incoming>,
    authority: &mut Authority,
    new_path: &mut Option<PathAndQuery>,
    prefix_len: Option<usize>,
) -> Result<(), ProxyError> {
    if filters.is_empty() {
        return Ok(());
    }
    if let Some(edits) = &filters.request_headers {
        edits.apply(req.headers_mut());
    }
    if let Some(rw) = &filters.rewrite {
        if let Some(h) = &rw.hostname {
            *authority = Authority::try_from(h.as_str())
                .map_err(|_| ProxyError::Malformed("invalid rewrite hostname"))?;
        }
        if let Some(p) = &rw.path {
            let current = new_path
                .as_ref()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.path().to_owned());
            let mut rewritten = p.apply(&current, prefix_len);
            if let Some(q) = req.uri().query() {
                rewritten.push('?');
                rewritten.push_str(q);
            }
            *new_path = Some(
                PathAndQuery::try_from(rewritten)
                    .map_err(|_| ProxyError::Malformed("rewritten path is invalid"))?,
            );
        }
    }
    Ok(())
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
    let (mut parts, body) = req.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, true);
    http_util::set_target(&mut parts, authority, new_path, false)?;
    let up_req = Request::from_parts(parts, ReqBody::Incoming(body));
    let addr = endpoint.config.address;
    let io = UpstreamIo::open(endpoint).await?;
    let (mut tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| ProxyError::Upstream { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended");
        }
    });
    let mut resp = tx
        .send_request(up_req)
        .await
        .map_err(|source| ProxyError::Upstream { addr, source })?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        http_util::strip_hop_by_hop(&mut parts.headers, false);
        return Ok(Response::from_parts(parts, RespBody::Upstream(body)));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let shared = ctx.shared.clone();
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((d, u)) => spawn_splice(&shared, TokioIo::new(d), TokioIo::new(u)),
            Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
        }
    });
    let (mut parts, _) = resp.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, true);
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
    let key = svc.key();
    let endpoint = snap
        .balancer(&key, port.port)
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
    let endpoint = match snap.balancer(&up.service, up.port).and_then(|b| b.pick()) {
        Some(e) => e.clone(),
        None => {
            ctx.shared
                .metrics
                .error(Direction::Outbound, "no-endpoints");
            tracing::warn!(service = %up.service, "TCP connection closed: no endpoints");
            return;
        }
    };
    drop(snap);
    match UpstreamIo::open(&endpoint).await {
        Ok(io) => spawn_splice(&ctx.shared, downstream, io),
        Err(e) => {
            ctx.shared.metrics.error(Direction::Outbound, e.reason());
            tracing::warn!(error = %e, "TCP connection closed");
        }
    }
}
