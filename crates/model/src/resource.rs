//! The documents users write: Kubernetes-shaped (`apiVersion`, `kind`, `metadata`,
//! `spec`), with unknown fields refused so a typo is an error, not a silent default.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

pub use crate::fields::{
    DnsLabel, HttpsUrl, LocalPath, OtlpEndpoint, RequestPrincipal, SpiffePrefix, UrlPath,
};
pub use crate::matching::{HttpHeaderMatch, HttpPathMatch, HttpQueryParamMatch};
pub use crate::parsed::{GrpcCode, Parsed, PublicJwks};
use crate::spiffe::SpiffeId;
use crate::vip::Cidr;

/// API group and version of Sinew's own kinds.
pub const SINEW_API_VERSION: &str = "sinew.dev/v1alpha1";
/// API group of Gateway API kinds; `v1` and `v1beta1` are accepted.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The namespace used when a document names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Object metadata, a subset of Kubernetes `ObjectMeta`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// Name, unique per kind and namespace.
    pub name: String,
    /// Namespace; [`DEFAULT_NAMESPACE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels, e.g. `version: v2`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 creation time; orders otherwise equal routes (oldest first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl Metadata {
    /// The namespace, defaulted.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// Wire protocol of a service port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2, detected per connection (the default).
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// HTTP/2 only (h2c prior knowledge toward endpoints without a sidecar).
    #[serde(rename = "HTTP2")]
    Http2,
    /// gRPC: HTTP/2 with trailers.
    #[serde(rename = "GRPC")]
    Grpc,
    /// Opaque TCP: bytes are forwarded, never parsed.
    #[serde(rename = "TCP")]
    Tcp,
}

impl Protocol {
    /// True for the HTTP family.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

/// Load-balancing algorithm for a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency (the default).
    #[default]
    #[serde(rename = "PeakEWMA")]
    PeakEwma,
    /// Plain round robin.
    RoundRobin,
}

/// `kind: Service`: a logical service with named ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The service's ports.
    pub ports: Vec<ServicePort>,
    /// Optional label selector: workloads in the namespace whose labels match are
    /// endpoints too (besides those naming the service in `spec.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Balancing algorithm; default the mesh's default, else `PeakEWMA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// mTLS mode of this service's inbound traffic; default the mesh's mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// The service's stable virtual IP: an app whose traffic is captured connects to
    /// `virtualIP:port` and the sidecar maps it to this service. Default: allocated by
    /// the control plane from `MeshConfig.spec.virtualIPRange`.
    #[serde(default, rename = "virtualIP", skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<Parsed<IpAddr>>,
    /// More virtual IPs of the service, e.g. one IPv4 and one IPv6 address for a
    /// dual-stack service (on Kubernetes: the Service's `spec.clusterIPs`). The
    /// service's addresses are `virtualIP` followed by these; with either field the
    /// control plane allocates none. An empty list says the service has no virtual IP
    /// (a headless service: its clients reach each workload at its own address).
    #[serde(
        default,
        rename = "virtualIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_ips: Option<Vec<Parsed<IpAddr>>>,
    /// The service accounts whose proxies may register workloads under this service
    /// (the control plane checks a proxy's registration against its certificate).
    /// Default: only the account named like the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Vec<String>>,
}

impl ServiceSpec {
    /// The service's explicit virtual IPs as written: `virtualIP`, then `virtualIPs`.
    pub fn virtual_ip_list(&self) -> impl Iterator<Item = &Parsed<IpAddr>> {
        self.virtual_ip
            .iter()
            .chain(self.virtual_ips.iter().flatten())
    }

    /// True when the service says what its virtual IPs are, possibly none (the
    /// control plane allocates none then).
    pub fn names_virtual_ips(&self) -> bool {
        self.virtual_ip.is_some() || self.virtual_ips.is_some()
    }

