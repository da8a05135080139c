//! The admin listener (loopback by default): `/live`, `/ready`, `/metrics`, `/config`,
//! `/ratelimits` (the inbound's limits and, for mesh-wide ones, the shares in force),
//! `/tap`, and `POST /shutdown` (the proxy exits as on SIGTERM: what a Job runs when
//! its work is done, where the sidecar is a regular container).
//! It runs on its own single-threaded runtime, off the data-plane workers.
//!
//! Bound to the pod's address on Kubernetes (the kubelet probes it, Prometheus scrapes
//! it), so everything but `/live`, `/ready` and `/metrics` answers loopback callers
//! only: another pod reaching the port gets 403 for `/config`, `/tap`, `/shutdown`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::Shared;

/// Admin connections open at once. At the cap, the oldest connection that has not
/// sent a request yet is closed for a new one, so a flood of idle or slow clients
/// never keeps a health prober out and never eats the proxy's descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 128;
/// Time an admin client has to send a request head (and between requests).
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin API.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, source: String) {
    let source: Arc<str> = source.into();
    let bind = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut errors = crate::accept::AcceptErrors::new("admin", bind);
    let slots = Arc::new(crate::accept::Evictable::new(MAX_ADMIN_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT)
        .max_buf_size(16 * 1024);
    loop {
        let (stream, peer) = crate::accept::next(&listener, &mut errors).await;
        let Some((slot, evicted)) = slots.admit() else {
            // Every connection is busy: this one is closed at once.
            continue;
        };
        let shared = shared.clone();
        let source = source.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            // `POST /shutdown` takes effect once its answer is written (the response
            // closes the connection): a shutdown begun at once could end the process
            // before the caller, a Job's last step, hears 200.
            let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let svc = {
                let (shared, asked) = (shared.clone(), asked.clone());
                service_fn(move |req: Request<Incoming>| {
                    slot.busy();
                    let resp = admin_response(&shared, &source, peer, &req);
                    if req.uri().path() == "/shutdown" && resp.status() == StatusCode::OK {
                        asked.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    async move { Ok::<_, Infallible>(resp) }
                })
            };
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                // Told to make room (a dropped sender, once busy, is no signal).
                Ok(()) = evicted => {}
            }
            if asked.load(std::sync::atomic::Ordering::Relaxed) {
                shared.drain.request_shutdown();
            }
        });
    }
}

/// Endpoints that reveal traffic or configuration: served to loopback callers only
/// (the sidecar's own pod or host), whatever address the admin listener is bound
/// to; probes and `/metrics` may be exposed.
fn private(path: &str) -> bool {
    !matches!(path, "/live" | "/ready" | "/metrics")
}

fn admin_response(
    shared: &Arc<Shared>,
    source: &str,
    peer: std::net::SocketAddr,
    req: &Request<Incoming>,
) -> Response<AdminBody> {
    let path = req.uri().path();
    if private(path) && !peer.ip().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            format!("{path} is served to loopback callers only\n"),
        )
        .map(BodyExt::boxed);
    }
    if path == "/shutdown" {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n").map(BodyExt::boxed);
        }
        // Acted on by the connection once this answer is written (see `serve`).
        let mut resp = text(StatusCode::OK, "shutting down\n");
        resp.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return resp.map(BodyExt::boxed);
    }
    if path == "/tap" && req.method() == Method::GET {
        tap(shared.clone(), req)
    } else {
        route(shared, source, req).map(BodyExt::boxed)
    }
}

/// The admin API's response body: whole, or streamed (`/tap`).
type AdminBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `GET /tap?filters`: one JSON line per matching request, as they happen, until
/// the client goes away (or `limit` lines).
fn tap(shared: Arc<Shared>, req: &Request<Incoming>) -> Response<AdminBody> {
    let filter = match crate::tap::Filter::parse(req.uri().query()) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")).map(BodyExt::boxed),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        let mut sub = shared.tap.subscribe(filter.clone());
        let mut sent = 0u64;
        // A first line at once: the client knows the tap is live.
        let hello = Bytes::from_static(b"{\"tap\":\"started\"}\n");
        if tx.send(Ok(Frame::data(hello))).await.is_err() {
            return;
        }
        loop {
            let line = tokio::select! {
                _ = tx.closed() => return,
                ev = sub.rx.recv() => match ev {
                    Ok(e) if filter.matches(&e) => {
                        let mut line = serde_json::to_vec(&*e).unwrap_or_default();
                        line.push(b'\n');
                        line
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        format!("{{\"missed\":{n}}}\n").into_bytes()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
            sent += 1;
            if filter.limit.is_some_and(|l| sent >= l) {
                return;
            }
        }
    });
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn route(shared: &Shared, source: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                let why = match (shared.snapshot.load().is_some(), shared.last_error()) {
                    (_, Some(e)) => format!("not ready: {e}\n"),
                    (false, None) => "not ready: no configuration applied yet\n".to_owned(),
                    (true, None) => "not ready: draining\n".to_owned(),
                };
                text(StatusCode::SERVICE_UNAVAILABLE, why)
            }
        }
        "/metrics" => {
            // OpenMetrics for scrapers that ask for it (Prometheus does), else the
            // classic text format (promtool, curl, older scrapers).
            let open = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let (body, kind) = if open {
                (
                    shared.metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    shared.metrics.encode_prometheus(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
            r
        }
        "/config" => {
            let snap = shared.snapshot.load_full();
            let bound: Vec<serde_json::Value> = shared
                .bound
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(configured, actual)| {
                    serde_json::json!({"configured": configured.to_string(), "bound": actual.to_string()})
                })
                .collect();
            let body = match &snap {
                Some(s) => serde_json::json!({
                    "version": s.version,
                    "generation": s.generation,
                    "appliedAt": s.applied_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                    "source": source,
                    "lastError": shared.last_error(),
                    "listeners": bound,
                    "config": &s.config,
                }),
                None => serde_json::json!({
                    "version": null,
                    "source": source,
                    "lastError": shared.last_error(),
                }),
            };
            let status = if snap.is_some() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut r = text(status, serde_json::to_vec_pretty(&body).unwrap_or_default());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        "/ratelimits" => {
            let now = std::time::Instant::now();
            let limits: Vec<serde_json::Value> = shared
                .snapshot
                .load_full()
                .map(|s| s.rate_limits.iter().map(|l| l.status(now)).collect())
                .unwrap_or_default();
            let mut r = text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&limits).unwrap_or_default(),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready, /metrics, /config, /ratelimits, /tap, POST /shutdown\n",
        ),
    }
}
