//! Inbound: mesh traffic to the local application.
//!
//! Peer sidecars send HTTP/2: ordinary requests carry `sinew-dst-port` (which
//! application port) and, when the client spoke HTTP/1.1, `sinew-orig-proto`, so the
//! application gets the protocol its client used. `CONNECT <addr>:<port>` opens a byte
//! tunnel (opaque TCP, WebSocket). Only the configured application ports are reachable.
//!
//! Plaintext redirected by capture rules (`PERMISSIVE` only) comes here too, as an
//! unauthenticated caller: HTTP through [`handle`] (pinned to the port it was sent
//! to), anything else through [`plaintext_tcp`].

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sinew_model::compile::InboundConfig;

use crate::body::{ReqBody, RespBody};
use crate::error::ProxyError;
use crate::http_util::{self, DST_PORT, ORIG_PROTO, PEER_IDENTITY, UNSENT};
use crate::pool::Version as UpVersion;
use crate::stream::spawn_splice;
use crate::types::ConnCtx;
use crate::types::{Direction, RequestMeta};

/// Handles one request arriving from the mesh.
pub fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> impl Future<Output = Response<RespBody>> + Send {
    crate::ending::handle::<Inbound>(ctx, req)
}

/// The inbound direction: requests forwarded by [`forward`].
struct Inbound;

impl crate::ending::Forward for Inbound {
    const DIRECTION: Direction = Direction::Inbound;

    fn forward(
        ctx: &Arc<ConnCtx>,
        req: Request<Incoming>,
        meta: &mut RequestMeta,
    ) -> impl Future<Output = Result<Response<RespBody>, ProxyError>> + Send {
        forward(ctx, req, meta)
    }

    fn failed(error: &ProxyError, resp: &mut Response<RespBody>) {
        if matches!(
            error,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout(_) | ProxyError::ShuttingDown
        ) {
            // The app never saw it: the caller's sidecar may send it elsewhere.
            resp.headers_mut()
                .insert(UNSENT, HeaderValue::from_static("1"));
        }
    }
}

/// Captured plaintext that is not HTTP (or whose client said nothing): judged as a
/// mesh tunnel is, on L4 fields (its port, no identity), then joined to the
/// application's port. A port not declared, or a connection policy refuses, is
/// closed (a TCP caller has no other way to hear it).
pub(crate) async fn plaintext_tcp(ctx: &Arc<ConnCtx>, stream: tokio::net::TcpStream) {
    let result = async {
        let port = ctx
            .plaintext_port
            .ok_or(ProxyError::Malformed("captured plaintext without its port"))?;
        let pool = {
            let snap = ctx
                .shared
                .snapshot
                .load_full()
                .ok_or(ProxyError::ShuttingDown)?;
            let inb = snap
                .config
                .inbound
                .as_ref()
                .ok_or(ProxyError::ShuttingDown)?;
            let pool = snap
                .app_pool(allowed(inb, port)?)
                .ok_or(ProxyError::PortNotAllowed(port))?
                .clone();
            judge(ctx, inb, snap.jwt.as_ref(), port, None)?;
            pool
        };
        pool.connect().await
    }
    .await;
    match result {
        Ok(app) => spawn_splice(&ctx.shared, stream, app),
        Err(e) => {
            ctx.shared.metrics.error(Direction::Inbound, e.reason());
            tracing::debug!(peer = %ctx.peer, error = %e, "captured plaintext connection refused");
        }
    }
}

/// The service's rate limits, in order: the first empty bucket refuses with 429.
fn rate_limit(
    ctx: &ConnCtx,
    snap: &crate::state::Snapshot,
    parts: &http::request::Parts,
) -> Result<(), ProxyError> {
    if snap.rate_limits.is_empty() {
        return Ok(());
    }
    let view = sinew_model::route::RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let now = std::time::Instant::now();
    for limiter in &snap.rate_limits {
        let cfg = &limiter.config;
        if !cfg.matches.is_empty() && !cfg.matches.iter().any(|m| m.matches(&view)) {
            continue;
        }
        let key = match &cfg.key {
            None => "",
            Some(sinew_model::compile::RateKey::Header(h)) => parts
                .headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            Some(sinew_model::compile::RateKey::Identity) => {
                ctx.peer_identity.as_deref().unwrap_or("")
            }
        };
        if let Err(retry_after) = limiter.take(key, now) {
            return Err(ProxyError::RateLimited {
                name: cfg.name.clone(),
                retry_after,
            });
        }
    }
    Ok(())
}