    /// True when a proxy of `account` may register a workload under this service.
    pub fn admits_account(&self, service: &str, account: &str) -> bool {
        account == service
            || self
                .service_accounts
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x == account))
    }
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name, e.g. `http`; workloads map it to their own port number.
    pub name: String,
    /// The service port number (what clients address, e.g. 80).
    pub port: u16,
    /// Workload port when the workload does not name this port; default `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Protocol; default `HTTP`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// `kind: Workload`: one instance of a service (a process, pod or VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The service this instance serves, in the workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// IP address of the instance.
    pub address: Parsed<IpAddr>,
    /// Port numbers by service port name, e.g. `http: 8080`.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Present when the instance runs a Sinew sidecar: mesh traffic goes to its inbound
    /// port over HTTP/2 instead of straight to the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarRef>,
    /// The instance's service account: its identity is
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`. Default the
    /// workload's `service`, else `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl WorkloadSpec {
    /// The service account, defaulted: `serviceAccount`, else `service`, else
    /// `default`.
    pub fn service_account(&self) -> &str {
        self.service_account
            .as_deref()
            .or(self.service.as_deref())
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
    }
}

/// The service account of a workload that names neither one nor a service.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Where a workload's sidecar accepts mesh traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarRef {
    /// The sidecar's inbound port on the workload's address.
    pub port: u16,
}

/// `kind: MeshConfig`: mesh-wide settings (at most one per mesh).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// DNS suffix accepted in logical names; default `cluster.local`. A `Proxy`'s own
    /// `clusterDomain` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
    /// Default balancing algorithm for services that do not choose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_load_balancer: Option<LoadBalancer>,
    /// The SPIFFE trust domain of the mesh's identities; default `cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// The mesh-wide mTLS mode between sidecars; default `STRICT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// What happens to a request no authorization policy decides; default `ALLOW`.
    /// A namespace's targetless `AuthorizationPolicy` with `defaultAction` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_authorization: Option<AuthorizationAction>,
    /// Distributed tracing: where every sidecar sends its spans, and how many. Off
    /// when absent (trace headers then pass through untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
    /// What a sidecar does with captured traffic to a destination the mesh does not
    /// know; default `ALLOW_ANY` (it passes through as plain TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Where the control plane allocates services' virtual IPs (a CIDR); default
    /// `240.240.0.0/16`.
    #[serde(
        default,
        rename = "virtualIPRange",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_ip_range: Option<Parsed<Cidr>>,
}

/// `MeshConfig.spec.outboundTrafficPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// The mode; default `ALLOW_ANY`.
    #[serde(default)]
    pub mode: EgressMode,
}

/// Whether captured traffic may leave the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum EgressMode {
    /// Unknown destinations pass through as plain TCP (the default).
    #[default]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    /// Only mesh services are reachable: a captured connection to anything else is
    /// refused (closed).
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// Distributed tracing (`MeshConfig.spec.tracing`): each sidecar hop continues the
/// caller's W3C or B3 context with a span of its own, exported over OTLP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// The OTLP collector, `http://host:port`: e.g. port 4317 for `grpc`, 4318 for
    /// `http/protobuf` (whose path defaults to `/v1/traces`).
    pub endpoint: Parsed<OtlpEndpoint>,
    /// The OTLP transport; default `grpc`.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Share of new traces sampled, `0` to `1`; default `1`. A request that arrives
    /// with a sampling decision (its `traceparent` or B3 flag) keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_ratio: Option<f64>,
    /// Export the spans of a request that fails (5xx, or an error the proxy made)
    /// even when it was not sampled; default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always_sample_errors: Option<bool>,
}

/// How spans travel to the collector (the values of `OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum OtlpProtocol {
    /// OTLP over gRPC (the default).
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// mTLS settings (mesh-wide, or per service for its inbound traffic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtlsSpec {
    /// The mode; default `STRICT`.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Whether a sidecar's inbound accepts plaintext besides mTLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum MtlsMode {
    /// Only mutually authenticated TLS (the default): plaintext is refused.
    #[default]
    #[serde(rename = "STRICT")]
    Strict,
    /// mTLS and plaintext both accepted, for migration. Plaintext callers have no
    /// identity, so identity-based rules never match them.
    #[serde(rename = "PERMISSIVE")]
    Permissive,
}

/// What an authorization policy (or a default) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum AuthorizationAction {
    /// Allow (the default).
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    /// Deny.
    #[serde(rename = "DENY")]
    Deny,
}

