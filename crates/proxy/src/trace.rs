//! Distributed tracing: a span per proxy hop, continuing the caller's trace, exported
//! over OTLP (`MeshConfig.spec.tracing`).
//!
//! **Propagation.** A request's context is read from W3C `traceparent`/`tracestate`,
//! else from B3 (the single `b3` header, else `x-b3-*`). The hop's span is its child,
//! and the request goes on with the span's own context: always as W3C, and also as
//! B3, in the form(s) it came in, when it came with B3. Without a context, the span
//! starts a new trace. With tracing off, trace headers pass through untouched.
//!
//! **Sampling.** Head-based: a caller's decision (the W3C sampled flag, B3 `1`/`0`/
//! `d`) is kept; a new trace (or a B3 context with its decision deferred) is sampled
//! with the configured ratio, decided from the trace id so every hop agrees. With
//! `alwaysSampleErrors`, a span sampling said no to is still *recorded* (OTel's
//! `RecordOnly`: attributes kept, sampled flag off, so downstream hops do the same),
//! and `ExportErrors` exports it only if it ends in error. See there for why.
//!
//! **Export.** Ended spans go to the SDK's `BatchSpanProcessor`: a bounded queue and
//! a thread of its own. Ending a span never waits; a full queue drops the span; and
//! exports run as tasks on the Tokio runtime the configuration was applied on (see
//! `OnRuntime`), so a slow or dead collector costs the request path nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider,
    ShouldSample, Span, SpanData, SpanExporter, SpanProcessor,
};
use sinew_model::ProxyConfig;
use sinew_model::compile::{EndpointConfig, RuleConfig, ServiceConfig, TracingConfig};
use sinew_model::resource::OtlpProtocol;
use tokio::runtime::Handle;

use crate::listeners::ConnCtx;
use crate::metrics::Direction;

/// How long one export may take (the OTLP default), retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest collector answer read (the answer is a small status message).
const MAX_ANSWER: usize = 64 * 1024;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every header a context travels in: replaced as a whole at each hop, so a stale
/// half (say, `x-b3-parentspanid` from two hops back) never reaches the next.
const CONTEXT_HEADERS: [HeaderName; 8] = [
    TRACEPARENT,
    TRACESTATE,
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_PARENT_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
];

/// A running tracing pipeline: the configuration it was built from, and the SDK
/// provider (sampler, processors, exporter) behind the tracer.
pub struct Tracing {
    config: TracingConfig,
    resource: Vec<(&'static str, String)>,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Tracing {
    /// The pipeline for `config`: `prev` when nothing it depends on changed (so a
    /// reload keeps its queue and connection), a new one when something did, `None`
    /// when tracing is off or cannot start (logged).
    pub fn for_config(prev: Option<&Arc<Tracing>>, config: &ProxyConfig) -> Option<Arc<Tracing>> {
        let cfg = config.tracing.as_ref()?;
        let resource = resource_of(config);
        if let Some(p) = prev
            && p.config == *cfg
            && p.resource == resource
        {
            return Some(p.clone());
        }
        match Tracing::build(cfg, resource) {
            Ok(t) => {
                tracing::info!(endpoint = %cfg.endpoint, protocol = ?cfg.protocol, ratio = cfg.sampling_ratio, "tracing on");
                Some(Arc::new(t))
            }
            Err(e) => {
                tracing::error!(endpoint = %cfg.endpoint, "tracing is off: {e}");
                None
            }
        }
    }

    fn build(
        cfg: &TracingConfig,
        resource: Vec<(&'static str, String)>,
    ) -> Result<Tracing, String> {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let rt = Handle::try_current().map_err(|_| "no Tokio runtime to export on".to_owned())?;
        // The gRPC channel spawns its worker where it is built.
        let _on_rt = rt.enter();
        let exporter = opentelemetry_otlp::SpanExporter::builder();
        let batch = match cfg.protocol {
            OtlpProtocol::Grpc => BatchSpanProcessor::builder(OnRuntime::new(
                exporter
                    .with_tonic()
                    .with_endpoint(cfg.endpoint.clone())
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?,
                rt.clone(),
                cfg.endpoint.clone(),
            ))
            .build(),
            OtlpProtocol::HttpProtobuf => BatchSpanProcessor::builder(OnRuntime::new(
                exporter
                    .with_http()
                    .with_http_client(Http1Client)
                    .with_endpoint(cfg.endpoint.clone())
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?,
                rt.clone(),
                cfg.endpoint.clone(),
            ))
            .build(),
        };
        let res = opentelemetry_sdk::Resource::builder()
            .with_attributes(
                resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(*k, v.clone()))
                    .collect::<Vec<_>>(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(MeshSampler {
                ratio: cfg.sampling_ratio,
                errors: cfg.always_sample_errors,
            })
            .with_span_processor(ExportErrors { next: batch })
            .with_resource(res)
            .build();
        let tracer = provider.tracer("sinew-proxy");
        Ok(Tracing {
            config: cfg.clone(),
            resource,
            provider,
            tracer,
        })
    }

    /// Exports what is queued now and waits for it (up to the SDK's 5 s). Blocking:
    /// call it off the data-plane workers.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::debug!(error = %e, "span flush failed");
        }
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        // Shutting down exports what is queued, which may wait on the collector: do it
        // on a thread of its own, never on the (data-plane) thread that let go last.
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new()
            .name("sinew-trace-stop".into())
            .spawn(move || {
                let _ = provider.shutdown();
            });
    }
}

/// What the spans say about the proxy itself (the OTel resource).
fn resource_of(config: &ProxyConfig) -> Vec<(&'static str, String)> {
    let service = config
        .identity
        .as_ref()
        .and_then(|i| i.service.clone())
        .unwrap_or_else(|| config.name.clone());
    let mut out = vec![
        ("service.name", service),
        ("service.namespace", config.namespace.clone()),
        (
            "service.instance.id",
            format!("{}/{}", config.namespace, config.name),
        ),
    ];
    if let Some(i) = &config.identity {
        out.push(("sinew.workload", format!("{}/{}", i.namespace, i.workload)));
        out.push(("sinew.identity", i.spiffe.clone()));
    }
    out
}

/// A decision B3 can carry without a context to attach it to (`b3: 0`), or the
/// absence of one (`x-b3-sampled` missing: "deferred", the receiver decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum B3Decision {
    Sample,
    Deny,
    Deferred,
}

