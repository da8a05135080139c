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
    #[serde(skip)]
    names: HashMap<String, String>,
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
}

/// One service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Balancing algorithm.
    pub load_balancer: LoadBalancer,
    /// Ports with their endpoints and routes.
    pub ports: Vec<PortConfig>,
}

impl ServiceConfig {
    /// `name.namespace`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

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
}

/// A compiled route rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleConfig {
    /// `namespace/name` of the route, or `default` for the implicit route.
    pub route: String,
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
}

impl Filters {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_none() && self.response_headers.is_none() && self.rewrite.is_none()
    }
}

/// Header edits: set, then add, then remove.
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

fn ser_pairs<S: Serializer>(v: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        v.iter()
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v.as_bytes()))),
    )
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

    let mut services = BTreeMap::new();
    let mut names = HashMap::new();
    for ((sns, sname), svc) in &res.services {
        let cfg = compile_service(res, (sns, sname), svc, &mut errors);
        let key = cfg.key();
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

    let inbound = p.spec.inbound.as_ref().and_then(|i| {
        Some(InboundConfig {
            bind: i.bind.parse().ok()?,
            app_address: match &i.app_address {
                Some(a) => a.parse().ok()?,
                None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
            ports: i.ports.clone(),
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
        });
    }
    let http_proxy = p
        .spec
        .outbound
        .http_proxy
        .as_ref()
        .and_then(|h| h.bind.parse().ok());
    errors.into_result(ProxyConfig {
        name: p.metadata.name.clone(),
        namespace: ns,
        inbound,
        upstreams,
        http_proxy,
        cluster_domain,
        services,
        names,
    })
}

fn compile_service(
    res: &Resources,
    (ns, name): (&str, &str),
    svc: &Object<ServiceSpec>,
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
    ServiceConfig {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        load_balancer: svc
            .spec
            .load_balancer
            .or_else(|| res.mesh.as_ref().and_then(|m| m.spec.default_load_balancer))
            .unwrap_or_default(),
        ports,
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
                    let bport = b.port.unwrap_or(port.port);
                    let exists = res
                        .services
                        .get(&(bns.to_owned(), b.name.clone()))
                        .is_some_and(|s| s.spec.ports.iter().any(|p| p.port == bport));
                    if !exists {
                        fail(
                            format!("spec.rules[{ri}].backendRefs[{bi}].port"),
                            format!(
                                "service {bns}/{} has no port {bport} (the port defaults to the parent's port {})",
                                b.name, port.port
                            ),
                        );
                        continue;
                    }
                    out.push(BackendConfig {
                        service: format!("{}.{bns}", b.name),
                        port: bport,
                        weight: b.weight,
                        filters: compile_filters(&b.filters),
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
                route: label.clone(),
                rule: ri,
                filters: compile_filters(&rule.filters),
                total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
                backends,
                request_timeout: dur(&timeouts.request),
                backend_timeout: dur(&timeouts.backend_request),
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

fn compile_filters(filters: &[HttpRouteFilter]) -> Filters {
    let mut out = Filters::default();
    for f in filters {
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