/// `kind: Proxy`: how one `sinew-proxy` listens (standalone mode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxySpec {
    /// Inbound listener: mesh traffic to the local application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundSpec>,
    /// Outbound listeners: how the local application reaches the mesh.
    #[serde(default)]
    pub outbound: OutboundSpec,
    /// DNS suffix accepted in logical names (`catalog.shop.svc.<clusterDomain>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
    /// The `Workload` (same namespace) this proxy serves: it gives the proxy its
    /// identity and decides which policies apply at its inbound. Default the
    /// Workload named like the proxy, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Access logs: one line per request on standard output, written off the request
    /// path. Absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSpec>,
    /// Transparent capture: the workload's traffic is redirected to the proxy by
    /// packet-filter rules (`sinew init`), which listens on these ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureSpec>,
    /// Request limits of every listener of this proxy (a listener's own `limits`
    /// win); unset: the sidecar's flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
}

/// Request limits (`Proxy.spec.limits`, `spec.inbound.limits`,
/// `spec.outbound.upstreams[].limits`). A request over them is answered by the
/// listener it arrives at, never forwarded: 431 for headers, 413 for a body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Most KiB of request headers (names, values and 32 bytes each, as HTTP/2
    /// counts them), 1 to 8192.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_headers_kb: Option<u32>,
    /// Most request headers, 1 to 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_headers: Option<u32>,
    /// Most bytes of a request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
}

impl LimitsSpec {
    /// These limits, with `outer`'s where these say nothing.
    pub fn or(self, outer: LimitsSpec) -> LimitsSpec {
        LimitsSpec {
            max_request_headers_kb: self.max_request_headers_kb.or(outer.max_request_headers_kb),
            max_request_headers: self.max_request_headers.or(outer.max_request_headers),
            max_request_body_bytes: self.max_request_body_bytes.or(outer.max_request_body_bytes),
        }
    }
}

/// Transparent capture (`Proxy.spec.capture`). The ports must be those `sinew init`
/// redirects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaptureSpec {
    /// Where redirected outbound TCP arrives (on loopback); default 15001.
    #[serde(default = "default_outbound_capture")]
    pub outbound_port: u16,
    /// Where redirected inbound TCP arrives (on every address); default 15006.
    #[serde(default = "default_inbound_capture")]
    pub inbound_port: u16,
    /// Destination ports whose traffic is never inspected (opaque TCP at once): for
    /// protocols where the server speaks first (MySQL, SMTP) or any non-HTTP one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opaque_ports: Vec<u16>,
    /// How long protocol detection waits for the client's first bytes before it
    /// treats the connection as opaque TCP, e.g. `100ms`; default 100 ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_timeout: Option<Parsed<Duration>>,
    /// The DNS responder's UDP port on loopback (answers services' names with their
    /// virtual IPs); absent: no DNS responder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_port: Option<u16>,
}

fn default_outbound_capture() -> u16 {
    15001
}

fn default_inbound_capture() -> u16 {
    15006
}

/// Access-log settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogSpec {
    /// `json` (default) or `text`.
    #[serde(default)]
    pub format: AccessLogFormat,
}

/// How access-log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, space-separated, values quoted when they need it.
    Text,
}

/// The inbound listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundSpec {
    /// Listen address, e.g. `0.0.0.0:4143`.
    pub bind: Parsed<SocketAddr>,
    /// Where the application listens; default `127.0.0.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_address: Option<Parsed<IpAddr>>,
    /// Application ports mesh traffic may reach; nothing else on the host is reachable.
    pub ports: Vec<u16>,
    /// This listener's request limits (over the proxy's `spec.limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
}

/// The outbound listeners.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundSpec {
    /// Per-upstream local bindings, e.g. `127.0.0.1:9001 → catalog:http`.
    #[serde(default)]
    pub upstreams: Vec<UpstreamSpec>,
    /// An HTTP forward-proxy port that routes by Host (for `HTTP_PROXY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<HttpProxySpec>,
}

