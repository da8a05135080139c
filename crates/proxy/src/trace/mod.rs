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
//!
//! Modules: `propagation` reads and writes context headers, `sample` decides,
//! `export` ships ended spans, and `hooks` are what request handling calls.

mod export;
mod hooks;
mod propagation;
mod sample;

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use sinew_model::ProxyConfig;
use sinew_model::compile::TracingConfig;

pub use hooks::{Hop, end, head, note_inbound, note_outbound, note_service, start};

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
        let processor = export::processor(cfg)?;
        let res = opentelemetry_sdk::Resource::builder()
            .with_attributes(
                resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(*k, v.clone()))
                    .collect::<Vec<_>>(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(sample::MeshSampler {
                ratio: cfg.sampling_ratio,
                errors: cfg.always_sample_errors,
            })
            .with_span_processor(processor)
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
