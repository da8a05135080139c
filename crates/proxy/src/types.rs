//! The proxy's shared request and connection types, in one module every other one
//! may import: a connection's context ([`ConnCtx`]), which side handled a request
//! ([`Direction`]), what it was routed to ([`RequestMeta`]), how it ended ([`End`],
//! [`Outcome`]) and the head limits.
//!
//! Kept here, rather than next to their first user, so that the modules that make,
//! observe and finish requests (listeners, inbound, outbound, capture, access,
//! metrics, trace, ending) import these types instead of each other. The drain
//! has its own module, [`crate::drain`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::metrics::LastSeries;
use crate::state::Shared;

/// Which side of the proxy handled a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Mesh traffic to the local application.
    Inbound,
    /// Local application traffic to the mesh.
    Outbound,
}

impl Direction {
    /// `inbound` or `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What a request was routed to, for its metrics.
#[derive(Debug, Default, Clone)]
pub struct RequestMeta {
    /// The service (`name.namespace`).
    pub service: Option<Arc<str>>,
    /// The route (`namespace/name`).
    pub route: Option<Arc<str>>,
    /// The endpoint it went to (outbound).
    pub upstream: Option<std::net::SocketAddr>,
    /// That endpoint, for the identity its sidecar must present (outbound).
    pub endpoint: Option<std::sync::Arc<crate::balance::Endpoint>>,
}

impl RequestMeta {
    /// The callee's SPIFFE id when the request went over mesh mTLS (outbound): its
    /// endpoint has a sidecar that must present an identity, and this proxy holds a
    /// certificate, which is when the connection pool speaks TLS.
    pub fn mtls_peer(&self, shared: &Shared) -> Option<&str> {
        let ep = self.endpoint.as_ref()?;
        ep.config.sidecar?;
        let id = ep.config.identity.as_deref()?;
        shared.certs.is_ready().then_some(id)
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Sent in full.
    Complete,
    /// The upstream broke it off.
    Failed,
    /// Dropped unfinished: the client went away (or the connection closed) first.
    Aborted,
}

impl End {
    /// As logged: `complete`, `failed` or `aborted`.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Failed => "failed",
            End::Aborted => "aborted",
        }
    }
}

/// How a request ended, for its observers.
#[derive(Debug)]
pub struct Outcome {
    /// The response status.
    pub status: http::StatusCode,
    /// The gRPC status (trailers, else head).
    pub grpc_status: Option<HeaderValue>,
    /// `sinew-error` from the response head.
    pub error: Option<HeaderValue>,
    /// To the end of the response.
    pub duration: Duration,
    /// To the response head.
    pub head: Duration,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// How the response ended.
    pub end: End,
}

impl Outcome {
    /// A server error, a gRPC status other than OK, or a response broken off
    /// upstream.
    pub fn failed(&self) -> bool {
        self.status.is_server_error()
            || self.end == End::Failed
            || self
                .grpc_status
                .as_ref()
                .is_some_and(|v| v.as_bytes() != b"0")
    }
}

/// What a listener does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Mesh traffic to the local application.
    Inbound,
    /// A local binding to one service port.
    Upstream,
    /// The HTTP forward-proxy port.
    HttpProxy,
    /// Outbound TCP redirected by capture rules: routed by its original destination.
    OutboundCapture,
    /// Inbound TCP redirected by capture rules: mesh mTLS, or plaintext for the app.
    InboundCapture,
}

impl Role {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Role::Inbound => "inbound",
            Role::Upstream => "outbound",
            Role::HttpProxy => "http-proxy",
            Role::OutboundCapture => "outbound-capture",
            Role::InboundCapture => "inbound-capture",
        }
    }
}

/// Per-connection context, shared by the connection's requests.
#[derive(Debug)]
pub struct ConnCtx {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The listener's role.
    pub role: Role,
    /// The listener's configured address (its identity in the configuration).
    pub bind: SocketAddr,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's SPIFFE id, verified by mTLS (inbound only).
    pub peer_identity: Option<Arc<str>>,
    /// Where a captured connection was going before the capture rules redirected it.
    pub orig_dst: Option<SocketAddr>,
    /// For plaintext redirected by the inbound capture rules: the application port
    /// it was going to. Its requests go to that port alone (a plaintext caller's
    /// `sinew-dst-port` or `CONNECT` target is not trusted to choose another one).
    pub plaintext_port: Option<u16>,
    /// The metrics series this connection's last request was counted in.
    pub last_series: LastSeries,
    /// The authority its last request's Host header named.
    pub last_host: crate::http_util::LastHost,
}

impl ConnCtx {
    /// A connection `role`'s listener on `bind` accepted from `peer`: nothing else
    /// known about it yet (no peer identity, original destination or pinned port),
    /// and the per-connection memos empty. Callers that know more set those fields
    /// with struct update syntax.
    pub fn new(shared: Arc<Shared>, role: Role, bind: SocketAddr, peer: SocketAddr) -> ConnCtx {
        ConnCtx {
            shared,
            role,
            bind,
            peer,
            peer_identity: None,
            orig_dst: None,
            plaintext_port: None,
            last_series: Default::default(),
            last_host: Default::default(),
        }
    }
}

/// How large a message head may be. Defaults are Envoy's or more generous: 64 KiB
/// of request headers (Envoy: 60), 100 headers (Envoy: 100), and responses up to
/// 100 headers (Envoy: 100) and 256 KiB. Counts can be raised (flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Most bytes of request headers (names, values, and 32 bytes of overhead each,
    /// as HTTP/2 counts them); a larger request is answered 431 where it arrives.
    pub request_header_bytes: usize,
    /// Most request headers; more is answered 431 where it arrives.
    pub request_headers: usize,
    /// Most response headers accepted from an upstream.
    pub response_headers: usize,
    /// Most bytes of response headers accepted from an upstream.
    pub response_header_bytes: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            request_header_bytes: 64 * 1024,
            request_headers: 100,
            response_headers: 100,
            response_header_bytes: 256 * 1024,
        }
    }
}

/// The header count hyper parses into a stack array; a limit above it costs an
/// allocation per message, so it is only set when raised.
pub const HYPER_MAX_HEADERS: usize = 100;

/// Room, beyond a client's own headers, for what sidecars add on the mesh hop (the
/// destination port, trace context, deadlines, identity).
pub const MESH_HEADER_ROOM: usize = 8 * 1024;

/// The header naming why the proxy answered itself.
pub const SINEW_ERROR: http::HeaderName = http::HeaderName::from_static("sinew-error");

/// `grpc-status`, as a static name: looking a header up by string parses the name
/// on every request.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// `traceparent` (W3C trace context), as a static name.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