/// One local binding to a service port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Local listen address, e.g. `127.0.0.1:9001`.
    pub bind: Parsed<SocketAddr>,
    /// Logical service name: `catalog` or `catalog.shop`.
    pub service: String,
    /// Service port, by name (`http`) or number (`80`); default the service's only port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    /// Override the service port's protocol for this binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// This binding's request limits (over the proxy's `spec.limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
}

/// A service port named or numbered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum PortRef {
    /// By number.
    Number(u16),
    /// By name.
    Name(String),
}

/// The forward-proxy listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpProxySpec {
    /// Local listen address, e.g. `127.0.0.1:4140`.
    pub bind: Parsed<SocketAddr>,
}

/// `kind: HTTPRoute` (Gateway API), attached to a Service as in GAMMA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// The services this route applies to.
    pub parent_refs: Vec<ParentRef>,
    /// Accepted for compatibility; GAMMA routes match by parent, not by hostname.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules; a rule with no match matches every request (`PathPrefix /`).
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A parent reference: the Service a route attaches to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// API group; `""` or `core` for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind; must be `Service` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Service namespace; default the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Restrict to one service port; default all of the service's HTTP ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Accepted for compatibility; unused for Service parents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// One rule of an HTTPRoute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Optional rule name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one match selects the rule.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied when the rule is selected.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends; none means the parent service itself.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (GEP-1731 shape, with a budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

/// When and how often a failed request is tried again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries after the first try; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// HTTP statuses that are retried; default 502, 503, 504. Connection failures
    /// (nothing was sent) are always retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes: Option<Vec<u16>>,
    /// gRPC statuses that are retried, by name (e.g. `UNAVAILABLE`); default none.
    /// Naming any makes gRPC calls retryable (they are all POSTs), so name only
    /// statuses that mean the call was not carried out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<Parsed<GrpcCode>>,
    /// First backoff, doubled per retry with full jitter; default `25ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Parsed<Duration>>,
    /// Retry methods that are not idempotent (POST, PATCH) too; default false.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Caps retries so they cannot amplify an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
    /// Hedging: a second try, to another endpoint, when the first is slow; the first
    /// good answer wins and the other is cancelled. Drawn from the same budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeSpec>,
}

/// When to hedge: after a fixed delay, or after the rule's observed latency
/// percentile (give one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HedgeSpec {
    /// A fixed delay, e.g. `50ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Parsed<Duration>>,
    /// A latency percentile of the rule's recent requests, e.g. 95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
}

/// A retry budget: retries stay under `ratio` of requests plus `minPerSecond`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Retries allowed per request, over a 10 s window; default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries always allowed per second; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
}

/// A request match; all present conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path condition; default `PathPrefix /`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query_params: Vec<HttpQueryParamMatch>,
    /// HTTP method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Parsed<Method>>,
}

/// Path match type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PathMatchType {
    /// The whole path, exactly.
    Exact,
    /// Element-wise prefix: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    #[default]
    PathPrefix,
    /// A regular expression matched against the whole path.
    RegularExpression,
}

/// Header or query-parameter value match type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum StringMatchType {
    /// Exact value.
    #[default]
    Exact,
    /// Regular expression over the whole value.
    RegularExpression,
}

/// Filter type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum FilterType {
    /// Edit request headers.
    RequestHeaderModifier,
    /// Edit response headers.
    ResponseHeaderModifier,
    /// Rewrite host and/or path.
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    /// Copy requests to another backend, fire and forget (Gateway API).
    RequestMirror,
    /// Sinew extension: inject delays and aborts, for chaos testing.
    Fault,
}

/// `RequestMirror`: where copies go, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    /// The Service receiving copies.
    pub backend_ref: HttpBackendRef,
    /// Share of requests copied, 0-100; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

/// `Fault`: delays and aborts for a share of the requests a rule matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    /// Answer at once with an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    /// Wait before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
}

/// An injected error: an HTTP status, or a gRPC status for gRPC requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status (e.g. 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// gRPC status name (e.g. `UNAVAILABLE`), for gRPC requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<Parsed<GrpcCode>>,
    /// Share of matching requests, 0-100.
    pub percent: f64,
}

