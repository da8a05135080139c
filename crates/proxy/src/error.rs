//! Proxy-made errors: each knows its status, its `sinew-error` reason, its side
//! (who failed: the caller, the endpoint, or the proxy itself) and whether another
//! attempt may help, as pingora's `Error` does (`ErrorSource`, `RetryType`).
//!
//! The reasons are a closed set ([`Reason`]) whose strings are a stable interface:
//! callers read them in `sinew-error`, dashboards in the `reason` metric label.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::RespBody;
pub use crate::types::SINEW_ERROR;

/// An error value kept as a source (a TLS library's error, a body's error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who failed, as pingora's `ErrorSource`: decides whose fault a status is and
/// where to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller: a malformed or refused request, or one for nothing known.
    Downstream,
    /// The endpoint or its peer sidecar: could not be reached, or broke off.
    Upstream,
    /// The proxy itself: its configuration or state (shutting down, no keys).
    Internal,
}

impl Side {
    /// As logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

/// The short, stable reason for an error the proxy made or counted: in
/// `sinew-error`, in the `reason` label of the error metric, in access logs and
/// taps. The strings ([`Reason::as_str`]) never change; new reasons may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// `malformed-request`
    MalformedRequest,
    /// `headers-too-large`
    HeadersTooLarge,
    /// `body-too-large`
    BodyTooLarge,
    /// `malformed-request-body`
    MalformedRequestBody,
    /// `unknown-service`
    UnknownService,
    /// `no-route`
    NoRoute,
    /// `no-endpoints`
    NoEndpoints,
    /// `port-not-allowed`
    PortNotAllowed,
    /// `connect-failed`
    ConnectFailed,
    /// `connect-timeout`
    ConnectTimeout,
    /// `tls-failed`: a TLS handshake failed (with an endpoint, or a caller's at the
    /// inbound).
    TlsFailed,
    /// `upstream-failed`
    UpstreamFailed,
    /// `request-timeout`
    RequestTimeout,
    /// `shutting-down`
    ShuttingDown,
    /// `overflow`
    Overflow,
    /// `rate-limited`
    RateLimited,
    /// A refusal by authentication or authorization: its own stable reason
    /// (`forbidden`, `jwt-expired`, `jwks-unavailable`, ...; see
    /// [`crate::policy::PolicyError::reason`]).
    Policy(&'static str),
    /// `fault-injected` (metric only): a route's fault filter answered.
    FaultInjected,
    /// `resent-unreached` (metric only): a request no endpoint saw went elsewhere.
    ResentUnreached,
    /// `retry-budget-exhausted` (metric only): a retry the budget refused.
    RetryBudgetExhausted,
    /// `egress-refused` (metric only): a captured connection outside the mesh
    /// under `REGISTRY_ONLY`.
    EgressRefused,
    /// `passthrough-failed` (metric only): a connection outside the mesh failed.
    PassthroughFailed,
    /// `plaintext-refused` (metric only): plaintext where mTLS is required.
    PlaintextRefused,
    /// `not-mesh-tls` (metric only): TLS without the mesh's ALPN.
    NotMeshTls,
    /// `foreign-trust-domain` (metric only): a peer of another trust domain.
    ForeignTrustDomain,
}

impl Reason {
    /// The stable string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedRequest => "malformed-request",
            Reason::HeadersTooLarge => "headers-too-large",
            Reason::BodyTooLarge => "body-too-large",
            Reason::MalformedRequestBody => "malformed-request-body",
            Reason::UnknownService => "unknown-service",
            Reason::NoRoute => "no-route",
            Reason::NoEndpoints => "no-endpoints",
            Reason::PortNotAllowed => "port-not-allowed",
            Reason::ConnectFailed => "connect-failed",
            Reason::ConnectTimeout => "connect-timeout",
            Reason::TlsFailed => "tls-failed",
            Reason::UpstreamFailed => "upstream-failed",
            Reason::RequestTimeout => "request-timeout",
            Reason::ShuttingDown => "shutting-down",
            Reason::Overflow => "overflow",
            Reason::RateLimited => "rate-limited",
            Reason::Policy(r) => r,
            Reason::FaultInjected => "fault-injected",
            Reason::ResentUnreached => "resent-unreached",
            Reason::RetryBudgetExhausted => "retry-budget-exhausted",
            Reason::EgressRefused => "egress-refused",
            Reason::PassthroughFailed => "passthrough-failed",
            Reason::PlaintextRefused => "plaintext-refused",
            Reason::NotMeshTls => "not-mesh-tls",
            Reason::ForeignTrustDomain => "foreign-trust-domain",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    #[error("the request body could not be read: {detail}")]
    RequestBody {
        /// What went wrong, with its causes.
        detail: String,
        /// The body's error, when there was one (not for a deadline).
        #[source]
        source: Option<BoxError>,
    },
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
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        /// Peer address.
        addr: SocketAddr,
        /// Why: the TLS library's error (a `rustls::Error` for a refused
        /// certificate), an I/O error, or the proxy's own check (ALPN).
        source: BoxError,
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
    /// A TLS failure with `addr`, keeping the TLS library's error as the source:
    /// `tokio-rustls` wraps a `rustls::Error` in an `io::Error`, whose text is the
    /// inner error's, so the inner error is kept when there is one.
    pub fn tls(addr: SocketAddr, error: std::io::Error) -> ProxyError {
        let source: BoxError = match error.get_ref() {
            Some(_) => error
                .into_inner()
                .unwrap_or_else(|| BoxError::from("TLS failed")),
            None => Box::new(error),
        };
        ProxyError::Tls { addr, source }
    }

