//! The `MeshConfig` document's tracing settings.

use crate::error::ConfigErrors;
use crate::resource::OtlpProtocol;
use crate::set::{Resources, key};

impl Resources {
    pub(super) fn validate_tracing(&self, errors: &mut ConfigErrors) {
        let Some((m, t)) = self
            .mesh
            .as_ref()
            .and_then(|m| m.spec.tracing.as_ref().map(|t| (m, t)))
        else {
            return;
        };
        let k = key(&m.metadata);
        let mut c = self.checker(errors, "MeshConfig", &k);
        // The URL was parsed when the document was read; whether it may have a path
        // depends on the protocol.
        if t.protocol == OtlpProtocol::Grpc && !t.endpoint.path().is_empty() {
            c.fail(
                "spec.tracing.endpoint",
                format!(
                    "{:?}: a gRPC endpoint has no path (the service is always opentelemetry.proto.collector.trace.v1.TraceService)",
                    t.endpoint.as_str()
                ),
            );
        }
        if let Some(r) = t.sampling_ratio
            && !(0.0..=1.0).contains(&r)
        {
            c.fail(
                "spec.tracing.samplingRatio",
                format!("{r} is not a share: use 0 (none) to 1 (every trace)"),
            );
        }
    }
}