/// An injected delay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long (Gateway API duration).
    pub fixed_delay: Parsed<Duration>,
    /// Share of matching requests, 0-100.
    pub percent: f64,
}

/// A Gateway API filter: `type` plus the matching configuration field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// Which filter.
    #[serde(rename = "type")]
    pub kind: FilterType,
    /// For `RequestHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `URLRewrite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    /// For `RequestMirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    /// For `Fault`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
}

/// gRPC status codes by name.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The number of a gRPC status name.
pub fn grpc_code(name: &str) -> Option<u8> {
    GRPC_CODES
        .iter()
        .position(|c| *c == name)
        .and_then(|i| u8::try_from(i).ok())
}

/// Header edits: `set` replaces, `add` appends, `remove` deletes (applied in that order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Headers to set, replacing existing values.
    #[serde(default)]
    pub set: Vec<HeaderValuePair>,
    /// Headers to append.
    #[serde(default)]
    pub add: Vec<HeaderValuePair>,
    /// Header names to remove.
    #[serde(default)]
    pub remove: Vec<Parsed<HeaderName>>,
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HeaderValuePair {
    /// Header name.
    pub name: Parsed<HeaderName>,
    /// Header value.
    pub value: Parsed<HeaderValue>,
}

/// URL rewrite.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    /// New Host / `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Parsed<Authority>>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// Path rewrite type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PathModifierType {
    /// Replace the whole path.
    ReplaceFullPath,
    /// Replace the matched `PathPrefix`.
    ReplacePrefixMatch,
}

/// Path rewrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    /// Rewrite type.
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<Parsed<UrlPath>>,
    /// For `ReplacePrefixMatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<Parsed<UrlPath>>,
}

/// A weighted backend (a Service port).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// API group; `""` or `core`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind; `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Service namespace; default the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port; default the port the request arrived for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative weight; default 1. Zero receives no traffic.
    #[serde(default = "one")]
    pub weight: u32,
    /// Filters applied only for this backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

fn one() -> u32 {
    1
}

/// Route timeouts (Gateway API durations).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Time allowed until the response headers reach the client; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Parsed<Duration>>,
    /// Time allowed for one backend attempt; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Parsed<Duration>>,
}

/// A policy's target: a Service in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// API group; `""` or `core` for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind; `Service` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The Service's name (in the policy's namespace).
    pub name: String,
}

/// `kind: TrafficPolicy`: how clients treat a Service's endpoints: circuit breaking
/// and outlier detection (at most one per Service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service.
    pub target_ref: PolicyTargetRef,
    /// Limits; overflow is answered at once with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Ejecting failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Sticky sessions: a consistent-hash ring over the endpoints, keyed by a header,
    /// a cookie or the source address (requests without the key are balanced as usual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHashSpec>,
    /// Prefer endpoints in the caller's zone (label `topology.kubernetes.io/zone` or
    /// `zone`), spilling over to all when none there are available.
    #[serde(default)]
    pub locality_preference: bool,
    /// Active health checks of the Service's endpoints that have no sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Rate limits, enforced at the inbound of the Service's workloads (in order;
    /// the first whose bucket is empty refuses with 429).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitSpec>,
}

/// What a consistent-hash ring hashes: give exactly one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RingHashSpec {
    /// A request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Parsed<HeaderName>>,
    /// A cookie's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
}

/// An active health check: an HTTP GET of `path` (2xx/3xx is healthy), or a TCP
/// connect when no path is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// HTTP path to GET; absent: a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<Parsed<PathAndQuery>>,
    /// Time between checks; default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Parsed<Duration>>,
    /// Time a check may take; default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Parsed<Duration>>,
    /// Failed checks in a row that mark an endpoint unhealthy; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Passed checks in a row that mark it healthy again; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
}

/// A rate limit: a token bucket per key, per proxy or (`global`) mesh-wide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Name, for `sinew-error` and metrics.
    pub name: String,
    /// Requests it applies to (HTTPRoute match shape); none: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// One bucket per value of this; default one bucket for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst above the rate; default the rate (one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Mesh-wide: the rate (and burst) hold for all the service's proxies together,
    /// not for each. The control plane leases every proxy a share in proportion to
    /// its demand; a proxy cut off from the control plane keeps `1/N` of the rate
    /// (N: the proxies that last shared it). Without a control plane, the whole rate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global: bool,
}

