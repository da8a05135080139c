//! The per-request hooks: a hop's span started from the request, annotated as
//! routing decides, and ended with the response.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{HeaderName, Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::{
    Span as _, SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
};
use opentelemetry_sdk::trace::Span;
use sinew_model::compile::{EndpointConfig, RuleConfig, ServiceConfig};

use super::Tracing;
use super::propagation::{extract, header, inject};
use crate::types::ConnCtx;
use crate::types::Direction;

/// One hop's span, from the request's arrival to the end of its response.
pub struct Hop {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    /// `None` when the span is not recorded (sampled out, errors not wanted).
    span: Option<Arc<Mutex<Span>>>,
    // Keeps the pipeline up until this span has ended, across a reload.
    _tracing: Arc<Tracing>,
}

impl std::fmt::Debug for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hop").finish_non_exhaustive()
    }
}

impl Hop {
    /// The trace id, as 32 hex digits (for access logs).
    pub fn trace_id(&self) -> String {
        self.trace_id.to_string()
    }

    /// The hop's span id, as 16 hex digits: the parent the next hop sees.
    pub fn span_id(&self) -> String {
        self.span_id.to_string()
    }

    /// Whether the trace is sampled (head decision, as sent downstream).
    pub fn sampled(&self) -> bool {
        self.sampled
    }
}

/// The span, in request extensions, for the hooks deep in a request's handling.
#[derive(Clone)]
struct Note(Arc<Mutex<Span>>);

fn lock(span: &Mutex<Span>) -> std::sync::MutexGuard<'_, Span> {
    span.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the hop's span for `req`, a child of the caller's context, and rewrites
/// the request's context headers to the span's. `None` when tracing is off.
pub fn start<B>(ctx: &ConnCtx, dir: Direction, req: &mut Request<B>) -> Option<Hop> {
    let snap = ctx.shared.snapshot.load();
    let snap = snap.as_ref()?;
    let tracing = snap.tracing.as_ref()?;
    let incoming = extract(req.headers());
    let parent =
        Some(incoming.cx.span().span_context().span_id()).filter(|s| *s != SpanId::INVALID);
    let mut attributes = vec![
        KeyValue::new("sinew.direction", dir.as_str()),
        KeyValue::new("http.request.method", req.method().as_str().to_owned()),
        KeyValue::new("url.path", req.uri().path().to_owned()),
    ];
    let (name, kind) = match dir {
        Direction::Inbound => {
            // The caller's identity, verified by mTLS.
            if let Some(id) = &ctx.peer_identity {
                attributes.push(KeyValue::new("sinew.peer.identity", id.to_string()));
            }
            let own = snap.config.identity.as_ref().and_then(|i| i.service_key());
            let name = match &own {
                Some(s) => format!("inbound {s}"),
                None => "inbound".to_owned(),
            };
            if let Some(s) = own {
                attributes.push(KeyValue::new("sinew.service", s));
            }
            (name, SpanKind::Server)
        }
        // Named after its service once that is known (`note_service`).
        Direction::Outbound => ("outbound".to_owned(), SpanKind::Client),
    };
    let span = tracing.tracer.build_with_context(
        tracing
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes),
        &incoming.cx,
    );
    let sc = span.span_context().clone();
    if !sc.is_valid() {
        // A pipeline shutting down hands out empty spans: leave the headers alone.
        return None;
    }
    inject(req.headers_mut(), &sc, parent, &incoming);
    // Only a recorded span is worth annotating (and the allocation).
    let span = span.is_recording().then(|| {
        let span = Arc::new(Mutex::new(span));
        req.extensions_mut().insert(Note(span.clone()));
        span
    });
    Some(Hop {
        trace_id: sc.trace_id(),
        span_id: sc.span_id(),
        sampled: sc.is_sampled(),
        span,
        _tracing: tracing.clone(),
    })
}

/// Notes the response head on the hop's span: status, retries, the proxy's own
/// error.
pub fn head<B>(hop: Option<&Hop>, resp: &Response<B>) {
    let Some(span) = hop.and_then(|h| h.span.as_ref()) else {
        return;
    };
    let mut span = lock(span);
    let status = resp.status();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    let h = resp.headers();
    if let Some(n) = header(h, &HeaderName::from_static("sinew-retry-attempt"))
        .and_then(|v| v.parse::<i64>().ok())
    {
        span.set_attribute(KeyValue::new("sinew.retries", n));
    }
    let reason = header(h, &crate::types::SINEW_ERROR);
    if let Some(r) = reason {
        span.set_attribute(KeyValue::new("sinew.error", r.to_owned()));
    }
    if status.is_server_error() || reason.is_some() {
        let description = reason
            .map(str::to_owned)
            .unwrap_or_else(|| status.to_string());
        span.set_status(Status::error(description));
    }
}

/// Ends the hop's span when its response has ended: the gRPC status (from the
/// trailers, where a call that returned messages has it), bytes sent, and an error
/// status when the response was broken off.
pub fn end(hop: Option<Hop>, outcome: &crate::types::Outcome) {
    let Some(span) = hop.as_ref().and_then(|h| h.span.as_ref()) else {
        return;
    };
    let mut span = lock(span);
    if let Some(code) = outcome
        .grpc_status
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
    {
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
    }
    span.set_attribute(KeyValue::new(
        "http.response.body.size",
        i64::try_from(outcome.response_bytes).unwrap_or(i64::MAX),
    ));
    if outcome.end != crate::types::End::Complete {
        span.set_attribute(KeyValue::new("sinew.end", outcome.end.as_str()));
        if outcome.end == crate::types::End::Failed {
            span.set_status(Status::error("response broken off upstream"));
        }
    }
    span.end();
}

/// Outbound: the service the request is for (known before routing can fail).
pub fn note_service(ext: &http::Extensions, svc: &ServiceConfig) {
    let Some(Note(span)) = ext.get::<Note>() else {
        return;
    };
    let mut span = lock(span);
    let service = svc.key.to_string();
    span.update_name(format!("outbound {service}"));
    span.set_attribute(KeyValue::new("sinew.service", service));
}

/// Outbound: what routing chose (route, backend, endpoint).
pub fn note_outbound(
    ext: &http::Extensions,
    rule: &RuleConfig,
    backend: &str,
    endpoint: &EndpointConfig,
) {
    let Some(Note(span)) = ext.get::<Note>() else {
        return;
    };
    let mut span = lock(span);
    span.set_attribute(KeyValue::new(
        "sinew.route",
        format!("{}#{}", rule.route, rule.rule),
    ));
    span.set_attribute(KeyValue::new("sinew.backend", backend.to_owned()));
    span.set_attribute(KeyValue::new(
        "sinew.upstream.address",
        endpoint.sidecar.unwrap_or(endpoint.address).to_string(),
    ));
    span.set_attribute(KeyValue::new(
        "sinew.upstream.workload",
        endpoint.workload.clone(),
    ));
    // The identity the peer sidecar must prove (mTLS checks it).
    if let Some(id) = &endpoint.identity {
        span.set_attribute(KeyValue::new("sinew.peer.identity", id.clone()));
    }
}

/// Inbound: the application address the request goes to.
pub fn note_inbound(ext: &http::Extensions, app: SocketAddr) {
    if let Some(Note(span)) = ext.get::<Note>() {
        lock(span).set_attribute(KeyValue::new("sinew.upstream.address", app.to_string()));
    }
}
