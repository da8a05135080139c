//! Compiling validated resources into the configuration one proxy runs from; the
//! output types are in [`types`] (re-exported here).
//!
//! The result is plain data, serialisable for the admin `/config` view. Regular
//! expressions, header names and durations are parsed here, once, so the request path
//! never parses configuration.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use crate::authz::{AuthzPolicy, AuthzRule, DEFAULT_TRUST_DOMAIN, DefaultSource, InboundAuthz};
use crate::error::{ConfigError, ConfigErrors};
use crate::resource::*;
use crate::route::{PathMatcher, RequestMatch, RouteEntry, RouteOrder, RouteTable, ValueMatcher};
use crate::validate::resolve_port;

#[cfg(test)]
mod tests;
mod types;

pub use types::*;

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
    let inbound = p.spec.inbound.as_ref().map(|i| InboundConfig {
        bind: i.bind.value(),
        app_address: i
            .app_address
            .as_ref()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), Parsed::value),
        ports: i.ports.clone(),
        mtls: inbound_mtls(res, &ns, &own_services),
        authz: compile_authz(res, &ns, &own_services, &trust_domain),
        jwt: compile_jwt(res, &ns, &own_services, &mut errors),
        limits: i.limits.unwrap_or_default().or(proxy_limits),
    });
    let mut upstreams = Vec::new();
    for (i, u) in p.spec.outbound.upstreams.iter().enumerate() {
        // Validation refuses an upstream whose service or port is missing; a set
        // that was not validated is refused here, never half-compiled.
        let field = format!("spec.outbound.upstreams[{i}]");
        let Some(svc) = res.find_service(&ns, &u.service) else {
            errors.push(unvalidated(
                p,
                format!("{field}.service"),
                format!("service {:?} does not exist", u.service),
            ));
            continue;
        };
        let port = match resolve_port(svc, u.port.as_ref()) {
            Ok(port) => port,
            Err(reason) => {
                errors.push(unvalidated(p, format!("{field}.port"), reason));
                continue;
            }
        };
        upstreams.push(UpstreamConfig {
            bind: u.bind.value(),
            service: format!("{}.{}", svc.metadata.name, svc.metadata.ns()),
            port: port.port,
            protocol: u.protocol.unwrap_or(port.protocol),
            limits: u.limits.unwrap_or_default().or(proxy_limits),
        });
    }
    let http_proxy = p.spec.outbound.http_proxy.as_ref().map(|h| h.bind.value());
    let tracing = mesh
        .and_then(|m| m.tracing.as_ref())
        .map(|t| TracingConfig {
            endpoint: t.endpoint.url(t.protocol),
            protocol: t.protocol,
            sampling_ratio: t.sampling_ratio.unwrap_or(1.0),
            always_sample_errors: t.always_sample_errors.unwrap_or(true),
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
                .as_ref()
                .map(Parsed::value)
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
    let norm = |v: &[Parsed<UrlPath>]| -> Vec<String> {
        v.iter()
            .map(|p| crate::authz::normalize_path(p.as_str()).into_owned())
            .collect()
    };
    AuthzRule {
        // Matched as written (a peer's id is compared as text).
        principals: from
            .principals
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        principal_prefixes: from
            .principal_prefixes
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        namespaces: from
            .namespaces
            .iter()
            .map(|n| n.as_str().to_owned())
            .collect(),
        request_principals: from
            .request_principals
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        ports: to.ports,
        paths: norm(&to.paths),
        path_prefixes: norm(&to.path_prefixes),
        methods: to.methods.iter().map(|m| m.get().clone()).collect(),
        headers: to
            .headers
            .iter()
            .map(|h| (h.name.get().clone(), h.value.get().clone()))
            .collect(),
        when: r.when.clone(),
    }
}

/// Default time between two fetches of a JWKS URL.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Default tolerance for `exp` and `nbf`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

fn compile_jwt(
    res: &Resources,
    ns: &str,
    own: &[String],
    errors: &mut ConfigErrors,
) -> Vec<JwtRuleConfig> {
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
        for (ri, rule) in ra.spec.jwt_rules.iter().enumerate() {
            let Some(jwks) = compile_jwks(&rule.jwks) else {
                // Validation refuses a rule without keys; an unchecked set gets here,
                // and its rule is refused rather than left out.
                errors.push(
                    ConfigError::new("set exactly one of file, uri, inline")
                        .field(format!("spec.jwtRules[{ri}].jwks"))
                        .resource(format!("RequestAuthentication {rns}/{rname}")),
                );
                continue;
            };
            let from_headers = if rule.from_headers.is_empty() {
                vec![TokenLocation {
                    header: http::header::AUTHORIZATION,
                    prefix: "Bearer ".into(),
                }]
            } else {
                rule.from_headers
                    .iter()
                    .map(|h| TokenLocation {
                        header: h.name.get().clone(),
                        prefix: h.prefix.clone(),
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
                    .map(|f| ForwardClaim {
                        claim: f.claim.clone(),
                        header: f.header.get().clone(),
                    })
                    .collect(),
                forward_original_token: rule.forward_original_token,
                clock_skew: rule
                    .clock_skew
                    .as_ref()
                    .map_or(DEFAULT_CLOCK_SKEW, Parsed::value),
                required_claims: rule.required_claims.clone(),
            });
        }
    }
    targeted.extend(wide);
    targeted
}

fn compile_jwks(j: &JwksSpec) -> Option<JwksSource> {
    if let Some(path) = &j.file {
        return Some(JwksSource::File {
            path: path.as_str().to_owned(),
        });
    }
    if let Some(uri) = &j.uri {
        return Some(JwksSource::Uri {
            uri: uri.get().uri().clone(),
            ca_file: j.ca_file.as_ref().map(|f| f.as_str().to_owned()),
            refresh: j
                .refresh
                .as_ref()
                .map_or(DEFAULT_JWKS_REFRESH, Parsed::value),
        });
    }
    let jwks = j.inline.as_ref()?.get().0.clone();
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
                .map(|w| {
                    let ip = w.spec.address.value();
                    let port = w
                        .spec
                        .ports
                        .get(&sp.name)
                        .copied()
                        .or(sp.target_port)
                        .unwrap_or(sp.port);
                    EndpointConfig {
                        workload: format!("{}/{}", w.metadata.ns(), w.metadata.name),
                        address: SocketAddr::new(ip, port),
                        sidecar: w.spec.sidecar.as_ref().map(|s| SocketAddr::new(ip, s.port)),
                        zone: zone_of(&w.metadata),
                        identity: Some(crate::authz::spiffe_id(
                            trust_domain,
                            w.metadata.ns(),
                            w.spec.service_account(),
                        )),
                    }
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
    for ip in svc.spec.virtual_ip_list().map(Parsed::value) {
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
    let ms = |s: &Option<Parsed<Duration>>, default: u64| {
        s.as_ref().map_or(default, |d| millis(d.value()))
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
                (Some(h), _, _) => Some(HashKey::Header(h.get().as_str().to_owned())),
                (None, Some(c), _) => Some(HashKey::Cookie(c.clone())),
                (None, None, true) => Some(HashKey::SourceIp),
                _ => None,
            }),
        locality_preference: p.locality_preference,
        health_check: p.health_check.as_ref().map(|h| HealthCheckConfig {
            path: h.path.as_ref().map(|p| p.get().clone()),
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
                matches: r.matches.iter().map(compile_match).collect(),
                key: r.key.as_ref().map(|k| match &k.header {
                    Some(h) => RateKey::Header(h.get().as_str().to_owned()),
                    None => RateKey::Identity,
                }),
                requests_per_second: r.requests_per_second,
                burst: r.burst_or_default(),
                global: r.global,
            })
            .collect(),
    }
}

/// Whole milliseconds, saturating (a duration is at most 99999h: it always fits).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
            // `0s` is no timeout.
            let dur = |s: &Option<Parsed<Duration>>| {
                s.as_ref().map(Parsed::value).filter(|d| !d.is_zero())
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
                    grpc_codes: r.grpc_codes.iter().map(|g| g.value().0).collect(),
                    backoff: r
                        .backoff
                        .as_ref()
                        .map_or(Duration::from_millis(25), Parsed::value),
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
                            (Some(d), _) => Some(HedgeConfig::DelayMs(millis(d.value()))),
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
                let matcher = compile_match(m);
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

/// A match's matcher: every value in it was parsed when the document was read.
fn compile_match(m: &HttpRouteMatch) -> RequestMatch {
    let path = match &m.path {
        None => PathMatcher::prefix("/"),
        Some(p) => match (p.kind(), p.pattern()) {
            (_, Some(pattern)) => PathMatcher::RegularExpression(pattern.clone()),
            (PathMatchType::Exact, None) => PathMatcher::Exact(p.value().to_owned()),
            (_, None) => PathMatcher::prefix(p.value()),
        },
    };
    fn value<N: AsRef<str>>(h: &crate::matching::ValueMatch<N>) -> ValueMatcher {
        match h.pattern() {
            Some(pattern) => ValueMatcher::RegularExpression(pattern.clone()),
            None => ValueMatcher::Exact(h.value().to_owned()),
        }
    }
    // Gateway API: of several entries with an equivalent name, only the first counts.
    let mut headers: Vec<(HeaderName, ValueMatcher)> = Vec::new();
    for h in &m.headers {
        if headers.iter().all(|(n, _)| n != h.header()) {
            headers.push((h.header().clone(), value(h)));
        }
    }
    let mut query_params: Vec<(String, ValueMatcher)> = Vec::new();
    for q in &m.query_params {
        if query_params.iter().all(|(n, _)| n != q.name()) {
            query_params.push((q.name().to_owned(), value(q)));
        }
    }
    let method = m.method.as_ref().map(|s| s.get().clone());
    RequestMatch {
        path,
        method,
        headers,
        query_params,
    }
}

fn compile_edits(m: &HeaderModifier) -> HeaderEdits {
    let pairs = |v: &[HeaderValuePair]| {
        v.iter()
            .map(|p| (p.name.get().clone(), p.value.get().clone()))
            .collect()
    };
    HeaderEdits {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.iter().map(|n| n.get().clone()).collect(),
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
                        a.grpc_status.as_ref().map(|g| g.value().0),
                        a.percent,
                    )
                }),
                delay: fault
                    .delay
                    .as_ref()
                    .map(|d| (millis(d.fixed_delay.value()), d.percent)),
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
                hostname: rw.hostname.as_ref().map(|h| h.get().clone()),
                path: rw.path.as_ref().and_then(|p| match p.kind {
                    PathModifierType::ReplaceFullPath => p
                        .replace_full_path
                        .as_ref()
                        .map(|v| PathRewrite::ReplaceFullPath(v.as_str().to_owned())),
                    PathModifierType::ReplacePrefixMatch => p
                        .replace_prefix_match
                        .as_ref()
                        .map(|v| PathRewrite::ReplacePrefixMatch(v.as_str().to_owned())),
                }),
            });
        }
    }
    out
}

/// An error about a reference validation checks (a missing service or port): only a
/// set that skipped [`Resources::check`] gets here.
fn unvalidated(p: &Object<ProxySpec>, field: String, reason: String) -> ConfigError {
    ConfigError::new(reason).field(field).resource(format!(
        "Proxy {}/{}",
        p.metadata.ns(),
        p.metadata.name
    ))
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