/// Authentication and authorization, with every decision counted.
fn judge(
    ctx: &ConnCtx,
    inb: &InboundConfig,
    jwt: Option<&crate::jwt::JwtVerifier>,
    port: u16,
    parts: Option<&http::request::Parts>,
) -> Result<Option<crate::jwt::VerifiedToken>, ProxyError> {
    let source = ctx.peer_identity.as_deref();
    match crate::policy::check_with_decision(
        inb,
        jwt,
        source,
        port,
        parts,
        std::time::SystemTime::now(),
    ) {
        Ok((token, decision)) => {
            ctx.shared.metrics.authz(&decision);
            Ok(token)
        }
        Err(e) => {
            if let Some(d) = &e.decision {
                ctx.shared.metrics.authz(d);
            }
            Err(ProxyError::Policy(e))
        }
    }
}

/// Replaces the request's path by its normalised form
/// ([`sinew_model::authz::normalize_path`], as authorization judges it), keeping the
/// query as sent. Like Envoy's path normalisation with escaped slashes unescaped and
/// forwarded. The asterisk form (`OPTIONS *`) names no path and is left alone.
pub(crate) fn normalize_target(parts: &mut http::request::Parts) -> Result<(), ProxyError> {
    let path = parts.uri.path();
    if path == "*" {
        return Ok(());
    }
    let std::borrow::Cow::Owned(normalized) = sinew_model::authz::normalize_path(path) else {
        return Ok(());
    };
    let pq = match parts.uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let pq = http::uri::PathAndQuery::try_from(pq)
        .map_err(|_| ProxyError::Malformed("invalid request path"))?;
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(pq);
    parts.uri =
        http::Uri::from_parts(uri).map_err(|_| ProxyError::Malformed("invalid request target"))?;
    Ok(())
}

fn allowed(inb: &InboundConfig, port: u16) -> Result<u16, ProxyError> {
    if inb.ports.contains(&port) {
        Ok(port)
    } else {
        Err(ProxyError::PortNotAllowed(port))
    }
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
    let inb = snap
        .config
        .inbound
        .as_ref()
        .ok_or(ProxyError::ShuttingDown)?;
    meta.service = snap.inbound_service.clone();
    let body_limit = check_head(ctx, inb, &mut req)?;
    if req.method() == Method::CONNECT {
        // Boxed: tunnels are one request per connection, and every other request's
        // future would hold room for them.
        return Box::pin(tunnel(ctx, &snap, inb, req)).await;
    }
    let port = allowed(inb, dst_port(ctx, inb, &req)?)?;
    crate::trace::note_inbound(
        req.extensions(),
        std::net::SocketAddr::new(inb.app_address, port),
    );
    let pool = snap
        .app_pool(port)
        .ok_or(ProxyError::PortNotAllowed(port))?;
    // Only a peer sidecar says which protocol its client spoke; a plaintext caller
    // speaks for itself.
    let orig_h1 = ctx.plaintext_port.is_none()
        && req
            .headers()
            .get(ORIG_PROTO)
            .is_some_and(|v| v == HeaderValue::from_static("HTTP/1.1"));
    let upstream_h2 = req.version() == Version::HTTP_2 && !orig_h1;
    let authority = http_util::authority(&req).ok_or(ProxyError::Malformed("no authority"))?;
    // A captured plaintext caller's upgrade (WebSocket) is the app's to answer; mesh
    // callers' upgrades come through CONNECT tunnels instead.
    let downstream = (ctx.plaintext_port.is_some() && http_util::is_upgrade(&req))
        .then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    admit(ctx, &snap, inb, port, &mut parts)?;
    http_util::strip_hop_by_hop(&mut parts.headers, downstream.is_some());
    http_util::set_target(&mut parts, &authority, None, upstream_h2)?;
    if let Some(downstream) = downstream {
        let req = Request::from_parts(parts, ReqBody::Incoming(body));
        // Boxed: upgrades are rare, and every request's future would hold room.
        return Box::pin(upgrade(ctx, pool, req, downstream)).await;
    }
    let version = if upstream_h2 {
        UpVersion::Http2
    } else {
        UpVersion::Http1
    };
    // The caller's deadline holds here too: the app's answer is not waited for past
    // it (and dropping the request tells the app to stop), even if the caller's
    // sidecar never says it gave up.
    let deadline = crate::resilience::incoming_timeout(&parts.headers);
    // With a body limit, the body is counted on its way (one allocation, only then).
    let watch = body_limit.map(|l| Arc::new(crate::body::Watch::new(Some(l))));
    let body = match &watch {
        Some(w) => ReqBody::Watched(body, w.clone()),
        None => ReqBody::Incoming(body),
    };
    // Sent here rather than from a function of its own: an async function's
    // arguments would take room of their own in every request's future.
    let send = pool.send(Request::from_parts(parts, body), version);
    let sent = match deadline {
        Some(d) => tokio::time::timeout(d, send)
            .await
            .map_err(|_| ProxyError::Timeout(d))?,
        None => send.await,
    };
    let resp = match (sent, &watch) {
        (Err(_), Some(w)) if w.too_large() => {
            return Err(ProxyError::BodyTooLarge(w.limit().unwrap_or(0)));
        }
        (r, _) => r?,
    };
    app_response(resp)
}

