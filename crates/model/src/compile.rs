//! Compiling validated resources into the configuration one proxy runs from.
//!
//! The result is plain data, serialisable for the admin `/config` view. Regular
//! expressions, header names and durations are parsed here, once, so the request path
//! never parses configuration.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::{Serialize, Serializer};

use crate::authz::{AuthzPolicy, AuthzRule, DEFAULT_TRUST_DOMAIN, DefaultSource, InboundAuthz};
use crate::duration;
use crate::error::{ConfigError, ConfigErrors};
use crate::load::resolve_port;
use crate::resource::*;
use crate::route::{
    PathMatcher, Pattern, RequestMatch, RouteEntry, RouteOrder, RouteTable, ValueMatcher,
};

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
    names: HashMap<String, String>,
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
        /// The URL (shown without user info or query).
        #[serde(serialize_with = "ser_redacted_uri")]
        uri: String,
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
    /// HTTP path; `None`: TCP connect.
    pub path: Option<String>,
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

/// A URL rewrite.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// New authority.
    pub hostname: Option<String>,
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

/// Compiles the configuration for the proxy named `proxy` (`namespace/name` or just a
/// name when unique). With `None`, the set must hold exactly one `Proxy` document.
pub fn compile_proxy(res: &Resources, proxy: Option<&str>) -> Result<ProxyConfig, ConfigErrors> {
    let chosen: Vec<&Object<ProxySpec>> = res
        .proxies
        .iter()
        .filter(|((ns, name), _)| match proxy {
            None => true,
            Some(p) => match p.split_once('/') {
                Some((pns, pname)) => pns == ns && pname == name,
                None => p == name,
            },
        })
        .map(|(_, v)| v)
        .collect();
    let p = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(ConfigError::new(match proxy {
                Some(p) => format!("no Proxy document named {p:?}"),
                None => "no Proxy document: add one (kind: Proxy) describing the listeners".into(),
            })
            .into());
        }
        _ => {
            return Err(ConfigError::new(
                "several Proxy documents: choose one with --name namespace/name",
            )
            .into());
        }
    };
    let ns = p.metadata.ns().to_owned();
    let mut errors = ConfigErrors::default();
    let mesh = res.mesh.as_ref().map(|m| &m.spec);
    let cluster_domain = p
        .spec
        .cluster_domain
        .clone()
        .or_else(|| mesh.and_then(|m| m.cluster_domain.clone()))
        .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.to_owned());

    let trust_domain = mesh
        .and_then(|m| m.trust_domain.clone())
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());

    let mut services = BTreeMap::new();
    let mut names = HashMap::new();
    for ((sns, sname), svc) in &res.services {
        let cfg = compile_service(res, (sns, sname), svc, &trust_domain, &mut errors);
        let key = cfg.key.to_string();
        for alias in [
            key.clone(),
            format!("{key}.svc"),
            format!("{key}.svc.{cluster_domain}"),
        ] {
            names.insert(alias, key.clone());
        }
        if *sns == ns {
            names.insert(sname.clone(), key.clone());
        }
        services.insert(key, Arc::new(cfg));
    }

    let workload = p.spec.workload.as_ref().unwrap_or(&p.metadata.name).clone();
    let workload = res.workloads.get(&(ns.clone(), workload));
    let identity = workload.map(|w| LocalIdentity {
        workload: w.metadata.name.clone(),
        service: w.spec.service.clone(),
        namespace: ns.clone(),
        service_account: w.spec.service_account().to_owned(),
        spiffe: crate::authz::spiffe_id(&trust_domain, &ns, w.spec.service_account()),
        zone: zone_of(&w.metadata),
    });
    let own_services = workload.map(|w| own_services(res, w)).unwrap_or_default();
    let proxy_limits = p.spec.limits.unwrap_or_default();
    let inbound = p.spec.inbound.as_ref().and_then(|i| {
        Some(InboundConfig {
            bind: i.bind.parse().ok()?,
            app_address: match &i.app_address {
                Some(a) => a.parse().ok()?,
                None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
            ports: i.ports.clone(),
            mtls: inbound_mtls(res, &ns, &own_services),
            authz: compile_authz(res, &ns, &own_services, &trust_domain),
            jwt: compile_jwt(res, &ns, &own_services),
            limits: i.limits.unwrap_or_default().or(proxy_limits),
        })
    });
    let mut upstreams = Vec::new();
    for u in &p.spec.outbound.upstreams {
        let (Ok(bind), Some(svc)) = (u.bind.parse(), res.find_service(&ns, &u.service)) else {
            continue;
        };
        let Ok(port) = resolve_port(svc, u.port.as_ref()) else {
            continue;
        };
        upstreams.push(UpstreamConfig {
            bind,
            service: format!("{}.{}", svc.metadata.name, svc.metadata.ns()),
            port: port.port,
            protocol: u.protocol.unwrap_or(port.protocol),
            limits: u.limits.unwrap_or_default().or(proxy_limits),
        });
    }
    let http_proxy = p
        .spec
        .outbound
        .http_proxy
        .as_ref()
        .and_then(|h| h.bind.parse().ok());
    let tracing = mesh.and_then(|m| m.tracing.as_ref()).and_then(|t| {
        Some(TracingConfig {
            endpoint: crate::load::otlp_endpoint(&t.endpoint, t.protocol).ok()?,
            protocol: t.protocol,
            sampling_ratio: t.sampling_ratio.unwrap_or(1.0),
            always_sample_errors: t.always_sample_errors.unwrap_or(true),
        })
    });
    errors.into_result(ProxyConfig {
        name: p.metadata.name.clone(),
        namespace: ns,
        inbound,
        upstreams,
        http_proxy,
        cluster_domain,
        services,
        trust_domain,
        identity,
        tracing,
        access_log: p.spec.access_log.as_ref().map(|a| a.format),
        limits: proxy_limits,
        capture: p.spec.capture.as_ref().map(|c| CaptureConfig {
            outbound_port: c.outbound_port,
            inbound_port: c.inbound_port,
            opaque_ports: c.opaque_ports.clone(),
            detect_timeout: c
                .detect_timeout
                .as_deref()
                .and_then(|d| duration::parse(d).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_DETECT_TIMEOUT),
            dns_port: c.dns_port,
        }),
        egress: mesh
            .and_then(|m| m.outbound_traffic_policy)
            .map(|p| p.mode)
            .unwrap_or_default(),
        names,
    })
}

