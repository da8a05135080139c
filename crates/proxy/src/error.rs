//! Proxy-made errors: each knows its status, its `sinew-error` reason and its side.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::RespBody;

/// The header naming why the proxy answered itself.
pub const SINEW_ERROR: http::HeaderName = http::HeaderName::from_static("sinew-error");

/// Why the proxy could not forward a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request was malformed (downstream's fault).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The request's headers are over the listener's limits (431).
    #[error("request headers too large: {0}")]
    HeadersTooLarge(String),
    /// The request body is over the listener's limit (413).
    #[error("the request body is over this listener's limit of {0} bytes")]
    BodyTooLarge(u64),
    /// The request body broke while it was being forwarded (malformed chunked
    /// encoding, a client that reset): the client's fault, not the endpoint's.
    #[error("the request body could not be read: {0}")]
    RequestBody(String),
    /// No service is known by the requested name.
    #[error("no service named {0:?}")]
    UnknownService(String),
    /// The service port has routes, and none matched.
    #[error("no route matched")]
    NoRoute,
    /// The chosen backend has no endpoints.
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    /// The inbound refused a port the workload does not expose to the mesh.
    #[error("port {0} is not open to the mesh")]
    PortNotAllowed(u16),
    /// Could not open a connection to the endpoint.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// Endpoint address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    /// The mTLS handshake with the peer sidecar failed (untrusted, wrong identity...).
    #[error("TLS with {addr} failed: {detail}")]
    Tls {
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The upstream failed after the connection was open (reset, protocol error).
    #[error("upstream {addr} failed: {source}")]
    Upstream {
        /// Endpoint address.
        addr: SocketAddr,
        /// The HTTP error.
        source: hyper::Error,
    },
    /// The route's timeout passed before the response headers arrived.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The proxy is shutting down.
    #[error("proxy is shutting down")]
    ShuttingDown,
    /// A rate limit refused the request.
    #[error("rate limit {name} reached; retry in {retry_after:?}")]
    RateLimited {
        /// The limit (`namespace/policy/name`).
        name: String,
        /// When a token will be there.
        retry_after: Duration,
    },
    /// The circuit breaker refused the request (a limit was reached).
    #[error("circuit breaker: {0} reached")]
    Overflow(&'static str),
    /// Refused by authentication (401) or authorization (403) at the inbound.
    #[error("{0}")]
    Policy(crate::policy::PolicyError),
}

impl ProxyError {
    /// The status a client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Malformed(_) | ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UnknownService(_) | ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::PortNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::NoEndpoints(_) | ProxyError::ShuttingDown | ProxyError::Overflow(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::Tls { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Policy(p) => p.status,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The short, stable reason carried in `sinew-error` (and in metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Malformed(_) => "malformed-request",
            ProxyError::HeadersTooLarge(_) => "headers-too-large",
            ProxyError::BodyTooLarge(_) => "body-too-large",
            ProxyError::RequestBody(_) => "malformed-request-body",
            ProxyError::UnknownService(_) => "unknown-service",
            ProxyError::NoRoute => "no-route",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::PortNotAllowed(_) => "port-not-allowed",
            ProxyError::Connect { .. } => "connect-failed",
            ProxyError::ConnectTimeout(_) => "connect-timeout",
            ProxyError::Tls { .. } => "tls-failed",
            ProxyError::Upstream { .. } => "upstream-failed",
            ProxyError::Timeout(_) => "request-timeout",
            ProxyError::ShuttingDown => "shutting-down",
            ProxyError::Overflow(_) => "overflow",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::Policy(p) => p.reason,
        }
    }

    /// The gRPC status code for gRPC callers.
    fn grpc_status(&self) -> &'static str {
        match self {
            ProxyError::Timeout(_) => "4", // DEADLINE_EXCEEDED
            ProxyError::Malformed(_) | ProxyError::RequestBody(_) => "13", // INTERNAL
            ProxyError::HeadersTooLarge(_) | ProxyError::BodyTooLarge(_) => "8", // RESOURCE_EXHAUSTED
            ProxyError::PortNotAllowed(_) => "7", // PERMISSION_DENIED
            ProxyError::RateLimited { .. } => "8", // RESOURCE_EXHAUSTED
            ProxyError::Policy(p) if p.status == StatusCode::UNAUTHORIZED => "16", // UNAUTHENTICATED
            ProxyError::Policy(_) => "7", // PERMISSION_DENIED
            ProxyError::NoRoute | ProxyError::UnknownService(_) => "12", // UNIMPLEMENTED
            _ => "14",                    // UNAVAILABLE
        }
    }

    /// Builds the response: the status, `sinew-error: <reason>`, and a one-line body.
    /// A gRPC caller gets a trailers-only gRPC error instead, so its client library
    /// reports a gRPC status rather than a protocol error.
    pub fn to_response(&self, grpc: bool) -> Response<RespBody> {
        let line = format!("{}: {self}\n", self.reason());
        let mut resp = if grpc {
            let mut r = Response::new(RespBody::empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(line.trim_end()) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(RespBody::full(Bytes::from(line)));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        resp.headers_mut().insert(SINEW_ERROR, self.error_header());
        if let ProxyError::RateLimited { retry_after, .. } = self {
            // Whole seconds, rounded up (RFC 9110 retry-after).
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }

    /// `sinew-error`: the reason, and for an authorization refusal the rule that
    /// decided (`forbidden: shop/no-admin rule 0`).
    fn error_header(&self) -> HeaderValue {
        if let ProxyError::RateLimited { name, .. } = self
            && let Ok(v) = HeaderValue::from_str(&format!("rate-limited: {name}"))
        {
            return v;
        }
        if let ProxyError::Overflow(limit) = self
            && let Ok(v) = HeaderValue::from_str(&format!("overflow: {limit}"))
        {
            return v;
        }
        if let ProxyError::Policy(p) = self
            && let Some(d) = &p.decision
        {
            let what = match &d.by {
                sinew_model::authz::DecidedBy::Rule { policy, rule, .. } => {
                    format!("{policy} rule {rule}")
                }
                sinew_model::authz::DecidedBy::NoAllowMatch => "no ALLOW rule matched".to_owned(),
                sinew_model::authz::DecidedBy::Default(_) => "default deny".to_owned(),
            };
            if let Ok(v) = HeaderValue::from_str(&format!("{}: {what}", p.reason)) {
                return v;
            }
        }
        HeaderValue::from_static(self.reason())
    }
}
