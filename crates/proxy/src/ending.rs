//! A request's end. Its observers (metrics, the access log, taps, the control
//! plane's stats, the trace span) are told when its response has been sent in full,
//! not when the response head is ready: only then are the bytes that went through,
//! a gRPC status sent in trailers (how every gRPC call that returns a message ends),
//! and a body broken off halfway known.
//!
//! [`observe`] takes what they need from the request head before it is forwarded;
//! [`respond`] takes what they need from the request and the response head into an
//! [`Ending`]; a response without a body ends there, any other carries its ending in
//! its body ([`crate::body::RespBody::Tracked`], told through [`crate::body::OnEnd`]),
//! which reports when the body ends,
//! fails, or is dropped unfinished because the client went away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Response, StatusCode};
use sinew_model::resource::AccessLogFormat;

use crate::access::Record;
use crate::body::RespBody;
use crate::trace::Hop;
use crate::types::{ConnCtx, Direction, Outcome, RequestMeta};

pub use crate::types::End;

/// What a finished request's observers (the access log, taps, the control plane's
/// stats) need from its head. Taken once, before the request is forwarded, and only
/// while one of them is on.
#[derive(Debug)]
pub struct Observed {
    method: http::Method,
    /// The request target (a cheap clone: shared bytes); its path is what is kept.
    uri: http::Uri,
    /// What the access log and taps need besides, when either is on.
    head: Option<Box<Head>>,
}