/// The Services of the proxy's namespace its workload belongs to: the one it names,
/// then those whose selector matches its labels.
fn own_services(res: &Resources, w: &Object<WorkloadSpec>) -> Vec<String> {
    let ns = w.metadata.ns();
    let mut out: Vec<String> = w.spec.service.iter().cloned().collect();
    for ((sns, sname), svc) in &res.services {
        if sns == ns
            && !out.contains(sname)
            && svc
                .spec
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| w.metadata.labels.get(k) == Some(v)))
        {
            out.push(sname.clone());
        }
    }
    out
}

/// The inbound's mTLS mode: the own services' overrides (STRICT if any says so),
/// else the mesh's mode, else STRICT.
fn inbound_mtls(res: &Resources, ns: &str, own: &[String]) -> MtlsMode {
    let overrides: Vec<MtlsMode> = own
        .iter()
        .filter_map(|s| res.services.get(&(ns.to_owned(), s.clone())))
        .filter_map(|s| s.spec.mtls.map(|m| m.mode))
        .collect();
    if !overrides.is_empty() {
        return if overrides.contains(&MtlsMode::Strict) {
            MtlsMode::Strict
        } else {
            MtlsMode::Permissive
        };
    }
    res.mesh
        .as_ref()
        .and_then(|m| m.spec.mtls)
        .map(|m| m.mode)
        .unwrap_or_default()
}

/// True when a policy with this target applies to a proxy of `own` services.
fn applies(target: Option<&PolicyTargetRef>, own: &[String]) -> bool {
    target.is_none_or(|t| own.contains(&t.name))
}

fn compile_authz(res: &Resources, ns: &str, own: &[String], trust_domain: &str) -> InboundAuthz {
    let mut out = InboundAuthz {
        trust_domain: trust_domain.to_owned(),
        default_action: res
            .mesh
            .as_ref()
            .and_then(|m| m.spec.default_authorization)
            .unwrap_or_default(),
        default_source: DefaultSource::Mesh,
        deny: Vec::new(),
        allow: Vec::new(),
    };
    for ((pns, pname), p) in &res.authorization_policies {
        if pns != ns || !applies(p.spec.target_ref.as_ref(), own) {
            continue;
        }
        if p.spec.target_ref.is_none()
            && let Some(d) = p.spec.default_action
        {
            out.default_action = d;
            out.default_source = DefaultSource::Namespace;
        }
        if p.spec.rules.is_empty() {
            continue;
        }
        let compiled = AuthzPolicy {
            name: Arc::from(format!("{pns}/{pname}")),
            target: p.spec.target_ref.as_ref().map(|t| t.name.clone()),
            rules: p.spec.rules.iter().map(compile_authz_rule).collect(),
        };
        match p.spec.action {
            AuthorizationAction::Allow => out.allow.push(compiled),
            AuthorizationAction::Deny => out.deny.push(compiled),
        }
    }
    out
}

fn compile_authz_rule(r: &AuthorizationRule) -> AuthzRule {
    let from = r.from.clone().unwrap_or_default();
    let to = r.to.clone().unwrap_or_default();
    let norm = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|p| crate::authz::normalize_path(p).into_owned())
            .collect()
    };
    AuthzRule {
        principals: from.principals,
        principal_prefixes: from.principal_prefixes,
        namespaces: from.namespaces,
        request_principals: from.request_principals,
        ports: to.ports,
        paths: norm(&to.paths),
        path_prefixes: norm(&to.path_prefixes),
        methods: to
            .methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect(),
        headers: to
            .headers
            .iter()
            .filter_map(|h| {
                Some((
                    HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                    HeaderValue::from_str(&h.value).ok()?,
                ))
            })
            .collect(),
        when: r.when.clone(),
    }
}

/// Default time between two fetches of a JWKS URL.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Default tolerance for `exp` and `nbf`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