impl RateLimitSpec {
    /// The bucket size: `burst`, else one second's worth of the rate.
    pub fn burst_or_default(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.requests_per_second.ceil().max(1.0) as u32)
    }
}

/// What a rate limit counts by: give exactly one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitKey {
    /// The value of this request header (requests without it share one bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Parsed<HeaderName>>,
    /// The caller's verified SPIFFE id (plaintext callers share one bucket).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity: bool,
}

/// Circuit-breaker limits (each optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Requests in flight to the whole service, from this proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests in flight to one endpoint, from this proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_endpoint: Option<u32>,
    /// Connections open to one endpoint, from this proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_endpoint: Option<u32>,
    /// Requests that may wait for a connection to one endpoint when
    /// `maxConnectionsPerEndpoint` is reached (HTTP/1.1); beyond it, 503 at once.
    /// Default 0: no waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests_per_endpoint: Option<u32>,
}

/// Outlier detection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// Eject after this many failures in a row (5xx, connection failures); default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Eject after this many refused connections in a row (nothing listens on the
    /// endpoint's port); default 1. A refusal is certain, unlike a timeout or a
    /// 5xx, and a balancer that routes around a failing endpoint (peak EWMA) would
    /// otherwise rarely send it enough tries to reach `consecutiveFailures`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_refusals: Option<u32>,
    /// Eject when this share (percent) of an endpoint's requests failed over the
    /// window, with at least `minimumRequests`; default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percent: Option<u32>,
    /// Requests needed in the window for `failurePercent`; default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_requests: Option<u32>,
    /// The failure-rate window; default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Parsed<Duration>>,
    /// First ejection time, multiplied by the number of ejections; default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Parsed<Duration>>,
    /// Never eject more than this share (percent) of the endpoints; default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// `kind: AuthorizationPolicy`: who may call what, at the inbound of the workloads of
/// a Service (or of a whole namespace). Semantics: see [`crate::authz`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Service whose workloads the policy protects; absent: every workload of the
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    /// What a matching rule does; default `ALLOW`.
    #[serde(default)]
    pub action: AuthorizationAction,
    /// Only on a targetless policy (at most one per namespace): what happens to a
    /// request of this namespace that no policy decides. Overrides the mesh default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<AuthorizationAction>,
    /// Rules; any rule matching makes the policy match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRule>,
}

/// One rule: it matches when every part present matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Who is calling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<RuleSource>,
    /// What is called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<RuleOperation>,
    /// Conditions on the verified JWT's claims, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<ClaimCondition>,
}

/// The caller, in a rule. Each list present must match; an empty list is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSource {
    /// Exact SPIFFE ids of the peer (`principals` and `principalPrefixes` together
    /// form one condition: either may match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<Parsed<SpiffeId>>,
    /// Prefixes of the peer's SPIFFE id, e.g. `spiffe://cluster.local/ns/shop/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principal_prefixes: Vec<Parsed<SpiffePrefix>>,
    /// Namespaces of the peer (from its SPIFFE id in the mesh's trust domain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Parsed<DnsLabel>>,
    /// `issuer/subject` of the verified JWT; `*` means any verified token, and a
    /// trailing `*` matches a prefix (e.g. `https://issuer.example/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<Parsed<RequestPrincipal>>,
}

/// The operation, in a rule. Each list present must match; an empty list is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleOperation {
    /// Application ports (as the inbound sees them: the workload's ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Exact paths (`paths` and `pathPrefixes` together form one condition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Parsed<UrlPath>>,
    /// Path prefixes, by whole segments: `/api` matches `/api` and `/api/x`, never
    /// `/apiadmin`; `/api/` matches `/api/x`, not `/api`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<Parsed<UrlPath>>,
    /// HTTP methods, upper case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Parsed<Method>>,
    /// Request headers, each of which must be present with this exact value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderValuePair>,
}

