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
        if let Err(e) = otlp_endpoint(&t.endpoint, t.protocol) {
            c.fail("spec.tracing.endpoint", e);
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

/// The collector URL spans are sent to, from `MeshConfig.spec.tracing.endpoint`:
/// plain `http://host[:port]` (default port 4317 for gRPC, 4318 for HTTP); an HTTP
/// endpoint without a path gets the standard `/v1/traces`. The reason otherwise.
pub(crate) fn otlp_endpoint(endpoint: &str, protocol: OtlpProtocol) -> Result<String, String> {
    let uri = endpoint
        .parse::<http::Uri>()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The exporter is built without TLS to keep the proxy lean: collectors are
        // reached over a node-local or loopback hop.
        Some("https") => {
            return Err(format!(
                "{endpoint:?}: https is not supported; send to a collector (or agent) reachable over http://"
            ));
        }
        _ => return Err(format!("{endpoint:?} is not an http:// URL")),
    }
    let host = match uri.host() {
        Some(h) if !h.is_empty() => h,
        _ => return Err(format!("{endpoint:?} names no host")),
    };
    if uri.query().is_some() {
        return Err(format!("{endpoint:?}: a query is not allowed"));
    }
    let path = uri.path().trim_end_matches('/');
    let (default_port, path) = match protocol {
        OtlpProtocol::Grpc if !path.is_empty() => {
            return Err(format!(
                "{endpoint:?}: a gRPC endpoint has no path (the service is always opentelemetry.proto.collector.trace.v1.TraceService)"
            ));
        }
        OtlpProtocol::Grpc => (4317, String::new()),
        OtlpProtocol::HttpProtobuf if path.is_empty() => (4318, "/v1/traces".to_owned()),
        OtlpProtocol::HttpProtobuf => (4318, path.to_owned()),
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(format!("http://{host}:{port}{path}"))
}
