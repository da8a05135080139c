//! The compiled configuration's types: plain data a proxy runs from, serialisable for
//! the admin `/config` view.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue};
use serde::{Serialize, Serializer};

use crate::authz::InboundAuthz;
use crate::resource::*;
use crate::route::{RequestMatch, RouteTable};

/// Default DNS suffix accepted in logical names.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Everything one proxy needs, compiled.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// The proxy's name.
    pub name: String,
    /// The proxy's namespace: short names (`catalog`) resolve here.
    pub namespace: String,
    /// The inbound listener, if any.
    pub inbound: Option<InboundConfig>,
    /// Per-upstream local bindings.
    pub upstreams: Vec<UpstreamConfig>,
    /// The forward-proxy listener, if any.
    pub http_proxy: Option<SocketAddr>,
    /// DNS suffix accepted in logical names.
    pub cluster_domain: String,
    /// Every service, by key `name.namespace`.
    pub services: BTreeMap<String, Arc<ServiceConfig>>,
    /// The mesh's SPIFFE trust domain.
    pub trust_domain: String,
    /// The proxy's own identity: from its workload (`Proxy.spec.workload`, else the
    /// Workload named like the proxy). `None` when it serves no known workload.
    pub identity: Option<LocalIdentity>,
    /// Distributed tracing (`MeshConfig.spec.tracing`); `None`: off.
    pub tracing: Option<TracingConfig>,
    /// Access logs (`Proxy.spec.accessLog`); `None`: off.
    pub access_log: Option<crate::resource::AccessLogFormat>,
    /// The proxy's own request limits (`spec.limits`), for listeners without their
    /// own (the HTTP proxy port, capture).
    pub limits: LimitsSpec,
    /// Transparent capture (`Proxy.spec.capture`); `None`: off.
    pub capture: Option<CaptureConfig>,
    /// What captured traffic to unknown destinations does
    /// (`MeshConfig.spec.outboundTrafficPolicy`).
    pub egress: EgressMode,
    #[serde(skip)]
    pub(super) names: HashMap<String, String>,
}

/// Transparent capture, compiled from `Proxy.spec.capture`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureConfig {
    /// Redirected outbound TCP arrives here (loopback).
    pub outbound_port: u16,
    /// Redirected inbound TCP arrives here (every address).
    pub inbound_port: u16,
    /// Destination ports never inspected.
    pub opaque_ports: Vec<u16>,
    /// How long detection waits for the client's first bytes.
    #[serde(serialize_with = "ser_duration_ms")]
    pub detect_timeout: Duration,
    /// The DNS responder's UDP port on loopback, if any.
    pub dns_port: Option<u16>,
}

/// Default for `Proxy.spec.capture.detectTimeout`: long enough for a client that
/// speaks first to have sent its first bytes on any local connection, short enough
/// that a server-speaks-first protocol's greeting is not noticeably late.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(100);

fn ser_duration_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Distributed tracing, compiled from `MeshConfig.spec.tracing`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingConfig {
    /// The collector URL, complete (`http://host:port`, plus the path for HTTP);
    /// shown without user info or query.
    #[serde(serialize_with = "ser_redacted_uri")]
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// Share of new traces sampled (0 to 1); incoming decisions are kept.
    pub sampling_ratio: f64,
    /// Export failed requests' spans even when they were not sampled.
    pub always_sample_errors: bool,
}

/// Who a proxy is: the workload it serves and that workload's SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalIdentity {
    /// The workload's name (in `namespace`).
    pub workload: String,
    /// The workload's service (`spec.service`), if any.
    pub service: Option<String>,
    /// The namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub spiffe: String,
    /// The workload's zone, for locality preference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl LocalIdentity {
    /// The workload's service as `name.namespace` (the key of `ProxyConfig.services`).
    pub fn service_key(&self) -> Option<String> {
        self.service
            .as_ref()
            .map(|s| format!("{s}.{}", self.namespace))
    }
}

/// A workload's zone: label `topology.kubernetes.io/zone`, else `zone`.
pub fn zone_of(m: &Metadata) -> Option<String> {
    m.labels
        .get("topology.kubernetes.io/zone")
        .or_else(|| m.labels.get("zone"))
        .cloned()
}

/// The inbound listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// The application's address.
    pub app_address: IpAddr,
    /// Application ports mesh traffic may reach.
    pub ports: Vec<u16>,
    /// Whether plaintext is accepted besides mTLS: the override of the proxy's own
    /// service, else the mesh's mode, else `STRICT`.
    pub mtls: MtlsMode,
    /// Authorization: the default and the policies that apply here.
    pub authz: InboundAuthz,
    /// JWT rules that apply here (targeted `RequestAuthentication`s first, then the
    /// namespace-wide ones). Empty: tokens are not looked at.
    pub jwt: Vec<JwtRuleConfig>,
    /// Request limits of this listener (its own over the proxy's); unset fields:
    /// the sidecar's flags.
    pub limits: LimitsSpec,
}