fn compile_jwt(res: &Resources, ns: &str, own: &[String]) -> Vec<JwtRuleConfig> {
    let mut targeted = Vec::new();
    let mut wide = Vec::new();
    for ((rns, rname), ra) in &res.request_authentications {
        if rns != ns || !applies(ra.spec.target_ref.as_ref(), own) {
            continue;
        }
        let list = if ra.spec.target_ref.is_some() {
            &mut targeted
        } else {
            &mut wide
        };
        for rule in &ra.spec.jwt_rules {
            let Some(jwks) = compile_jwks(&rule.jwks) else {
                continue; // refused by validation already
            };
            let from_headers = if rule.from_headers.is_empty() {
                vec![TokenLocation {
                    header: http::header::AUTHORIZATION,
                    prefix: "Bearer ".into(),
                }]
            } else {
                rule.from_headers
                    .iter()
                    .filter_map(|h| {
                        Some(TokenLocation {
                            header: HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                            prefix: h.prefix.clone(),
                        })
                    })
                    .collect()
            };
            list.push(JwtRuleConfig {
                policy: format!("{rns}/{rname}"),
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                jwks,
                from_headers,
                forward_claims: rule
                    .forward_claims
                    .iter()
                    .filter_map(|f| {
                        Some(ForwardClaim {
                            claim: f.claim.clone(),
                            header: HeaderName::from_bytes(f.header.as_bytes()).ok()?,
                        })
                    })
                    .collect(),
                forward_original_token: rule.forward_original_token,
                clock_skew: rule
                    .clock_skew
                    .as_deref()
                    .and_then(|s| duration::parse(s).ok())
                    .unwrap_or(DEFAULT_CLOCK_SKEW),
                required_claims: rule.required_claims.clone(),
            });
        }
    }
    targeted.extend(wide);
    targeted
}

fn compile_jwks(j: &JwksSpec) -> Option<JwksSource> {
    if let Some(path) = &j.file {
        return Some(JwksSource::File { path: path.clone() });
    }
    if let Some(uri) = &j.uri {
        return Some(JwksSource::Uri {
            uri: uri.clone(),
            ca_file: j.ca_file.clone(),
            refresh: j
                .refresh
                .as_deref()
                .and_then(|s| duration::parse(s).ok())
                .unwrap_or(DEFAULT_JWKS_REFRESH),
        });
    }
    let jwks = crate::authz::public_jwks(j.inline.as_deref()?).ok()?;
    Some(JwksSource::Inline { jwks })
}

fn compile_service(
    res: &Resources,
    (ns, name): (&str, &str),
    svc: &Object<ServiceSpec>,
    trust_domain: &str,
    errors: &mut ConfigErrors,
) -> ServiceConfig {
    let members: Vec<&Object<WorkloadSpec>> = res
        .workloads
        .iter()
        .filter(|((wns, _), w)| {
            wns == ns
                && (w.spec.service.as_deref() == Some(name)
                    || svc.spec.selector.as_ref().is_some_and(|sel| {
                        sel.iter().all(|(k, v)| w.metadata.labels.get(k) == Some(v))
                    }))
        })
        .map(|(_, w)| w)
        .collect();
    let ports = svc
        .spec
        .ports
        .iter()
        .map(|sp| {
            let endpoints = members
                .iter()
                .filter_map(|w| {
                    let ip: IpAddr = w.spec.address.parse().ok()?;
                    let port = w
                        .spec
                        .ports
                        .get(&sp.name)
                        .copied()
                        .or(sp.target_port)
                        .unwrap_or(sp.port);
                    Some(EndpointConfig {
                        workload: format!("{}/{}", w.metadata.ns(), w.metadata.name),
                        address: SocketAddr::new(ip, port),
                        sidecar: w.spec.sidecar.as_ref().map(|s| SocketAddr::new(ip, s.port)),
                        zone: zone_of(&w.metadata),
                        identity: Some(crate::authz::spiffe_id(
                            trust_domain,
                            w.metadata.ns(),
                            w.spec.service_account(),
                        )),
                    })
                })
                .collect();
            let routes = if sp.protocol.is_http() {
                compile_routes(res, (ns, name), sp, errors)
            } else {
                RouteTable::default()
            };
            PortConfig {
                name: sp.name.clone(),
                port: sp.port,
                protocol: sp.protocol,
                endpoints,
                routes,
            }
        })
        .collect();
    let mut virtual_ips: Vec<IpAddr> = Vec::new();
    for ip in svc.spec.virtual_ip_list().filter_map(|v| v.parse().ok()) {
        if !virtual_ips.contains(&ip) {
            virtual_ips.push(ip);
        }
    }
    ServiceConfig {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        key: format!("{name}.{ns}").into(),
        load_balancer: svc
            .spec
            .load_balancer
            .or_else(|| res.mesh.as_ref().and_then(|m| m.spec.default_load_balancer))
            .unwrap_or_default(),
        ports,
        traffic: traffic_config(res, ns, name),
        virtual_ip: virtual_ips.first().copied(),
        virtual_ips,
    }
}