    /// A request body that broke while it was read or forwarded, keeping its error.
    pub fn request_body(source: BoxError) -> ProxyError {
        ProxyError::RequestBody {
            detail: sinew_api::channel::error_chain(source.as_ref()),
            source: Some(source),
        }
    }

    /// Who failed.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::Malformed(_)
            | ProxyError::HeadersTooLarge(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::RequestBody { .. }
            | ProxyError::UnknownService(_)
            | ProxyError::NoRoute
            | ProxyError::PortNotAllowed(_)
            | ProxyError::RateLimited { .. } => Side::Downstream,
            ProxyError::NoEndpoints(_)
            | ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::Tls { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout(_)
            | ProxyError::Overflow(_) => Side::Upstream,
            ProxyError::ShuttingDown => Side::Internal,
            // No verifier with keys to check the token against: the proxy's own
            // state, whatever the caller sent.
            ProxyError::Policy(p) if p.reason == "jwks-unavailable" => Side::Internal,
            ProxyError::Policy(_) => Side::Downstream,
        }
    }

    /// Whether another attempt (on this endpoint or another) may succeed where this
    /// one failed, so a route's retry policy may try again: a connect refused or
    /// timed out, a failed TLS handshake with the endpoint, a connection the
    /// endpoint broke, a try that timed out. A request the caller got wrong, or
    /// that the proxy refused (no route, forbidden, rate limited, a full circuit
    /// breaker), fails the same way every time.
    pub fn retryable(&self) -> bool {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::Tls { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout(_) => true,
            ProxyError::Malformed(_)
            | ProxyError::HeadersTooLarge(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::RequestBody { .. }
            | ProxyError::UnknownService(_)
            | ProxyError::NoRoute
            | ProxyError::NoEndpoints(_)
            | ProxyError::PortNotAllowed(_)
            | ProxyError::ShuttingDown
            | ProxyError::RateLimited { .. }
            | ProxyError::Overflow(_)
            | ProxyError::Policy(_) => false,
        }
    }

    /// Whether the endpoint refused the connection (nothing listens there): outlier
    /// detection ejects such an endpoint sooner than one that failed otherwise.
    pub fn connection_refused(&self) -> bool {
        matches!(self, ProxyError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    /// The status a client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Malformed(_) | ProxyError::RequestBody { .. } => StatusCode::BAD_REQUEST,
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
    pub fn reason(&self) -> Reason {
        match self {
            ProxyError::Malformed(_) => Reason::MalformedRequest,
            ProxyError::HeadersTooLarge(_) => Reason::HeadersTooLarge,
            ProxyError::BodyTooLarge(_) => Reason::BodyTooLarge,
            ProxyError::RequestBody { .. } => Reason::MalformedRequestBody,
            ProxyError::UnknownService(_) => Reason::UnknownService,
            ProxyError::NoRoute => Reason::NoRoute,
            ProxyError::NoEndpoints(_) => Reason::NoEndpoints,
            ProxyError::PortNotAllowed(_) => Reason::PortNotAllowed,
            ProxyError::Connect { .. } => Reason::ConnectFailed,
            ProxyError::ConnectTimeout(_) => Reason::ConnectTimeout,
            ProxyError::Tls { .. } => Reason::TlsFailed,
            ProxyError::Upstream { .. } => Reason::UpstreamFailed,
            ProxyError::Timeout(_) => Reason::RequestTimeout,
            ProxyError::ShuttingDown => Reason::ShuttingDown,
            ProxyError::Overflow(_) => Reason::Overflow,
            ProxyError::RateLimited { .. } => Reason::RateLimited,
            ProxyError::Policy(p) => Reason::Policy(p.reason),
        }
    }

    /// The gRPC status code for gRPC callers.
    fn grpc_status(&self) -> &'static str {
        match self {
            ProxyError::Timeout(_) => "4", // DEADLINE_EXCEEDED
            ProxyError::Malformed(_) | ProxyError::RequestBody { .. } => "13", // INTERNAL
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
        HeaderValue::from_static(self.reason().as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    /// A real `hyper::Error`: a server connection fed bytes that are not HTTP.
    async fn hyper_error() -> hyper::Error {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(b"not http at all\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("write to an in-memory pipe: {e}"));
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(RespBody::empty()))
        });
        match hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service)
            .await
        {
            Ok(()) => panic!("garbage was served as an HTTP request"),
            Err(e) => e,
        }
    }

    fn policy(status: StatusCode, reason: &'static str) -> ProxyError {
        ProxyError::Policy(crate::policy::PolicyError {
            status,
            reason,
            detail: "test".into(),
            decision: None,
        })
    }

    /// The verdicts, one arm per variant and no wildcard: a new variant does not
    /// compile until it has its side, retry verdict, reason and status here, and the
    /// test fails until [`one_of_each`] has one.
    fn verdict(e: &ProxyError, seen: &mut [bool; 18]) -> (Side, bool, &'static str, u16) {
        use Side::*;
        let (i, v) = match e {
            ProxyError::Malformed(_) => (0, (Downstream, false, "malformed-request", 400)),
            ProxyError::HeadersTooLarge(_) => (1, (Downstream, false, "headers-too-large", 431)),
            ProxyError::BodyTooLarge(_) => (2, (Downstream, false, "body-too-large", 413)),
            ProxyError::RequestBody { .. } => {
                (3, (Downstream, false, "malformed-request-body", 400))
            }
            ProxyError::UnknownService(_) => (4, (Downstream, false, "unknown-service", 404)),
            ProxyError::NoRoute => (5, (Downstream, false, "no-route", 404)),
            ProxyError::NoEndpoints(_) => (6, (Upstream, false, "no-endpoints", 503)),
            ProxyError::PortNotAllowed(_) => (7, (Downstream, false, "port-not-allowed", 403)),
            ProxyError::Connect { .. } => (8, (Upstream, true, "connect-failed", 502)),
            ProxyError::ConnectTimeout(_) => (9, (Upstream, true, "connect-timeout", 502)),
            ProxyError::Tls { .. } => (10, (Upstream, true, "tls-failed", 502)),
            ProxyError::Upstream { .. } => (11, (Upstream, true, "upstream-failed", 502)),
            ProxyError::Timeout(_) => (12, (Upstream, true, "request-timeout", 504)),
            ProxyError::ShuttingDown => (13, (Internal, false, "shutting-down", 503)),
            ProxyError::RateLimited { .. } => (14, (Downstream, false, "rate-limited", 429)),
            ProxyError::Overflow(_) => (15, (Upstream, false, "overflow", 503)),
            ProxyError::Policy(p) if p.reason == "jwks-unavailable" => {
                (16, (Internal, false, "jwks-unavailable", 401))
            }
            ProxyError::Policy(_) => (17, (Downstream, false, "forbidden", 403)),
        };
        seen[i] = true;
        v
    }

    async fn one_of_each() -> Vec<ProxyError> {
        vec![
            ProxyError::Malformed("no authority"),
            ProxyError::HeadersTooLarge("100 headers".into()),
            ProxyError::BodyTooLarge(10),
            ProxyError::request_body(hyper_error().await.into()),
            ProxyError::UnknownService("catalog".into()),
            ProxyError::NoRoute,
            ProxyError::NoEndpoints("catalog".into()),
            ProxyError::PortNotAllowed(9),
            ProxyError::Connect {
                addr: addr(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            },
            ProxyError::ConnectTimeout(addr()),
            ProxyError::tls(addr(), std::io::ErrorKind::ConnectionReset.into()),
            ProxyError::Upstream {
                addr: addr(),
                source: hyper_error().await,
            },
            ProxyError::Timeout(Duration::from_secs(1)),
            ProxyError::ShuttingDown,
            ProxyError::RateLimited {
                name: "shop/limit/all".into(),
                retry_after: Duration::from_millis(10),
            },
            ProxyError::Overflow("maxConnectionsPerEndpoint"),
            policy(StatusCode::UNAUTHORIZED, "jwks-unavailable"),
            policy(StatusCode::FORBIDDEN, "forbidden"),
        ]
    }

    #[tokio::test]
    async fn every_error_has_its_side_retry_verdict_reason_and_status() {
        let mut seen = [false; 18];
        for e in one_of_each().await {
            let (side, retryable, reason, status) = verdict(&e, &mut seen);
            assert_eq!(e.side(), side, "{e}");
            assert_eq!(e.retryable(), retryable, "{e}");
            assert_eq!(e.reason().as_str(), reason, "{e}");
            assert_eq!(e.status().as_u16(), status, "{e}");
            // What the caller reads: the reason first in the body and in the header.
            let resp = e.to_response(false);
            let header = resp
                .headers()
                .get(SINEW_ERROR)
                .unwrap_or_else(|| panic!("{e}: no sinew-error"));
            assert!(
                header.as_bytes().starts_with(reason.as_bytes()),
                "{e}: {header:?}"
            );
        }
        let missing: Vec<usize> = (0..seen.len()).filter(|&i| !seen[i]).collect();
        assert!(
            missing.is_empty(),
            "no sample error for verdict arms {missing:?}"
        );
    }

    /// The reason strings are an interface (callers, dashboards, the docs): pinned,
    /// every one, with an exhaustive match so a new reason must be added here.
    #[test]
    fn reason_strings_are_stable() {
        let all = [
            (Reason::MalformedRequest, "malformed-request"),
            (Reason::HeadersTooLarge, "headers-too-large"),
            (Reason::BodyTooLarge, "body-too-large"),
            (Reason::MalformedRequestBody, "malformed-request-body"),
            (Reason::UnknownService, "unknown-service"),
            (Reason::NoRoute, "no-route"),
            (Reason::NoEndpoints, "no-endpoints"),
            (Reason::PortNotAllowed, "port-not-allowed"),
            (Reason::ConnectFailed, "connect-failed"),
            (Reason::ConnectTimeout, "connect-timeout"),
            (Reason::TlsFailed, "tls-failed"),
            (Reason::UpstreamFailed, "upstream-failed"),
            (Reason::RequestTimeout, "request-timeout"),
            (Reason::ShuttingDown, "shutting-down"),
            (Reason::Overflow, "overflow"),
            (Reason::RateLimited, "rate-limited"),
            (Reason::Policy("jwt-expired"), "jwt-expired"),
            (Reason::FaultInjected, "fault-injected"),
            (Reason::ResentUnreached, "resent-unreached"),
            (Reason::RetryBudgetExhausted, "retry-budget-exhausted"),
            (Reason::EgressRefused, "egress-refused"),
            (Reason::PassthroughFailed, "passthrough-failed"),
            (Reason::PlaintextRefused, "plaintext-refused"),
            (Reason::NotMeshTls, "not-mesh-tls"),
            (Reason::ForeignTrustDomain, "foreign-trust-domain"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (reason, text) in all {
            // Exhaustive: a new variant fails to compile until it is listed above.
            match reason {
                Reason::MalformedRequest
                | Reason::HeadersTooLarge
                | Reason::BodyTooLarge
                | Reason::MalformedRequestBody
                | Reason::UnknownService
                | Reason::NoRoute
                | Reason::NoEndpoints
                | Reason::PortNotAllowed
                | Reason::ConnectFailed
                | Reason::ConnectTimeout
                | Reason::TlsFailed
                | Reason::UpstreamFailed
                | Reason::RequestTimeout
                | Reason::ShuttingDown
                | Reason::Overflow
                | Reason::RateLimited
                | Reason::Policy(_)
                | Reason::FaultInjected
                | Reason::ResentUnreached
                | Reason::RetryBudgetExhausted
                | Reason::EgressRefused
                | Reason::PassthroughFailed
                | Reason::PlaintextRefused
                | Reason::NotMeshTls
                | Reason::ForeignTrustDomain => {}
            }
            assert_eq!(reason.as_str(), text);
            assert_eq!(reason.to_string(), text);
            assert!(seen.insert(text), "{text} twice");
        }
    }

    /// A refused certificate stays a `rustls::Error` behind the proxy's error, with
    /// the text it always had.
    #[test]
    fn a_tls_error_keeps_the_rustls_error_as_its_source() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As tokio-rustls reports a failed handshake.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error.clone());
        let flat = format!("TLS with {} failed: {io}", addr());
        let e = ProxyError::tls(addr(), io);
        assert_eq!(e.to_string(), flat);
        let source = e.source().unwrap_or_else(|| panic!("{e}: no source"));
        assert_eq!(
            source.downcast_ref::<rustls::Error>(),
            Some(&rustls_error),
            "{source:?}"
        );
        // An I/O failure during the handshake is kept as the I/O error.
        let e = ProxyError::tls(addr(), std::io::ErrorKind::ConnectionReset.into());
        let source = e.source().unwrap_or_else(|| panic!("{e}: no source"));
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionReset)
        );
    }

    /// A broken request body keeps the body's error, and its text has the causes.
    #[tokio::test]
    async fn a_request_body_error_keeps_its_source() {
        let e = ProxyError::request_body(hyper_error().await.into());
        let source = e.source().unwrap_or_else(|| panic!("{e}: no source"));
        assert!(
            source.downcast_ref::<hyper::Error>().is_some(),
            "{source:?}"
        );
        assert!(
            e.to_string()
                .starts_with("the request body could not be read: "),
            "{e}"
        );
    }
}
