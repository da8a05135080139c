//! Export: the OTLP exporter (gRPC, or HTTP through hyper-util's client), run as
//! tasks on the Tokio runtime, behind a batch processor that also lets failed,
//! unsampled spans through.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanContext, Status};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor};
use sinew_model::compile::TracingConfig;
use sinew_model::resource::OtlpProtocol;
use tokio::runtime::Handle;

/// How long one export may take (the OTLP default), retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The span processor for `cfg`: [`ExportErrors`] in front of the SDK's batch
/// processor, exporting over OTLP on the current Tokio runtime.
pub(super) fn processor(cfg: &TracingConfig) -> Result<ExportErrors<BatchSpanProcessor>, String> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    let rt = Handle::try_current().map_err(|_| "no Tokio runtime to export on".to_owned())?;
    // The gRPC channel spawns its worker where it is built.
    let _on_rt = rt.enter();
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match cfg.protocol {
        OtlpProtocol::Grpc => builder
            .with_tonic()
            .with_endpoint(cfg.endpoint.clone())
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
        OtlpProtocol::HttpProtobuf => builder
            .with_http()
            // hyper-util's pooled client (plain http://: the model refuses https for
            // a collector). Exports run on `rt` (see `OnRuntime`), where the client
            // spawns its connection tasks.
            .with_http_client(HyperClient::with_default_connector(EXPORT_TIMEOUT, None))
            .with_endpoint(cfg.endpoint.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
    }
    .map_err(|e| e.to_string())?;
    let batch =
        BatchSpanProcessor::builder(OnRuntime::new(exporter, rt.clone(), cfg.endpoint.clone()))
            .build();
    Ok(ExportErrors { next: batch })
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
pub(super) struct ExportErrors<P> {
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