/// The sampler: keeps the caller's decision, samples new traces by ratio, and turns
/// "no" into "record only" when failed requests must be exported anyway.
#[derive(Debug, Clone)]
struct MeshSampler {
    ratio: f64,
    errors: bool,
}

impl ShouldSample for MeshSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let by_ratio = || {
            Sampler::TraceIdRatioBased(self.ratio)
                .should_sample(parent, trace_id, name, kind, attributes, links)
                .decision
                == SamplingDecision::RecordAndSample
        };
        let span = parent.map(|cx| cx.span());
        let remote = span
            .as_ref()
            .map(|s| s.span_context().clone())
            .filter(SpanContext::is_valid);
        let sampled = match (parent.and_then(|cx| cx.get::<B3Decision>()), &remote) {
            (Some(B3Decision::Sample), _) => true,
            (Some(B3Decision::Deny), _) => false,
            (Some(B3Decision::Deferred), _) | (None, None) => by_ratio(),
            (None, Some(sc)) => sc.is_sampled(),
        };
        SamplingResult {
            decision: match (sampled, self.errors) {
                (true, _) => SamplingDecision::RecordAndSample,
                (false, true) => SamplingDecision::RecordOnly,
                (false, false) => SamplingDecision::Drop,
            },
            attributes: Vec::new(),
            // The caller's vendor entries travel on unchanged.
            trace_state: remote
                .map(|sc| sc.trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

/// Exports sampled spans, and recorded-but-unsampled ones that ended in error.
///
/// Why this mechanism: head sampling has to decide when the request arrives, but
/// whether it fails is known only at its end. The sampler therefore records spans it
/// did not sample (cheap: attributes in memory, no export), and this processor, the
/// only one registered, looks at each ended span: sampled ones go to the batch as
/// usual; unsampled ones go only when their status is an error, marked sampled (the
/// batch processor, like every OTel exporter, sends only sampled spans) and tagged
/// `sinew.sampled: error` so a reader knows why a partial trace exists. Every sidecar
/// on the path records too (the flag it forwards says "not sampled"), so each hop that
/// sees the failure exports its own span, and the failing path's parent/child links
/// hold across sidecars; hops that succeeded (say, a retry that rescued the request
/// upstream of the failure) stay unexported. Doing it here, not by re-deciding at the
/// end, keeps the sampled flag sent downstream honest: it was "no" when sent.
#[derive(Debug)]
struct ExportErrors<P> {
    next: P,
}

impl<P: SpanProcessor> SpanProcessor for ExportErrors<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.next.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        if !span.span_context.is_sampled() {
            if !matches!(span.status, Status::Error { .. }) {
                return;
            }
            let sc = &span.span_context;
            span.span_context = SpanContext::new(
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().with_sampled(true),
                sc.is_remote(),
                sc.trace_state().clone(),
            );
            span.attributes
                .push(KeyValue::new("sinew.sampled", "error"));
        }
        self.next.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.next.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.next.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.next.set_resource(resource);
    }
}