fn traffic_config(res: &Resources, ns: &str, name: &str) -> TrafficConfig {
    let Some((policy_name, p)) = res
        .traffic_policies
        .iter()
        .find(|((pns, _), p)| pns == ns && p.spec.target_ref.name == name)
        .map(|((_, pname), p)| (pname, &p.spec))
    else {
        return TrafficConfig::default();
    };
    let ms = |s: &Option<String>, default: u64| {
        s.as_deref()
            .and_then(|s| duration::parse(s).ok())
            .map_or(default, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            })
    };
    let b = p.circuit_breaker.clone().unwrap_or_default();
    TrafficConfig {
        max_requests: b.max_requests,
        max_requests_per_endpoint: b.max_requests_per_endpoint,
        max_connections_per_endpoint: b.max_connections_per_endpoint,
        max_pending_requests_per_endpoint: b.max_pending_requests_per_endpoint.unwrap_or(0),
        outlier: p.outlier_detection.as_ref().map(|o| OutlierConfig {
            consecutive_failures: o.consecutive_failures.unwrap_or(5),
            consecutive_refusals: o.consecutive_refusals.unwrap_or(1),
            failure_percent: o.failure_percent,
            minimum_requests: o.minimum_requests.unwrap_or(20),
            interval_ms: ms(&o.interval, 10_000),
            base_ejection_ms: ms(&o.base_ejection_time, 30_000),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(50),
        }),
        ring_hash: p
            .ring_hash
            .as_ref()
            .and_then(|r| match (&r.header, &r.cookie, r.source_ip) {
                (Some(h), _, _) => Some(HashKey::Header(h.to_ascii_lowercase())),
                (None, Some(c), _) => Some(HashKey::Cookie(c.clone())),
                (None, None, true) => Some(HashKey::SourceIp),
                _ => None,
            }),
        locality_preference: p.locality_preference,
        health_check: p.health_check.as_ref().map(|h| HealthCheckConfig {
            path: h.path.clone(),
            interval_ms: ms(&h.interval, 5_000),
            timeout_ms: ms(&h.timeout, 1_000),
            unhealthy_threshold: h.unhealthy_threshold.unwrap_or(2),
            healthy_threshold: h.healthy_threshold.unwrap_or(1),
        }),
        rate_limits: p
            .rate_limits
            .iter()
            .map(|r| RateLimitConfig {
                name: format!("{ns}/{}/{}", policy_name, r.name),
                matches: r.matches.iter().filter_map(compile_match).collect(),
                key: r.key.as_ref().map(|k| match &k.header {
                    Some(h) => RateKey::Header(h.to_ascii_lowercase()),
                    None => RateKey::Identity,
                }),
                requests_per_second: r.requests_per_second,
                burst: r.burst_or_default(),
                global: r.global,
            })
            .collect(),
    }
}

/// The port a route's backend is reached on when the route serves its parent's port
/// `parent_port`: the backend's own `port`, else the parent's. Validation
/// ([`Resources::check`]) and compilation both ask this, so a control plane refuses
/// exactly the routes a proxy would.
pub(crate) fn backend_port(
    res: &Resources,
    route_ns: &str,
    b: &HttpBackendRef,
    parent_port: u16,
) -> Result<u16, String> {
    let bns = b.namespace.as_deref().unwrap_or(route_ns);
    let bport = b.port.unwrap_or(parent_port);
    let exists = res
        .services
        .get(&(bns.to_owned(), b.name.clone()))
        .is_some_and(|s| s.spec.ports.iter().any(|p| p.port == bport));
    match (exists, b.port) {
        (true, _) => Ok(bport),
        (false, Some(_)) => Err(format!("service {bns}/{} has no port {bport}", b.name)),
        (false, None) => Err(format!(
            "service {bns}/{} has no port {bport} (the port defaults to the parent's port {parent_port}; set backendRefs[].port)",
            b.name
        )),
    }
}

fn compile_routes(
    res: &Resources,
    (ns, name): (&str, &str),
    port: &ServicePort,
    errors: &mut ConfigErrors,
) -> RouteTable {
    let mut entries = Vec::new();
    for ((rns, rname), route) in &res.routes {
        let attached = route.spec.parent_refs.iter().any(|p| {
            p.name == name
                && p.namespace.as_deref().unwrap_or(rns) == ns
                && p.port.is_none_or(|n| n == port.port)
        });
        if !attached {
            continue;
        }
        // With the RoutePolicies that target it (retry budgets, hedging, faults).
        let route = crate::policy::effective_route(res, &(rns.clone(), rname.clone()), route);
        let label = format!("{rns}/{rname}");
        let mut fail = |field: String, reason: String| {
            let origin = res
                .origins
                .get(&("HTTPRoute".to_owned(), rns.clone(), rname.clone()));
            let mut e = ConfigError::new(reason)
                .field(field)
                .resource(format!("HTTPRoute {label}"));
            if let Some(o) = origin {
                e = e.at(o.file.clone(), Some(o.line));
            }
            errors.push(e);
        };
        for (ri, rule) in route.spec.rules.iter().enumerate() {
            let backends: Vec<BackendConfig> = if rule.backend_refs.is_empty() {
                vec![BackendConfig {
                    service: format!("{name}.{ns}"),
                    port: port.port,
                    weight: 1,
                    filters: Filters::default(),
                }]
            } else {
                let mut out = Vec::new();
                for (bi, b) in rule.backend_refs.iter().enumerate() {
                    let bns = b.namespace.as_deref().unwrap_or(rns);
                    let bport = match backend_port(res, rns, b, port.port) {
                        Ok(p) => p,
                        Err(reason) => {
                            fail(format!("spec.rules[{ri}].backendRefs[{bi}].port"), reason);
                            continue;
                        }
                    };
                    out.push(BackendConfig {
                        service: format!("{}.{bns}", b.name),
                        port: bport,
                        weight: b.weight,
                        filters: compile_filters(&b.filters, rns),
                    });
                }
                out
            };
            if backends.is_empty() || backends.iter().all(|b| b.weight == 0) {
                continue;
            }
            let timeouts = rule.timeouts.clone().unwrap_or_default();
            let dur = |s: &Option<String>| {
                s.as_deref()
                    .and_then(|s| duration::parse(s).ok())
                    .filter(|d| !d.is_zero())
            };
            let rc = Arc::new(RuleConfig {
                route: label.as_str().into(),
                rule: ri,
                filters: compile_filters(&rule.filters, rns),
                total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
                backends,
                request_timeout: dur(&timeouts.request),
                backend_timeout: dur(&timeouts.backend_request),
                retry: rule.retry.as_ref().map(|r| RetryConfig {
                    retries: r.attempts.unwrap_or(2),
                    codes: r.codes.clone().unwrap_or_else(|| vec![502, 503, 504]),
                    grpc_codes: r
                        .grpc_codes
                        .iter()
                        .filter_map(|g| crate::resource::grpc_code(g))
                        .collect(),
                    backoff: r
                        .backoff
                        .as_deref()
                        .and_then(|b| duration::parse(b).ok())
                        .unwrap_or(Duration::from_millis(25)),
                    non_idempotent: r.non_idempotent,
                    budget_ratio: r.budget.as_ref().and_then(|b| b.ratio).unwrap_or(0.2),
                    budget_min_per_second: r
                        .budget
                        .as_ref()
                        .and_then(|b| b.min_per_second)
                        .unwrap_or(10),
                    hedge: r
                        .hedge
                        .as_ref()
                        .and_then(|h| match (&h.delay, h.percentile) {
                            (Some(d), _) => duration::parse(d).ok().map(|d| {
                                HedgeConfig::DelayMs(
                                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                                )
                            }),
                            (None, Some(p)) => Some(HedgeConfig::Percentile(p)),
                            (None, None) => None,
                        }),
                }),
            });
            let default_match = [HttpRouteMatch::default()];
            let matches: &[HttpRouteMatch] = if rule.matches.is_empty() {
                &default_match
            } else {
                &rule.matches
            };
            for (mi, m) in matches.iter().enumerate() {
                let Some(matcher) = compile_match(m) else {
                    continue; // refused by validation already
                };
                entries.push((
                    RouteEntry {
                        matcher,
                        rule: rc.clone(),
                    },
                    RouteOrder {
                        created: route.metadata.creation_timestamp.clone(),
                        name: label.clone(),
                        rule: ri,
                        matcher: mi,
                    },
                ));
            }
        }
    }
    if entries.is_empty() {
        // No route attached: every request goes to the service itself.
        let rule = Arc::new(RuleConfig {
            route: "default".into(),
            rule: 0,
            filters: Filters::default(),
            backends: vec![BackendConfig {
                service: format!("{name}.{ns}"),
                port: port.port,
                weight: 1,
                filters: Filters::default(),
            }],
            total_weight: 1,
            request_timeout: None,
            backend_timeout: None,
            retry: None,
        });
        entries.push((
            RouteEntry {
                matcher: RequestMatch {
                    path: PathMatcher::prefix("/"),
                    method: None,
                    headers: vec![],
                    query_params: vec![],
                },
                rule,
            },
            RouteOrder {
                created: None,
                name: "default".into(),
                rule: 0,
                matcher: 0,
            },
        ));
    }
    RouteTable::new(entries)
}