/// How tokens of one issuer are verified at an inbound.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRuleConfig {
    /// `namespace/name` of the `RequestAuthentication`.
    pub policy: String,
    /// The exact `iss` claim.
    pub issuer: String,
    /// Accepted audiences; empty: `aud` is not checked.
    pub audiences: Vec<String>,
    /// Where the public keys come from.
    pub jwks: JwksSource,
    /// Where tokens are found (never empty).
    pub from_headers: Vec<TokenLocation>,
    /// Claims copied into request headers.
    pub forward_claims: Vec<ForwardClaim>,
    /// Keep the token's header for the application.
    pub forward_original_token: bool,
    /// Tolerance for `exp` and `nbf`.
    #[serde(serialize_with = "ser_secs")]
    pub clock_skew: Duration,
    /// Claims the token must carry.
    pub required_claims: Vec<RequiredClaim>,
}

/// A source of public keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum JwksSource {
    /// A local file, re-read when it changes.
    File {
        /// Its path.
        path: String,
    },
    /// An HTTP(S) URL, fetched in the background.
    #[serde(rename_all = "camelCase")]
    Uri {
        /// The URL, parsed when the document was read (shown without user info or
        /// query). Validation accepts only `https://`; the proxy fetches `http://`
        /// too, for its tests.
        #[serde(serialize_with = "ser_redacted_http_uri")]
        uri: http::Uri,
        /// PEM CA certificates to trust for HTTPS instead of the system's.
        ca_file: Option<String>,
        /// How often the keys are fetched again.
        #[serde(serialize_with = "ser_secs")]
        refresh: Duration,
    },
    /// Keys given inline (public keys only; checked by validation).
    Inline {
        /// The JWKS JSON.
        jwks: serde_json::Value,
    },
}

/// A header that may carry a token, and the text before the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenLocation {
    /// Header name.
    #[serde(serialize_with = "ser_name")]
    pub header: HeaderName,
    /// Prefix before the token (compared case-insensitively), e.g. `Bearer `.
    pub prefix: String,
}

/// A verified claim copied into a request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardClaim {
    /// The claim (a dotted path reaches nested claims).
    pub claim: String,
    /// The header.
    #[serde(serialize_with = "ser_name")]
    pub header: HeaderName,
}

fn ser_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn ser_name<S: Serializer>(n: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_str())
}

/// Shows a URL without what may be a credential: user info and query.
fn ser_redacted_http_uri<S: Serializer>(u: &http::Uri, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_uri(&u.to_string()))
}

/// Shows a URL without what may be a credential: user info and query.
fn ser_redacted_uri<S: Serializer>(u: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_uri(u))
}

fn redact_uri(u: &str) -> String {
    let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let path = path.split(['?', '#']).next().unwrap_or("");
    if scheme.is_empty() {
        format!("{authority}{path}")
    } else {
        format!("{scheme}://{authority}{path}")
    }
}

/// A local binding to one service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// Service key (`name.namespace`).
    pub service: String,
    /// Service port number.
    pub port: u16,
    /// Protocol spoken on the binding.
    pub protocol: Protocol,
    /// Request limits of this binding (its own over the proxy's).
    pub limits: LimitsSpec,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `name.namespace`, made once: requests label their metrics and logs with it.
    #[serde(skip)]
    pub key: Arc<str>,
    /// Balancing algorithm.
    pub load_balancer: LoadBalancer,
    /// Ports with their endpoints and routes.
    pub ports: Vec<PortConfig>,
    /// Circuit breaking and outlier detection.
    pub traffic: TrafficConfig,
    /// The service's first virtual IP (`spec.virtualIP`, else the first of
    /// `spec.virtualIPs`), if it has one.
    pub virtual_ip: Option<IpAddr>,
    /// All of the service's virtual IPs (a dual-stack service has one per family).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtual_ips: Vec<IpAddr>,
}

impl ServiceConfig {
    /// The port with this number.
    pub fn port(&self, number: u16) -> Option<&PortConfig> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// The port a request without an explicit port goes to: 80 if the service has
    /// it, else its first HTTP port.
    pub fn default_http_port(&self) -> Option<&PortConfig> {
        self.port(80)
            .filter(|p| p.protocol.is_http())
            .or_else(|| self.ports.iter().find(|p| p.protocol.is_http()))
    }
}