/// A condition on a JWT claim: present and equal to one of `values`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimCondition {
    /// The claim's name; a dotted path (`realm.roles`) reaches nested claims.
    pub claim: String,
    /// Accepted values.
    pub values: Vec<String>,
}

/// `kind: RequestAuthentication`: JWTs accepted at the inbound of the workloads of a
/// Service (or of a whole namespace). A request without a token passes (authorization
/// may refuse it); a request with a token must carry a valid one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// The Service whose workloads accept these tokens; absent: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    /// One rule per issuer.
    pub jwt_rules: Vec<JwtRule>,
}

/// How tokens of one issuer are verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    /// The exact `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values; when listed, the token must carry one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the issuer's public keys come from.
    pub jwks: JwksSpec,
    /// Where tokens are found; default `authorization` with prefix `Bearer `.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Verified claims copied into request headers for the application.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_claims: Vec<ClaimToHeader>,
    /// Keep the token's header for the application; default false (removed once
    /// verified).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// Tolerance for `exp` and `nbf` (Gateway API duration); default `60s`, at most
    /// `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<Parsed<Duration>>,
    /// Claims the token must carry (with one of the values, when listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<RequiredClaim>,
}

/// A JWKS source: exactly one of `file`, `uri`, `inline`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwksSpec {
    /// A local file holding the JWKS JSON; re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<Parsed<LocalPath>>,
    /// An `https://` URL serving the JWKS JSON (`http://` is refused: keys fetched
    /// in the clear could be replaced on the way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<Parsed<HttpsUrl>>,
    /// With `uri` over HTTPS: a PEM file of CA certificates to trust instead of the
    /// system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<Parsed<LocalPath>>,
    /// With `uri`: how often the keys are fetched again; default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<Parsed<Duration>>,
    /// The JWKS JSON itself (public keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<Parsed<PublicJwks>>,
}

/// A header that may carry a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeader {
    /// Header name.
    pub name: Parsed<HeaderName>,
    /// Text before the token (compared case-insensitively), e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Copies a verified claim into a request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The claim (a dotted path reaches nested claims).
    pub claim: String,
    /// The header set for the application (any copy sent by the client is removed).
    pub header: Parsed<HeaderName>,
}

/// A claim a token must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequiredClaim {
    /// The claim (a dotted path reaches nested claims).
    pub name: String,
    /// Accepted values; empty: any value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A typed document.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// `kind: Proxy`.
    Proxy(Object<ProxySpec>),
    /// `kind: Service`.
    Service(Object<ServiceSpec>),
    /// `kind: Workload`.
    Workload(Object<WorkloadSpec>),
    /// `kind: HTTPRoute`.
    HttpRoute(Object<HttpRouteSpec>),
    /// `kind: MeshConfig`.
    MeshConfig(Object<MeshConfigSpec>),
    /// `kind: AuthorizationPolicy`.
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    /// `kind: RequestAuthentication`.
    RequestAuthentication(Object<RequestAuthenticationSpec>),
    /// `kind: TrafficPolicy`.
    TrafficPolicy(Object<TrafficPolicySpec>),
    /// `kind: RoutePolicy` ([`crate::policy`]).
    RoutePolicy(Object<RoutePolicySpec>),
}

/// The kinds, as written in documents.
pub const KINDS: [&str; 9] = [
    "TrafficPolicy",
    "Proxy",
    "Service",
    "Workload",
    "HTTPRoute",
    "MeshConfig",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "RoutePolicy",
];