#[derive(Debug)]
struct Head {
    /// The access-log format, when this proxy logs requests.
    format: Option<AccessLogFormat>,
    /// The request headers, redacted, when a tap may want this request.
    headers: Option<BTreeMap<String, String>>,
    start: SystemTime,
    host: Option<HeaderValue>,
    protocol: &'static str,
    request_bytes: Option<u64>,
    traceparent: Option<HeaderValue>,
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Starts observing a request, if this proxy logs requests, a tap may want it, or
/// it reports stats.
pub fn observe(
    ctx: &ConnCtx,
    dir: Direction,
    req: &http::Request<hyper::body::Incoming>,
) -> Option<Observed> {
    let format = ctx
        .shared
        .snapshot
        .load()
        .as_ref()
        .and_then(|s| s.config.access_log);
    let headers = ctx
        .shared
        .tap
        .wants(dir.as_str(), req.method(), req.uri().path())
        .then(|| crate::tap::redacted(req.headers()));
    let head = (format.is_some() || headers.is_some()).then(|| {
        Box::new(Head {
            format,
            headers,
            start: SystemTime::now(),
            host: req
                .uri()
                .authority()
                .is_none()
                .then(|| req.headers().get(http::header::HOST).cloned())
                .flatten(),
            protocol: if req.version() == http::Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            request_bytes: content_length(req.headers()),
            traceparent: req.headers().get(crate::types::TRACEPARENT).cloned(),
        })
    });
    if head.is_none() && !ctx.shared.stats.on() {
        return None;
    }
    Some(Observed {
        method: req.method().clone(),
        uri: req.uri().clone(),
        head,
    })
}

/// Finishes an observed request: one record, to the access log and to the taps that
/// want it, and its counts to the stats.
pub fn finish(
    ctx: &ConnCtx,
    observed: Option<Observed>,
    dir: Direction,
    meta: RequestMeta,
    outcome: &Outcome,
) {
    let Some(o) = observed else { return };
    if ctx.shared.stats.on() {
        let inbound = dir == Direction::Inbound;
        // Inbound: only mTLS yields a caller identity. Outbound: the callee's identity
        // when the request went to a sidecar that must present one, over TLS.
        let peer = if inbound {
            ctx.peer_identity.as_deref()
        } else {
            meta.mtls_peer(&ctx.shared)
        };
        ctx.shared.stats.record(&crate::stats::Request {
            inbound,
            service: meta.service.as_deref().unwrap_or_default(),
            route: meta.route.as_deref().unwrap_or_default(),
            peer_identity: peer.unwrap_or_default(),
            mtls: peer.is_some(),
            failed: outcome.failed(),
            elapsed: outcome.duration,
            method: &o.method,
            path: o.uri.path(),
        });
    }
    let Some(head) = o.head else { return };
    let head = *head;
    let record = Record {
        start: head.start,
        direction: dir.as_str(),
        method: o.method,
        host: head.host,
        uri: o.uri,
        protocol: head.protocol,
        status: outcome.status.as_u16(),
        grpc_status: outcome.grpc_status.clone(),
        duration: outcome.duration,
        head: outcome.head,
        request_bytes: head.request_bytes,
        response_bytes: outcome.response_bytes,
        end: outcome.end,
        service: meta.service,
        route: meta.route,
        upstream: meta.upstream,
        client: ctx.peer,
        peer_identity: ctx.peer_identity.clone(),
        traceparent: head.traceparent,
        error: outcome.error.clone(),
    };
    // Only what some tap's whole filter matches becomes an event.
    let tapped = head
        .headers
        .filter(|_| ctx.shared.tap.matches_any(&record))
        .map(|headers| crate::tap::TapEvent {
            record: record.clone(),
            headers,
        });
    if let Some(format) = head.format
        && !ctx.shared.access_log.send(format, record)
    {
        ctx.shared.metrics.access_log_dropped.inc();
    }
    if let Some(event) = tapped {
        ctx.shared.tap.publish(event);
    }
}

/// What a request's observers need once its response has ended.
#[derive(Debug)]
pub struct Ending {
    ctx: Arc<ConnCtx>,
    dir: Direction,
    meta: RequestMeta,
    observed: Option<Observed>,
    hop: Option<Hop>,
    started: Instant,
    head: Duration,
    status: StatusCode,
    grpc_status: Option<HeaderValue>,
    error: Option<HeaderValue>,
}

/// Hands the response to the client, telling the request's observers when it has
/// ended.
pub fn respond(
    ctx: Arc<ConnCtx>,
    dir: Direction,
    meta: RequestMeta,
    observed: Option<Observed>,
    hop: Option<Hop>,
    started: Instant,
    resp: Response<RespBody>,
) -> Response<RespBody> {
    use http_body::Body as _;
    crate::trace::head(hop.as_ref(), &resp);
    let h = resp.headers();
    let ending = Ending {
        ctx,
        dir,
        meta,
        observed,
        hop,
        started,
        head: started.elapsed(),
        status: resp.status(),
        grpc_status: h.get(crate::types::GRPC_STATUS).cloned(),
        error: h.get(crate::types::SINEW_ERROR).cloned(),
    };
    if resp.body().is_end_stream() {
        ending.end(0, None, End::Complete);
        return resp;
    }
    resp.map(|body| RespBody::tracked(body, Some(ending)))
}

impl crate::body::OnEnd for Option<Ending> {
    fn end(&mut self, bytes: u64, trailer_grpc: Option<HeaderValue>, end: End) {
        if let Some(ending) = self.take() {
            ending.end(bytes, trailer_grpc, end);
        }
    }
}

impl Ending {
    /// Tells every observer: `bytes` of body were sent, `trailer_grpc` is a gRPC
    /// status from the trailers.
    pub fn end(self, bytes: u64, trailer_grpc: Option<HeaderValue>, end: End) {
        let Ending {
            ctx,
            dir,
            meta,
            observed,
            hop,
            started,
            head,
            status,
            grpc_status,
            error,
        } = self;
        let outcome = Outcome {
            status,
            grpc_status: trailer_grpc.or(grpc_status),
            error,
            duration: started.elapsed(),
            head,
            response_bytes: bytes,
            end,
        };
        let peer = match dir {
            Direction::Inbound => ctx.peer_identity.as_ref(),
            Direction::Outbound => None,
        };
        ctx.shared
            .metrics
            .http(dir, &meta, peer, &outcome, &ctx.last_series);
        crate::trace::end(hop, &outcome);
        finish(&ctx, observed, dir, meta, &outcome);
    }
}