/// Compiled traffic policy of a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficConfig {
    /// Requests in flight to the service.
    pub max_requests: Option<u32>,
    /// Requests in flight per endpoint.
    pub max_requests_per_endpoint: Option<u32>,
    /// Connections per endpoint.
    pub max_connections_per_endpoint: Option<u32>,
    /// Requests that may wait for a connection per endpoint (0: none).
    pub max_pending_requests_per_endpoint: u32,
    /// Outlier detection, if on.
    pub outlier: Option<OutlierConfig>,
    /// Rate limits at the inbound of the service's workloads.
    pub rate_limits: Vec<RateLimitConfig>,
    /// Active health checks, if on.
    pub health_check: Option<HealthCheckConfig>,
    /// Sticky sessions by consistent hashing, if on.
    pub ring_hash: Option<HashKey>,
    /// Prefer the caller's zone.
    pub locality_preference: bool,
}

/// What a ring hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header (lower case).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The client's address.
    SourceIp,
}

/// A compiled health check.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckConfig {
    /// HTTP path (and query), parsed when the document was read; `None`: TCP
    /// connect.
    #[serde(serialize_with = "ser_path")]
    pub path: Option<PathAndQuery>,
    /// Milliseconds between checks.
    pub interval_ms: u64,
    /// Milliseconds a check may take.
    pub timeout_ms: u64,
    /// Failures in a row to mark unhealthy.
    pub unhealthy_threshold: u32,
    /// Passes in a row to mark healthy.
    pub healthy_threshold: u32,
}

/// What a compiled rate limit counts by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RateKey {
    /// A request header's value.
    Header(String),
    /// The caller's SPIFFE id.
    Identity,
}

/// A compiled rate limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    /// `namespace/policy/name`.
    pub name: String,
    /// Requests it applies to (empty: all).
    pub matches: Vec<RequestMatch>,
    /// What it counts by; `None`: one bucket for all.
    pub key: Option<RateKey>,
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Bucket size.
    pub burst: u32,
    /// Shared by all the service's proxies (the control plane leases shares).
    pub global: bool,
}

/// Compiled outlier detection.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierConfig {
    /// Failures in a row that eject.
    pub consecutive_failures: u32,
    /// Refused connections in a row that eject.
    pub consecutive_refusals: u32,
    /// Failure share (percent) that ejects, over the window.
    pub failure_percent: Option<u32>,
    /// Requests needed in the window.
    pub minimum_requests: u32,
    /// The window, in milliseconds.
    pub interval_ms: u64,
    /// First ejection time, in milliseconds (times the ejection count).
    pub base_ejection_ms: u64,
    /// Most endpoints ejected at once (percent).
    pub max_ejection_percent: u32,
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortConfig {
    /// Port name.
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Instances serving this port.
    pub endpoints: Vec<EndpointConfig>,
    /// Routing, in precedence order (empty for TCP ports).
    pub routes: RouteTable,
}

/// One instance of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConfig {
    /// `namespace/name` of the workload.
    pub workload: String,
    /// Application address.
    pub address: SocketAddr,
    /// The workload's sidecar inbound address, when it has one.
    pub sidecar: Option<SocketAddr>,
    /// The workload's zone (label `topology.kubernetes.io/zone`, else `zone`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The SPIFFE id the endpoint's sidecar must present (from the workload's service
    /// account).
    pub identity: Option<String>,
}

/// A compiled route rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleConfig {
    /// `namespace/name` of the route, or `default` for the implicit route.
    pub route: Arc<str>,
    /// Rule index in the route.
    pub rule: usize,
    /// Filters of the rule.
    pub filters: Filters,
    /// Weighted backends (never empty, never all zero).
    pub backends: Vec<BackendConfig>,
    /// Sum of backend weights.
    pub total_weight: u64,
    /// Time until response headers; `None` for no limit.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Option<Duration>,
    /// Time per backend attempt; `None` for no limit.
    #[serde(serialize_with = "ser_duration")]
    pub backend_timeout: Option<Duration>,
    /// Retries, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
}

/// Compiled retry settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// Retries after the first try.
    pub retries: u32,
    /// Retried HTTP statuses.
    pub codes: Vec<u16>,
    /// Retried gRPC status numbers.
    pub grpc_codes: Vec<u8>,
    /// First backoff (doubled per retry, full jitter).
    #[serde(serialize_with = "ser_duration_plain")]
    pub backoff: Duration,
    /// Retry non-idempotent methods too.
    pub non_idempotent: bool,
    /// Budget: retries per request over the window.
    pub budget_ratio: f64,
    /// Budget: retries always allowed per second.
    pub budget_min_per_second: u32,
    /// Hedging, if on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeConfig>,
}

/// When to hedge.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HedgeConfig {
    /// After a fixed delay (milliseconds).
    DelayMs(u64),
    /// After this percentile of the rule's recent latencies.
    Percentile(f64),
}

fn ser_duration_plain<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