fn compile_match(m: &HttpRouteMatch) -> Option<RequestMatch> {
    let path = match &m.path {
        None => PathMatcher::prefix("/"),
        Some(p) => match p.kind {
            PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
            PathMatchType::PathPrefix => PathMatcher::prefix(&p.value),
            PathMatchType::RegularExpression => {
                PathMatcher::RegularExpression(Pattern::new(&p.value).ok()?)
            }
        },
    };
    let value = |kind: StringMatchType, v: &str| -> Option<ValueMatcher> {
        Some(match kind {
            StringMatchType::Exact => ValueMatcher::Exact(v.to_owned()),
            StringMatchType::RegularExpression => {
                ValueMatcher::RegularExpression(Pattern::new(v).ok()?)
            }
        })
    };
    // Gateway API: of several entries with an equivalent name, only the first counts.
    let mut headers: Vec<(HeaderName, ValueMatcher)> = Vec::new();
    for h in &m.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if headers.iter().all(|(n, _)| *n != name) {
            headers.push((name, value(h.kind, &h.value)?));
        }
    }
    let mut query_params: Vec<(String, ValueMatcher)> = Vec::new();
    for q in &m.query_params {
        if query_params.iter().all(|(n, _)| *n != q.name) {
            query_params.push((q.name.clone(), value(q.kind, &q.value)?));
        }
    }
    let method = match &m.method {
        Some(s) => Some(Method::from_bytes(s.as_bytes()).ok()?),
        None => None,
    };
    Some(RequestMatch {
        path,
        method,
        headers,
        query_params,
    })
}

fn compile_edits(m: &HeaderModifier) -> HeaderEdits {
    let pairs = |v: &[HeaderValuePair]| {
        v.iter()
            .filter_map(|p| {
                Some((
                    HeaderName::from_bytes(p.name.as_bytes()).ok()?,
                    HeaderValue::from_str(&p.value).ok()?,
                ))
            })
            .collect()
    };
    HeaderEdits {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m
            .remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect(),
    }
}

fn compile_filters(filters: &[HttpRouteFilter], ns: &str) -> Filters {
    let mut out = Filters::default();
    for f in filters {
        if let Some(m) = &f.request_mirror {
            out.mirror = Some(MirrorConfig {
                service: format!(
                    "{}.{}",
                    m.backend_ref.name,
                    m.backend_ref.namespace.as_deref().unwrap_or(ns)
                ),
                port: m.backend_ref.port,
                percent: m.percent.unwrap_or(100).min(100),
            });
        }
        if let Some(fault) = &f.fault {
            out.fault = Some(FaultConfig {
                abort: fault.abort.as_ref().map(|a| {
                    (
                        a.http_status,
                        a.grpc_status
                            .as_deref()
                            .and_then(crate::resource::grpc_code),
                        a.percent,
                    )
                }),
                delay: fault.delay.as_ref().and_then(|d| {
                    duration::parse(&d.fixed_delay)
                        .ok()
                        .map(|t| (u64::try_from(t.as_millis()).unwrap_or(u64::MAX), d.percent))
                }),
            });
        }
        if let Some(m) = &f.request_header_modifier {
            out.request_headers = Some(compile_edits(m));
        }
        if let Some(m) = &f.response_header_modifier {
            out.response_headers = Some(compile_edits(m));
        }
        if let Some(rw) = &f.url_rewrite {
            out.rewrite = Some(Rewrite {
                hostname: rw.hostname.clone(),
                path: rw.path.as_ref().and_then(|p| match p.kind {
                    PathModifierType::ReplaceFullPath => p
                        .replace_full_path
                        .clone()
                        .map(PathRewrite::ReplaceFullPath),
                    PathModifierType::ReplacePrefixMatch => p
                        .replace_prefix_match
                        .clone()
                        .map(PathRewrite::ReplacePrefixMatch),
                }),
            });
        }
    }
    out
}