/// Identifies a document: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    /// Kind, e.g. `Service`.
    pub kind: String,
    /// Namespace (defaulted).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl Resource {
    /// The kind as written in documents.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Proxy(_) => "Proxy",
            Resource::Service(_) => "Service",
            Resource::Workload(_) => "Workload",
            Resource::HttpRoute(_) => "HTTPRoute",
            Resource::MeshConfig(_) => "MeshConfig",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::RequestAuthentication(_) => "RequestAuthentication",
            Resource::TrafficPolicy(_) => "TrafficPolicy",
            Resource::RoutePolicy(_) => "RoutePolicy",
        }
    }

    /// The document's key.
    pub fn key(&self) -> ResourceKey {
        let m = self.metadata();
        ResourceKey {
            kind: self.kind().to_owned(),
            namespace: m.ns().to_owned(),
            name: m.name.clone(),
        }
    }

    /// The document as JSON, in the same shape as its YAML; namespace made explicit.
    pub fn to_json(&self) -> String {
        let mut r = self.clone();
        r.metadata_mut().namespace = Some(self.metadata().ns().to_owned());
        let out = match &r {
            Resource::Proxy(o) => serde_json::to_string(o),
            Resource::Service(o) => serde_json::to_string(o),
            Resource::Workload(o) => serde_json::to_string(o),
            Resource::HttpRoute(o) => serde_json::to_string(o),
            Resource::MeshConfig(o) => serde_json::to_string(o),
            Resource::AuthorizationPolicy(o) => serde_json::to_string(o),
            Resource::RequestAuthentication(o) => serde_json::to_string(o),
            Resource::TrafficPolicy(o) => serde_json::to_string(o),
            Resource::RoutePolicy(o) => serde_json::to_string(o),
        };
        // Serialising plain data to JSON cannot fail; an empty object is never used.
        out.unwrap_or_default()
    }

    /// Parses a document of a known kind from its JSON form.
    pub fn from_json(kind: &str, json: &str) -> Result<Resource, crate::ConfigError> {
        fn parse<S: serde::de::DeserializeOwned>(
            json: &str,
        ) -> Result<Object<S>, crate::ConfigError> {
            let mut de = serde_json::Deserializer::from_str(json);
            serde_path_to_error::deserialize(&mut de).map_err(|e| {
                crate::ConfigError::new(e.inner().to_string()).field(e.path().to_string())
            })
        }
        match kind {
            "Proxy" => parse(json).map(Resource::Proxy),
            "Service" => parse(json).map(Resource::Service),
            "Workload" => parse(json).map(Resource::Workload),
            "HTTPRoute" => parse(json).map(Resource::HttpRoute),
            "MeshConfig" => parse(json).map(Resource::MeshConfig),
            "AuthorizationPolicy" => parse(json).map(Resource::AuthorizationPolicy),
            "RequestAuthentication" => parse(json).map(Resource::RequestAuthentication),
            "TrafficPolicy" => parse(json).map(Resource::TrafficPolicy),
            "RoutePolicy" => parse(json).map(Resource::RoutePolicy),
            other => Err(crate::ConfigError::new(format!("unknown kind {other:?}")).field("kind")),
        }
    }

    fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::Proxy(o) => &mut o.metadata,
            Resource::Service(o) => &mut o.metadata,
            Resource::Workload(o) => &mut o.metadata,
            Resource::HttpRoute(o) => &mut o.metadata,
            Resource::MeshConfig(o) => &mut o.metadata,
            Resource::AuthorizationPolicy(o) => &mut o.metadata,
            Resource::RequestAuthentication(o) => &mut o.metadata,
            Resource::TrafficPolicy(o) => &mut o.metadata,
            Resource::RoutePolicy(o) => &mut o.metadata,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Proxy(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::Workload(o) => &o.metadata,
            Resource::HttpRoute(o) => &o.metadata,
            Resource::MeshConfig(o) => &o.metadata,
            Resource::AuthorizationPolicy(o) => &o.metadata,
            Resource::RequestAuthentication(o) => &o.metadata,
            Resource::TrafficPolicy(o) => &o.metadata,
            Resource::RoutePolicy(o) => &o.metadata,
        }
    }

    /// `Kind namespace/name`, for messages.
    pub fn label(&self) -> String {
        let m = self.metadata();
        format!("{} {}/{}", self.kind(), m.ns(), m.name)
    }
}

/// A document's envelope around a typed spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    /// `sinew.dev/v1alpha1`, or `gateway.networking.k8s.io/v1` for routes.
    pub api_version: String,
    /// The kind.
    pub kind: String,
    /// Metadata.
    pub metadata: Metadata,
    /// The spec.
    pub spec: S,
}

pub use crate::policy::{RouteKind, RoutePolicySpec, RouteTargetRef};
pub use crate::set::Resources;