/// Checks the request head against the inbound listener's limits (with room for
/// what the caller's sidecar added on the mesh hop); the body limit, if any.
fn check_head(
    ctx: &ConnCtx,
    inb: &InboundConfig,
    req: &mut Request<Incoming>,
) -> Result<Option<u64>, ProxyError> {
    let (own, body_limit) = http_util::listener_limits(&ctx.shared.settings.limits, &inb.limits);
    let limits = crate::types::HeadLimits {
        request_header_bytes: own.request_header_bytes + crate::types::MESH_HEADER_ROOM,
        request_headers: own.request_headers + 16,
        ..own
    };
    http_util::check_request_head(req.headers_mut(), &limits)?;
    http_util::check_declared_length(req.headers(), body_limit)?;
    Ok(body_limit)
}

/// `CONNECT <addr>:<port>` from a peer sidecar: a byte tunnel to a declared
/// application port, judged on L4 fields (who calls, which port).
async fn tunnel(
    ctx: &Arc<ConnCtx>,
    snap: &crate::state::Snapshot,
    inb: &InboundConfig,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, ProxyError> {
    if ctx.plaintext_port.is_some() {
        // Tunnels are the mesh's (a peer sidecar's, over mTLS); a plaintext
        // caller's CONNECT would otherwise open one to any declared port.
        return Err(ProxyError::Malformed("CONNECT from a plaintext caller"));
    }
    let port = req
        .uri()
        .authority()
        .and_then(|a| a.port_u16())
        .ok_or(ProxyError::Malformed("CONNECT needs host:port"))?;
    let pool = snap
        .app_pool(allowed(inb, port)?)
        .ok_or(ProxyError::PortNotAllowed(port))?;
    // Tunnels (TCP, upgrades) are judged on L4 fields: who calls, which port.
    judge(ctx, inb, snap.jwt.as_ref(), port, None)?;
    let app = pool.connect().await?;
    let downstream = hyper::upgrade::on(&mut req);
    let shared = ctx.shared.clone();
    tokio::spawn(async move {
        match downstream.await {
            Ok(d) => spawn_splice(&shared, TokioIo::new(d), app),
            Err(e) => tracing::debug!(error = %e, "inbound tunnel did not complete"),
        }
    });
    Ok(Response::new(RespBody::empty()))
}

/// The application port a request is for: captured plaintext's own, else what the
/// caller's sidecar says (`sinew-dst-port`), else the only one there is.
fn dst_port(
    ctx: &ConnCtx,
    inb: &InboundConfig,
    req: &Request<Incoming>,
) -> Result<u16, ProxyError> {
    match (ctx.plaintext_port, req.headers().get(DST_PORT)) {
        // Captured plaintext goes to the port it was sent to, whatever it says.
        (Some(port), _) => Ok(port),
        (None, Some(v)) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or(ProxyError::Malformed("invalid sinew-dst-port")),
        (None, None) => match inb.ports.as_slice() {
            [only] => Ok(*only),
            _ => Err(ProxyError::Malformed(
                "sinew-dst-port is required: several application ports",
            )),
        },
    }
}

/// Admits a request head to the application: mesh marks removed, the target
/// normalised, the caller authenticated and authorized, rate limited, and its
/// verified identity (only that) passed on.
fn admit(
    ctx: &ConnCtx,
    snap: &crate::state::Snapshot,
    inb: &InboundConfig,
    port: u16,
    parts: &mut http::request::Parts,
) -> Result<(), ProxyError> {
    parts.headers.remove(DST_PORT);
    parts.headers.remove(ORIG_PROTO);
    // From here on (authorization, rate limits, the app) the path is the normalised
    // one: the app must serve exactly the path that was judged, never a raw
    // `/api/../admin` that policy saw as `/admin` (or the other way round).
    normalize_target(parts)?;
    // End-user authentication, then authorization; then only verified claims reach
    // the app (headers a client set for them are removed).
    let token = judge(ctx, inb, snap.jwt.as_ref(), port, Some(parts))?;
    crate::policy::apply_token(inb, &mut parts.headers, token.as_ref());
    rate_limit(ctx, snap, parts)?;
    // The caller's verified identity, set by the proxy alone: a client cannot forge it.
    match ctx
        .peer_identity
        .as_deref()
        .map(http::HeaderValue::from_str)
    {
        Some(Ok(v)) => {
            parts.headers.insert(PEER_IDENTITY, v);
        }
        _ => {
            static NAMES: [http::HeaderName; 1] = [PEER_IDENTITY];
            http_util::remove_headers(&mut parts.headers, &NAMES);
        }
    }
    Ok(())
}

/// The application's response as the caller gets it.
fn app_response(resp: Response<Incoming>) -> Result<Response<RespBody>, ProxyError> {
    let (mut parts, body) = resp.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, false);
    // Only this sidecar says whether the app saw a request.
    static APP_MUST_NOT_SET: [http::HeaderName; 1] = [UNSENT];
    http_util::remove_headers(&mut parts.headers, &APP_MUST_NOT_SET);
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Upgrades travel through CONNECT tunnels, never as a plain request.
        return Err(ProxyError::Malformed("upgrade outside a tunnel"));
    }
    Ok(Response::from_parts(parts, RespBody::Upstream(body)))
}