/// Runs each export as a task on a Tokio runtime, and logs when exports start or
/// stop failing.
///
/// The batch processor calls exporters on its own thread with a plain `block_on`;
/// the gRPC and HTTP clients need a Tokio runtime (timers, I/O, spawned connection
/// tasks). Spawning the export onto the runtime and waiting for its handle gives them
/// one without the processor's thread ever being part of it. A runtime that has shut
/// down fails the export (the spans are dropped) rather than hanging it.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    rt: Handle,
    endpoint: String,
    failing: AtomicBool,
}

impl<E> OnRuntime<E> {
    fn new(inner: E, rt: Handle, endpoint: String) -> OnRuntime<E> {
        OnRuntime {
            inner: Arc::new(inner),
            rt,
            endpoint,
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.rt.spawn(async move { inner.export(batch).await });
        async move {
            let result = task.await.unwrap_or_else(|e| {
                Err(OTelSdkError::InternalFailure(format!(
                    "export task ended: {e}"
                )))
            });
            // One line per change, not one per batch, while a collector is away.
            match &result {
                Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "span export failing; spans are dropped until it recovers");
                }
                Err(e) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "span export failed")
                }
                Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                    tracing::info!(endpoint = %self.endpoint, "span export recovered");
                }
                Ok(()) => {}
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Set once, while building, before any export shares the exporter.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The OTLP/HTTP client: one HTTP/1.1 connection per export (a batch every few
/// seconds at most), on the runtime [`OnRuntime`] runs exports on. Written here
/// rather than taking `reqwest` for one POST.
#[derive(Debug, Clone, Copy)]
struct Http1Client;

type HttpFuture<'a> = Pin<
    Box<dyn Future<Output = Result<Response<Bytes>, opentelemetry_http::HttpError>> + Send + 'a>,
>;

impl opentelemetry_http::HttpClient for Http1Client {
    // The trait is declared with `async_trait`; this is the signature it expands to.
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> HttpFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(post(request))
    }
}

async fn post(request: Request<Bytes>) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
    use http_body_util::{BodyExt as _, Full, Limited};
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or("the collector URL names no host")?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        // HTTP/1.1 origin form, with the authority in Host.
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()?;
        parts.headers.insert(
            http::header::HOST,
            HeaderValue::from_str(authority.as_str())?,
        );
        let resp = tx
            .send_request(Request::from_parts(parts, Full::new(body)))
            .await?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
        Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
    };
    tokio::time::timeout(EXPORT_TIMEOUT, exchange)
        .await
        .map_err(|_| "the collector did not answer in time")?
}

/// The caller's context, and how it came (so the next hop gets it the same way).
struct Incoming {
    cx: Context,
    b3_single: bool,
    b3_multi: bool,
    /// The B3 trace id was 64-bit: B3 headers sent on keep that width.
    b3_short: bool,
}

fn header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A B3 trace id: 32 hex digits, or 16 (the upper half then zero).
fn b3_trace_id(s: &str) -> Option<(TraceId, bool)> {
    if !(s.len() == 32 || s.len() == 16) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u128::from_str_radix(s, 16).ok()?;
    (id != 0).then(|| (TraceId::from(id), s.len() == 16))
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u64::from_str_radix(s, 16).ok()?;
    (id != 0).then(|| SpanId::from(id))
}

/// A B3 sampling state: `1`/`d` (debug implies sampled), `0`; `true`/`false` from
/// old multi-header senders.
fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// A B3 context: ids (with the width of the trace id) and decision.
type B3Context = (Option<(TraceId, bool, SpanId)>, Option<bool>);

fn b3_single(v: &str) -> Option<B3Context> {
    let mut parts = v.split('-');
    let first = parts.next()?;
    if let Some(decision) = b3_sampled(first).filter(|_| v.len() == 1) {
        // `b3: 0`, `b3: 1`, `b3: d`: a decision alone.
        return Some((None, Some(decision)));
    }
    let (trace, short) = b3_trace_id(first)?;
    let span = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        Some(s) => Some(b3_sampled(s)?),
        None => None,
    };
    Some((Some((trace, short, span)), sampled))
}