/// What a proxy accepts from its control plane: `docs` validated as one set and
/// compiled for the proxy named `proxy`. The proxy runs this on every push, and the
/// control plane runs it on every proxy's view before sending it, so a view the
/// proxy would refuse for what it holds is never sent.
pub fn accept(docs: Vec<crate::load::Document>, proxy: &str) -> Result<ProxyConfig, ConfigErrors> {
    let res = Resources::from_documents(docs)?;
    compile_proxy(&res, Some(proxy))
}

/// Parses, validates and compiles one YAML stream for one proxy.
pub fn compile_text(
    file: &str,
    text: &str,
    proxy: Option<&str>,
) -> Result<ProxyConfig, ConfigErrors> {
    let docs = crate::load::parse_documents(file, text)?;
    let res = Resources::from_documents(docs)?;
    compile_proxy(&res, proxy)
}

#[cfg(test)]
mod security_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::authz::{HttpAttributes, RequestAttributes, evaluate};

    const MESH: &str = r#"
apiVersion: sinew.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  trustDomain: example.org
  mtls: {mode: PERMISSIVE}
  defaultAuthorization: DENY
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: catalog-1, namespace: shop}
spec:
  inbound: {bind: "127.0.0.1:4143", ports: [8080]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
  mtls: {mode: STRICT}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: catalog-1, namespace: shop}
spec: {service: catalog, address: 127.0.0.1, ports: {http: 8080}, sidecar: {port: 4143}}
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: reviews-1, namespace: shop}
spec: {service: reviews, serviceAccount: reviewer, address: 127.0.0.2, ports: {http: 8080}}
---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ns-default, namespace: shop}
spec:
  defaultAction: ALLOW
---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: catalog-readers, namespace: shop}
spec:
  targetRef: {kind: Service, name: catalog}
  rules:
    - from: {principals: ["spiffe://example.org/ns/shop/sa/reviewer"]}
      to: {methods: [GET], pathPrefixes: [/api/]}
---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
    - to: {pathPrefixes: [/admin]}
---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reviews-only, namespace: shop}
spec:
  targetRef: {name: reviews}
  rules: [{}]
---
apiVersion: sinew.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: users, namespace: shop}
spec:
  targetRef: {kind: Service, name: catalog}
  jwtRules:
    - issuer: https://issuer.example
      audiences: [catalog]
      jwks: {uri: "https://user:pw@issuer.example/jwks?token=secret", refresh: 1m}
      forwardClaims: [{claim: sub, header: x-jwt-sub}]
      clockSkew: 5s
      requiredClaims: [{name: scope, values: [read]}]
---
apiVersion: sinew.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: everyone, namespace: shop}
spec:
  jwtRules:
    - issuer: https://other.example
      jwks: {inline: '{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA","kid":"a"}]}'}
      fromHeaders: [{name: x-token}]