/// Forwards a captured plaintext caller's HTTP/1.1 upgrade to the app on a
/// connection of its own (pooled connections never change protocol); after
/// `101 Switching Protocols` the two sides are joined byte for byte.
async fn upgrade(
    ctx: &Arc<ConnCtx>,
    pool: &crate::pool::ConnPool,
    req: Request<ReqBody>,
    downstream: hyper::upgrade::OnUpgrade,
) -> Result<Response<RespBody>, ProxyError> {
    let addr = pool.addr();
    let app = pool.connect().await?;
    let mut resp = crate::stream::http1_upgrade(app, addr, req).await?;
    static APP_MUST_NOT_SET: [http::HeaderName; 1] = [UNSENT];
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        http_util::strip_hop_by_hop(&mut parts.headers, false);
        http_util::remove_headers(&mut parts.headers, &APP_MUST_NOT_SET);
        return Ok(Response::from_parts(parts, RespBody::Upstream(body)));
    }
    crate::stream::splice_upgrades(&ctx.shared, downstream, &mut resp, "inbound upgrade");
    let (mut parts, _) = resp.into_parts();
    http_util::strip_hop_by_hop(&mut parts.headers, true);
    http_util::remove_headers(&mut parts.headers, &APP_MUST_NOT_SET);
    Ok(Response::from_parts(parts, RespBody::empty()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn normalized(target: &str) -> String {
        let mut parts = Request::get(target).body(()).unwrap().into_parts().0;
        normalize_target(&mut parts).unwrap();
        parts.uri.to_string()
    }

    #[test]
    fn the_forwarded_target_is_the_judged_path_with_the_query_kept() {
        for (sent, forwarded) in [
            ("/api/items?x=1", "/api/items?x=1"),
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin?q=/../x", "/admin?q=/../x"),
            ("/api%2F..%2Fadmin", "/admin"),
            ("//api//x/./y", "/api/x/y"),
            ("/%61pi/x%20y", "/api/x%20y"),
            ("/a%3fb?c", "/a%3Fb?c"),
            // A lone `%` is sent escaped: decoding beside it makes no new escape that
            // the application would decode to a path never judged (found by fuzzing).
            ("/%%361dmin", "/%2561dmin"),
            ("*", "*"),
        ] {
            assert_eq!(normalized(sent), forwarded, "{sent}");
        }
        // The absolute form (HTTP/2's :scheme and :authority) keeps its authority.
        assert_eq!(
            normalized("http://catalog:80/x/../y?z"),
            "http://catalog:80/y?z"
        );
        // What is forwarded is a fixed point: judging it again judges the same path.
        for sent in [
            "/api/../admin",
            "/a%2fb/./c/",
            "/%2e%2e",
            "/%a%361%",
            "/%%361dmin",
        ] {
            let once = normalized(sent);
            assert_eq!(normalized(&once), once, "{sent}");
            assert_eq!(
                sinew_model::authz::normalize_path(&once),
                once.split('?').next().unwrap()
            );
        }
    }
}