/// A compiled mirror.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorConfig {
    /// Service key (`name.namespace`).
    pub service: String,
    /// Service port, if given (else the primary's port).
    pub port: Option<u16>,
    /// Share of requests copied, 0-100.
    pub percent: u32,
}

/// A compiled fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultConfig {
    /// Abort: (HTTP status, gRPC status number, percent).
    pub abort: Option<(Option<u16>, Option<u8>, f64)>,
    /// Delay: (how long in milliseconds, percent).
    pub delay: Option<(u64, f64)>,
}

impl RuleConfig {
    /// Picks a backend by weight, given a uniform random number in `0..total_weight`.
    pub fn pick_backend(&self, mut r: u64) -> &BackendConfig {
        for b in &self.backends {
            let w = u64::from(b.weight);
            if r < w {
                return b;
            }
            r -= w;
        }
        // Unreachable for r < total_weight; fall back to the heaviest backend.
        self.backends
            .iter()
            .max_by_key(|b| b.weight)
            .unwrap_or(&self.backends[0])
    }
}

fn ser_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        None => s.serialize_none(),
    }
}

/// A weighted backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfig {
    /// Service key (`name.namespace`).
    pub service: String,
    /// Service port number.
    pub port: u16,
    /// Weight.
    pub weight: u32,
    /// Filters for this backend only.
    pub filters: Filters,
}

/// Compiled filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Filters {
    /// Request header edits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEdits>,
    /// Response header edits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEdits>,
    /// URL rewrite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Request mirror.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorConfig>,
    /// Fault injection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultConfig>,
}

impl Filters {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_none()
            && self.response_headers.is_none()
            && self.rewrite.is_none()
            && self.mirror.is_none()
            && self.fault.is_none()
    }
}

/// Header edits: set, then add, then remove. Serialized (for `/config`) with the
/// values redacted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HeaderEdits {
    /// Replace.
    #[serde(serialize_with = "ser_pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append.
    #[serde(serialize_with = "ser_pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Delete.
    #[serde(serialize_with = "ser_names")]
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// What `/config` shows in place of a header value.
pub const REDACTED: &str = "<redacted>";

/// Header edits as `/config` shows them: names, never values (a route may inject
/// `authorization: Bearer …`, and `/config` is no place for a credential).
fn ser_pairs<S: Serializer>(v: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|(n, _)| (n.as_str(), REDACTED)))
}

fn ser_names<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(HeaderName::as_str))
}

fn ser_path<S: Serializer>(p: &Option<PathAndQuery>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_some(p.as_str()),
        None => s.serialize_none(),
    }
}

fn ser_authority<S: Serializer>(a: &Option<Authority>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_some(a.as_str()),
        None => s.serialize_none(),
    }
}

/// A URL rewrite.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// New authority (parsed when the document was read).
    #[serde(serialize_with = "ser_authority")]
    pub hostname: Option<Authority>,
    /// New path.
    pub path: Option<PathRewrite>,
}

/// A compiled path rewrite.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathRewrite {
    /// Replace the whole path.
    ReplaceFullPath(String),
    /// Replace the matched prefix.
    ReplacePrefixMatch(String),
}

impl PathRewrite {
    /// The rewritten path. `prefix_len` is the length of the matched prefix (for
    /// `ReplacePrefixMatch`; ignored otherwise).
    pub fn apply(&self, path: &str, prefix_len: Option<usize>) -> String {
        match self {
            PathRewrite::ReplaceFullPath(p) => p.clone(),
            PathRewrite::ReplacePrefixMatch(replacement) => {
                let rest = path.get(prefix_len.unwrap_or(0)..).unwrap_or("");
                let base = replacement.trim_end_matches('/');
                let joined = match (base.is_empty(), rest.is_empty()) {
                    (true, true) => "/".to_owned(),
                    (true, false) => rest.to_owned(),
                    (false, true) => {
                        if replacement.ends_with('/') {
                            format!("{base}/")
                        } else {
                            base.to_owned()
                        }
                    }
                    (false, false) => format!("{base}{rest}"),
                };
                if joined.starts_with('/') {
                    joined
                } else {
                    format!("/{joined}")
                }
            }
        }
    }
}

impl ProxyConfig {
    /// Resolves a logical host (`catalog`, `catalog.shop`, `catalog.shop.svc`,
    /// `catalog.shop.svc.cluster.local`), case-insensitively, to a service.
    pub fn resolve_service(&self, host: &str) -> Option<&Arc<ServiceConfig>> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let key = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.names.get(&host.to_ascii_lowercase())
        } else {
            self.names.get(host)
        }?;
        self.services.get(key)
    }

    /// The service by key `name.namespace`.
    pub fn service(&self, key: &str) -> Option<&Arc<ServiceConfig>> {
        self.services.get(key)
    }
}