"#;

    fn compile(yaml: &str) -> ProxyConfig {
        compile_text("mesh.yaml", yaml, Some("shop/catalog-1")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn errors(yaml: &str) -> String {
        let docs =
            crate::load::parse_documents("mesh.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        match Resources::from_documents(docs) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_longest_clock_skew_allowed_compiles() {
        let cfg = compile(&MESH.replace("clockSkew: 5s", "clockSkew: 5m"));
        let skew = cfg.inbound.unwrap().jwt[0].clock_skew;
        assert_eq!(skew, crate::load::MAX_CLOCK_SKEW);
    }

    #[test]
    fn compiles_identity_mtls_authz_and_jwt() {
        let cfg = compile(MESH);
        assert_eq!(cfg.trust_domain, "example.org");
        let id = cfg.identity.as_ref().unwrap();
        assert_eq!(id.workload, "catalog-1");
        assert_eq!(id.service.as_deref(), Some("catalog"));
        assert_eq!(id.service_account, "catalog");
        assert_eq!(id.spiffe, "spiffe://example.org/ns/shop/sa/catalog");
        let reviews = cfg.service("reviews.shop").unwrap();
        assert_eq!(
            reviews.ports[0].endpoints[0].identity.as_deref(),
            Some("spiffe://example.org/ns/shop/sa/reviewer")
        );
        let inb = cfg.inbound.as_ref().unwrap();
        // The service's STRICT override beats the mesh's PERMISSIVE.
        assert_eq!(inb.mtls, MtlsMode::Strict);
        // Namespace default, the targeted ALLOW and the targetless DENY; not reviews'.
        assert_eq!(inb.authz.default_action, AuthorizationAction::Allow);
        assert_eq!(inb.authz.default_source, DefaultSource::Namespace);
        assert_eq!(inb.authz.allow.len(), 1);
        assert_eq!(&*inb.authz.allow[0].name, "shop/catalog-readers");
        assert_eq!(inb.authz.deny.len(), 1);
        assert_eq!(&*inb.authz.deny[0].name, "shop/no-admin");
        // JWT: the targeted rule first, defaults filled in.
        assert_eq!(inb.jwt.len(), 2);
        assert_eq!(inb.jwt[0].policy, "shop/users");
        assert_eq!(inb.jwt[0].clock_skew, Duration::from_secs(5));
        assert_eq!(
            inb.jwt[0].from_headers[0].header,
            http::header::AUTHORIZATION
        );
        assert_eq!(inb.jwt[0].from_headers[0].prefix, "Bearer ");
        assert_eq!(inb.jwt[1].policy, "shop/everyone");
        assert_eq!(inb.jwt[1].clock_skew, DEFAULT_CLOCK_SKEW);
        assert_eq!(inb.jwt[1].from_headers[0].prefix, "");
        // /config never shows the URL's credentials.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(!json.contains("secret") && !json.contains("pw@"), "{json}");
        assert!(json.contains("https://issuer.example/jwks"), "{json}");

        let headers = http::HeaderMap::new();
        let judge = |src: Option<&str>, method: Method, path: &str| {
            evaluate(
                &inb.authz,
                &RequestAttributes {
                    source: src,
                    port: 8080,
                    l7: Some(HttpAttributes {
                        method: &method,
                        path,
                        headers: &headers,
                        request_principal: None,
                        claims: None,
                    }),
                },
            )
        };
        let reviewer = Some("spiffe://example.org/ns/shop/sa/reviewer");
        assert!(judge(reviewer, Method::GET, "/api/x").allowed);
        assert!(!judge(reviewer, Method::POST, "/api/x").allowed);
        assert!(!judge(reviewer, Method::GET, "/admin/x").allowed);
        assert!(!judge(None, Method::GET, "/api/x").allowed);
    }

    #[test]
    fn defaults_without_security_documents() {
        let yaml = r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: web, namespace: shop}
spec:
  inbound: {bind: "127.0.0.1:4143", ports: [8080]}
  workload: web-1
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec: {address: 127.0.0.1}
"#;
        let cfg = compile_text("m.yaml", yaml, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.trust_domain, DEFAULT_TRUST_DOMAIN);
        let id = cfg.identity.unwrap();
        assert_eq!(id.workload, "web-1");
        assert_eq!(id.service, None);
        assert_eq!(id.spiffe, "spiffe://cluster.local/ns/shop/sa/default");
        let inb = cfg.inbound.unwrap();
        assert_eq!(inb.mtls, MtlsMode::Strict);
        assert_eq!(inb.authz.default_action, AuthorizationAction::Allow);
        assert_eq!(inb.authz.default_source, DefaultSource::Mesh);
        assert!(inb.jwt.is_empty());
        // No workload of the proxy's name: no identity.
        let yaml = yaml.replace("  workload: web-1\n", "");
        let cfg = compile_text("m.yaml", &yaml, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.identity.is_none());
    }

    #[test]
    fn documents_round_trip_through_json() {
        let docs = crate::load::parse_documents("m.yaml", MESH).unwrap();
        let res = Resources::from_documents(docs).unwrap();
        assert_eq!(res.authorization_policies.len(), 4);
        assert_eq!(res.request_authentications.len(), 2);
        for r in res.documents() {
            let back = Resource::from_json(r.kind(), &r.to_json()).unwrap();
            assert_eq!(back.key(), r.key());
            assert_eq!(back.to_json(), r.to_json());
        }
    }

    #[test]
    fn refuses_invalid_security_documents() {
        let base = r#"
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
"#;
        let cases: &[(&str, &str)] = &[
            (
                "kind: MeshConfig\nmetadata: {name: m}\nspec: {trustDomain: Bad.Domain}",
                "spec.trustDomain",
            ),
            (
                "kind: Workload\nmetadata: {name: w, namespace: shop}\nspec: {address: 1.2.3.4, serviceAccount: Bad_SA}",
                "spec.serviceAccount",
            ),
            (
                "kind: Proxy\nmetadata: {name: p, namespace: shop}\nspec: {workload: nope}",
                "spec.workload: workload \"nope\" does not exist",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {targetRef: {kind: Service, name: nope}, rules: [{}]}",
                "spec.targetRef.name: service shop/nope does not exist",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {targetRef: {kind: Pod, name: catalog}, rules: [{}]}",
                "spec.targetRef: only a Service",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{from: {principals: [\"shop/web\"]}}]}",
                "spec.rules[0].from.principals[0]",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{from: {principalPrefixes: [\"cluster.local/ns\"]}}]}",
                "spec.rules[0].from.principalPrefixes[0]",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{to: {methods: [get]}}]}",
                "spec.rules[0].to.methods[0]",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{to: {paths: [api]}}]}",
                "spec.rules[0].to.paths[0]",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{to: {ports: [0]}}]}",
                "spec.rules[0].to.ports[0]",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{when: [{claim: scope, values: []}]}]}",
                "spec.rules[0].when[0].values",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {rules: [{to: {verbs: [GET]}}]}",
                "unknown field `verbs`",
            ),
            (
                "kind: Proxy\nmetadata: {name: p, namespace: shop}\nspec: {limits: {maxRequestHeadersKb: 0}}",
                "spec.limits.maxRequestHeadersKb: must be 1-8192",
            ),
            (
                "kind: Proxy\nmetadata: {name: p, namespace: shop}\nspec: {inbound: {bind: \"127.0.0.1:4143\", ports: [80], limits: {maxRequestHeaders: 20000}}}",
                "spec.inbound.limits.maxRequestHeaders: must be 1-10000",
            ),
            (
                "kind: Proxy\nmetadata: {name: p, namespace: shop}\nspec: {limits: {maxBody: 1}}",
                "unknown field `maxBody`",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {targetRef: {name: catalog}, defaultAction: DENY}",
                "defaultAction is only allowed on a policy without targetRef",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {defaultAction: DENY}\n---\napiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: shop}\nspec: {defaultAction: ALLOW}",
                "already has its default set by AuthorizationPolicy shop/a",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec: {action: DENY}",
                "a policy needs rules",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /a, uri: \"https://x/\"}}]}",
                "spec.jwtRules[0].jwks: set exactly one",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {uri: \"ftp://x/\"}}]}",
                "spec.jwtRules[0].jwks.uri",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {uri: \"http://x/\", caFile: /ca.pem}}]}",
                "caFile needs an https:// uri",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {uri: \"http://issuer.example/jwks\"}}]}",
                "spec.jwtRules[0].jwks.uri: \"http://issuer.example/jwks\": http:// is refused",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /j}, clockSkew: 301s}]}",
                "spec.jwtRules[0].clockSkew: \"301s\" is too long: at most 300s",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /j}, clockSkew: 8760h}]}",
                "spec.jwtRules[0].clockSkew",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {inline: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'}}]}",
                "spec.jwtRules[0].jwks.inline",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /j}, clockSkew: 1 minute}]}",
                "spec.jwtRules[0].clockSkew",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /j}, forwardClaims: [{claim: sub, header: sinew-peer}]}]}",
                "spec.jwtRules[0].forwardClaims[0].header",
            ),
            (
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /j}}, {issuer: i, jwks: {file: /k}}]}",
                "issuer \"i\" is listed twice",
            ),
        ];
        for (doc, want) in cases {
            let yaml = format!("{base}apiVersion: sinew.dev/v1alpha1\n{doc}\n");
            let got = match crate::load::parse_documents("m.yaml", &yaml) {
                Err(e) => e.to_string(),
                Ok(_) => errors(&yaml),
            };
            assert!(got.contains(want), "{doc}\nwant {want:?}\ngot {got}");
        }
    }
}