fn b3_multi(h: &HeaderMap) -> Option<B3Context> {
    let sampled = match header(h, &B3_FLAGS) {
        Some("1") => Some(true),
        _ => header(h, &B3_SAMPLED).and_then(b3_sampled),
    };
    let ids = match (header(h, &B3_TRACE_ID), header(h, &B3_SPAN_ID)) {
        (Some(t), Some(s)) => {
            let (trace, short) = b3_trace_id(t)?;
            Some((trace, short, b3_span_id(s)?))
        }
        _ => None,
    };
    (ids.is_some() || sampled.is_some()).then_some((ids, sampled))
}

/// Reads the caller's context: W3C first (it is the standard, and carries
/// `tracestate`), then single-header B3, then multi-header B3. A malformed header
/// counts as absent.
fn extract(headers: &HeaderMap) -> Incoming {
    let b3_single_value = header(headers, &B3).and_then(b3_single);
    let b3_multi_value = b3_multi(headers);
    let mut incoming = Incoming {
        cx: Context::new(),
        b3_single: b3_single_value.is_some(),
        b3_multi: b3_multi_value.is_some(),
        b3_short: false,
    };
    let b3 = b3_single_value.or(b3_multi_value);
    let w3c = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let w3c_trace = w3c.span().span_context().trace_id();
    if w3c_trace != TraceId::INVALID {
        // A sidecar upstream sends both; B3 keeps the width its sender chose.
        incoming.b3_short = matches!(b3, Some((Some((t, true, _)), _)) if t == w3c_trace);
        incoming.cx = w3c;
        return incoming;
    }
    if let Some((ids, sampled)) = b3 {
        let cx = match ids {
            Some((trace, short, span)) => {
                incoming.b3_short = short;
                let flags = if sampled == Some(true) {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                };
                Context::new().with_remote_span_context(SpanContext::new(
                    trace,
                    span,
                    flags,
                    true,
                    TraceState::default(),
                ))
            }
            None => Context::new(),
        };
        incoming.cx = cx.with_value(match sampled {
            Some(true) => B3Decision::Sample,
            Some(false) => B3Decision::Deny,
            None => B3Decision::Deferred,
        });
    }
    incoming
}

/// Writes `sc` (the hop's span) as the context the next hop gets: W3C always, B3 in
/// the forms it came in; whatever context headers there were are replaced.
fn inject(headers: &mut HeaderMap, sc: &SpanContext, parent: Option<SpanId>, incoming: &Incoming) {
    for h in &CONTEXT_HEADERS {
        headers.remove(h);
    }
    let sampled = sc.is_sampled();
    let put = |headers: &mut HeaderMap, name: HeaderName, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    put(
        headers,
        TRACEPARENT,
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            u8::from(sampled)
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        put(headers, TRACESTATE, state);
    }
    if !(incoming.b3_single || incoming.b3_multi) {
        return;
    }
    let trace = sc.trace_id().to_string();
    let trace = if incoming.b3_short {
        trace[16..].to_owned()
    } else {
        trace
    };
    let flag = if sampled { "1" } else { "0" };
    if incoming.b3_single {
        let parent = parent.map(|p| format!("-{p}")).unwrap_or_default();
        put(
            headers,
            B3,
            format!("{trace}-{}-{flag}{parent}", sc.span_id()),
        );
    }
    if incoming.b3_multi {
        put(headers, B3_TRACE_ID, trace);
        put(headers, B3_SPAN_ID, sc.span_id().to_string());
        put(headers, B3_SAMPLED, flag.to_owned());
        if let Some(p) = parent {
            put(headers, B3_PARENT_SPAN_ID, p.to_string());
        }
    }
}

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
    let reason = header(h, &crate::error::SINEW_ERROR);
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
pub fn end(hop: Option<Hop>, outcome: &crate::access::Outcome) {
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
    if outcome.end != "complete" {
        span.set_attribute(KeyValue::new("sinew.end", outcome.end));
        if outcome.end == "failed" {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ctx(i: &Incoming) -> SpanContext {
        i.cx.span().span_context().clone()
    }

    #[test]
    fn reads_w3c_first_then_b3_single_then_multi() {
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let i = extract(&headers(&[
            ("traceparent", w3c),
            ("tracestate", "vendor=x"),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        ]));
        let sc = ctx(&i);
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert!(i.b3_single, "B3 is sent on as well");

        let i = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        let sc = ctx(&i);
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(sc.is_sampled());
        assert_eq!(i.cx.get::<B3Decision>(), Some(&B3Decision::Sample));

        let i = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        let sc = ctx(&i);
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000463ac35c9f6413ad"
        );
        assert!(i.b3_multi && i.b3_short && !sc.is_sampled());
        assert_eq!(i.cx.get::<B3Decision>(), Some(&B3Decision::Deferred));

        let i = extract(&headers(&[("b3", "0")]));
        assert!(!ctx(&i).is_valid());
        assert_eq!(i.cx.get::<B3Decision>(), Some(&B3Decision::Deny));

        let i = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]));
        assert!(ctx(&i).is_sampled(), "debug implies sampled");

        for bad in [
            &[("traceparent", "00-zz-00f067aa0ba902b7-01")][..],
            &[("b3", "nope")],
            &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-0000000000000000-1")],
            &[("x-b3-traceid", "463ac35c9f6413ad")],
        ] {
            let i = extract(&headers(bad));
            assert!(!ctx(&i).is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn writes_w3c_always_and_b3_in_the_forms_it_came_in() {
        let sc = SpanContext::new(
            TraceId::from(0x463ac35c9f6413ad_u128),
            SpanId::from(0x1111_2222_3333_4444),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let parent = Some(SpanId::from(0xa2fb4a1d1a96d312));
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
            ("x-b3-parentspanid", "0000000000000abc"),
            ("tracestate", "stale=1"),
        ]);
        let incoming = extract(&h);
        inject(&mut h, &sc, parent, &incoming);
        assert_eq!(
            header(&h, &TRACEPARENT),
            Some("00-0000000000000000463ac35c9f6413ad-1111222233334444-01")
        );
        assert_eq!(header(&h, &TRACESTATE), None);
        assert_eq!(header(&h, &B3_TRACE_ID), Some("463ac35c9f6413ad"));
        assert_eq!(header(&h, &B3_SPAN_ID), Some("1111222233334444"));
        assert_eq!(header(&h, &B3_PARENT_SPAN_ID), Some("a2fb4a1d1a96d312"));
        assert_eq!(header(&h, &B3_SAMPLED), Some("1"));
        assert_eq!(header(&h, &B3), None);

        let mut h = headers(&[("b3", "0")]);
        let incoming = extract(&h);
        let unsampled = SpanContext::new(
            TraceId::from(7_u128),
            SpanId::from(9),
            TraceFlags::default(),
            false,
            TraceState::default(),
        );
        inject(&mut h, &unsampled, None, &incoming);
        assert_eq!(
            header(&h, &B3),
            Some("00000000000000000000000000000007-0000000000000009-0")
        );
        assert!(header(&h, &TRACEPARENT).is_some_and(|v| v.ends_with("-00")));

        let mut h = HeaderMap::new();
        inject(&mut h, &sc, None, &extract(&HeaderMap::new()));
        assert_eq!(h.len(), 1, "no B3 for a caller that sent none: {h:?}");
    }

    fn decide(s: &MeshSampler, cx: &Context, trace: u128) -> SamplingDecision {
        s.should_sample(
            Some(cx),
            TraceId::from(trace),
            "x",
            &SpanKind::Server,
            &[],
            &[],
        )
        .decision
    }

    #[test]
    fn sampling_keeps_the_callers_decision_and_records_the_rest_for_errors() {
        let remote = |sampled: bool| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(5_u128),
                SpanId::from(6),
                if sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            ))
        };
        let none = MeshSampler {
            ratio: 0.0,
            errors: false,
        };
        let all = MeshSampler {
            ratio: 1.0,
            errors: false,
        };
        let errors = MeshSampler {
            ratio: 0.0,
            errors: true,
        };
        use SamplingDecision::*;
        assert_eq!(decide(&none, &remote(true), 5), RecordAndSample);
        assert_eq!(decide(&all, &remote(false), 5), Drop);
        assert_eq!(decide(&errors, &remote(false), 5), RecordOnly);
        assert_eq!(decide(&none, &Context::new(), 5), Drop);
        assert_eq!(decide(&all, &Context::new(), 5), RecordAndSample);
        assert_eq!(decide(&errors, &Context::new(), 5), RecordOnly);
        let deny = Context::new().with_value(B3Decision::Deny);
        assert_eq!(decide(&all, &deny, 5), Drop);
        let deferred = remote(false).with_value(B3Decision::Deferred);
        assert_eq!(decide(&all, &deferred, 5), RecordAndSample);
        // A ratio in between splits new traces by their id, the same way at every hop.
        let half = MeshSampler {
            ratio: 0.5,
            errors: false,
        };
        let sampled = (0..1000_u128)
            .filter(|i| {
                decide(
                    &half,
                    &Context::new(),
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                ) == RecordAndSample
            })
            .count();
        assert!((400..600).contains(&sampled), "{sampled}");
    }
}