#[cfg(test)]
mod tracing_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn mesh(tracing: &str) -> String {
        format!(
            "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing: {tracing}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p}}\nspec: {{}}\n"
        )
    }

    #[test]
    fn compiles_tracing_with_defaults_and_normalised_endpoints() {
        let cfg = compile_text("m.yaml", &mesh("{endpoint: \"http://otel:4317\"}"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cfg.tracing,
            Some(TracingConfig {
                endpoint: "http://otel:4317".into(),
                protocol: OtlpProtocol::Grpc,
                sampling_ratio: 1.0,
                always_sample_errors: true,
            })
        );
        let cfg = compile_text(
            "m.yaml",
            &mesh(
                "{endpoint: \"http://127.0.0.1\", protocol: http/protobuf, samplingRatio: 0.25, alwaysSampleErrors: false}",
            ),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = cfg.tracing.unwrap();
        assert_eq!(t.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(t.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(t.sampling_ratio, 0.25);
        assert!(!t.always_sample_errors);
        // Off without the section; `/config` shows it either way.
        let cfg = compile_text(
            "m.yaml",
            "apiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {name: p}\nspec: {}\n",
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.tracing.is_none());
        let json = serde_json::to_value(
            compile_text(
                "m.yaml",
                &mesh("{endpoint: \"http://[::1]:9\", protocol: http/protobuf}"),
                None,
            )
            .unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap();
        assert_eq!(json["tracing"]["endpoint"], "http://[::1]:9/v1/traces");
        assert_eq!(json["tracing"]["protocol"], "http/protobuf");
    }

    #[test]
    fn refuses_bad_tracing_naming_the_field() {
        let cases = [
            ("{endpoint: \"otel:4317\"}", "spec.tracing.endpoint"),
            (
                "{endpoint: \"https://otel:4317\"}",
                "https is not supported",
            ),
            (
                "{endpoint: \"http://otel:4317/x\"}",
                "a gRPC endpoint has no path",
            ),
            (
                "{endpoint: \"http://otel:4318?a=b\", protocol: http/protobuf}",
                "a query is not allowed",
            ),
            (
                "{endpoint: \"http://otel\", samplingRatio: 1.5}",
                "spec.tracing.samplingRatio: 1.5 is not a share",
            ),
            (
                "{endpoint: \"http://otel\", samplingRatio: -0.1}",
                "spec.tracing.samplingRatio",
            ),
            (
                "{endpoint: \"http://otel\", protocol: http}",
                "spec.tracing.protocol",
            ),
            (
                "{endpoint: \"http://otel\", sampling: 1}",
                "unknown field `sampling`",
            ),
            ("{protocol: grpc}", "missing field `endpoint`"),
        ];
        for (tracing, want) in cases {
            let yaml = mesh(tracing);
            let got = match crate::load::parse_documents("m.yaml", &yaml) {
                Err(e) => e.to_string(),
                Ok(docs) => match Resources::from_documents(docs) {
                    Ok(_) => panic!("{tracing}: expected an error"),
                    Err(e) => e.to_string(),
                },
            };
            assert!(got.contains(want), "{tracing}\nwant {want:?}\ngot {got}");
            assert!(
                got.contains("MeshConfig") || got.contains("spec.tracing"),
                "{got}"
            );
        }
    }
}
