//! `HTTPRoute` documents, and the retry, timeout and filter blocks a `RoutePolicy`
//! shares with them.

use crate::error::ConfigErrors;
use crate::resource::*;
use crate::set::{Checker, Key, Resources};
impl Resources {
    pub(super) fn validate_route(
        &self,
        errors: &mut ConfigErrors,
        k: &Key,
        r: &Object<HttpRouteSpec>,
    ) {
        let mut c = self.checker(errors, "HTTPRoute", k);
        if r.spec.parent_refs.is_empty() {
            c.fail(
                "spec.parentRefs",
                "a route needs at least one parent Service",
            );
        }
        for (i, p) in r.spec.parent_refs.iter().enumerate() {
            let f = format!("spec.parentRefs[{i}]");
            if !core_group(p.group.as_deref()) || p.kind.as_deref().is_some_and(|k| k != "Service")
            {
                c.fail(
                    f.clone(),
                    "only Service parents (group \"\", kind Service) are supported in the mesh",
                );
                continue;
            }
            let ns = p.namespace.as_deref().unwrap_or(&k.0);
            match self.services.get(&(ns.to_owned(), p.name.clone())) {
                None => c.fail(
                    format!("{f}.name"),
                    format!("service {ns}/{} does not exist", p.name),
                ),
                Some(svc) => {
                    if let Some(port) = p.port {
                        match svc.spec.ports.iter().find(|sp| sp.port == port) {
                            None => c.fail(
                                format!("{f}.port"),
                                format!("service {ns}/{} has no port {port}", p.name),
                            ),
                            Some(sp) if !sp.protocol.is_http() => c.fail(
                                format!("{f}.port"),
                                format!(
                                    "port {port} of {ns}/{} is TCP; HTTPRoute needs an HTTP port",
                                    p.name
                                ),
                            ),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        // The HTTP ports of its parents the route serves: a proxy compiles it once
        // for each.
        let mut served: Vec<u16> = Vec::new();
        for p in &r.spec.parent_refs {
            let ns = p.namespace.as_deref().unwrap_or(&k.0);
            if let Some(svc) = self.services.get(&(ns.to_owned(), p.name.clone())) {
                served.extend(
                    svc.spec
                        .ports
                        .iter()
                        .filter(|sp| sp.protocol.is_http() && p.port.is_none_or(|n| n == sp.port))
                        .map(|sp| sp.port),
                );
            }
        }
        served.sort_unstable();
        served.dedup();
        for (ri, rule) in r.spec.rules.iter().enumerate() {
            let f = format!("spec.rules[{ri}]");
            for (mi, m) in rule.matches.iter().enumerate() {
                let mf = format!("{f}.matches[{mi}]");
                // A path (a pattern, or a value starting with '/') was checked when
                // the document was read.
                for (qi, q) in m.query_params.iter().enumerate() {
                    if q.name().is_empty() {
                        c.fail(
                            format!("{mf}.queryParams[{qi}].name"),
                            "name must not be empty",
                        );
                    }
                }
            }
            let all_prefix = !rule.matches.is_empty()
                && rule.matches.iter().all(|m| {
                    m.path
                        .as_ref()
                        .is_none_or(|p| p.kind() == PathMatchType::PathPrefix)
                });
            for (fi, filter) in rule.filters.iter().enumerate() {
                check_filter(&mut c, &format!("{f}.filters[{fi}]"), filter, all_prefix);
            }
            if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
                c.fail(
                    format!("{f}.backendRefs"),
                    "all backend weights are zero: no request could be served",
                );
            }
            for (bi, b) in rule.backend_refs.iter().enumerate() {
                let bf = format!("{f}.backendRefs[{bi}]");
                if !core_group(b.group.as_deref())
                    || b.kind.as_deref().is_some_and(|k| k != "Service")
                {
                    c.fail(bf.clone(), "only Service backends are supported");
                    continue;
                }
                if b.weight > 1_000_000 {
                    c.fail(format!("{bf}.weight"), "weight must be at most 1000000");
                }
                let ns = b.namespace.as_deref().unwrap_or(&k.0);
                if self.services.contains_key(&(ns.to_owned(), b.name.clone())) {
                    // The port on every parent port the route serves, as the proxy
                    // compiles it (a backend without a port takes the parent's).
                    let mut problems: Vec<String> = served
                        .iter()
                        .filter_map(|&pp| crate::compile::backend_port(self, &k.0, b, pp).err())
                        .collect();
                    if served.is_empty() {
                        problems.extend(
                            b.port.and_then(|pp| {
                                crate::compile::backend_port(self, &k.0, b, pp).err()
                            }),
                        );
                    }
                    problems.dedup();
                    for reason in problems {
                        c.fail(format!("{bf}.port"), reason);
                    }
                } else {
                    c.fail(
                        format!("{bf}.name"),
                        format!("service {ns}/{} does not exist", b.name),
                    );
                }
                for (fi, filter) in b.filters.iter().enumerate() {
                    check_filter(&mut c, &format!("{bf}.filters[{fi}]"), filter, all_prefix);
                }
            }
            for (fi, filter) in rule.filters.iter().enumerate() {
                if let Some(m) = &filter.request_mirror {
                    let b = &m.backend_ref;
                    let ns = b.namespace.as_deref().unwrap_or(&k.0);
                    match self.services.get(&(ns.to_owned(), b.name.clone())) {
                        None => c.fail(
                            format!("{f}.filters[{fi}].requestMirror.backendRef.name"),
                            format!("service {ns}/{} does not exist", b.name),
                        ),
                        Some(svc) => {
                            if let Some(port) = b.port
                                && !svc.spec.ports.iter().any(|p| p.port == port)
                            {
                                c.fail(
                                    format!("{f}.filters[{fi}].requestMirror.backendRef.port"),
                                    format!("service {ns}/{} has no port {port}", b.name),
                                );
                            }
                        }
                    }
                }
            }
            if let Some(r) = &rule.retry {
                check_retry(&mut c, &format!("{f}.retry"), r);
            }
            if let Some(t) = &rule.timeouts {
                check_timeouts(&mut c, &format!("{f}.timeouts"), t);
            }
        }
    }
}

/// Checks a `retry` block (of a route rule or a `RoutePolicy`) at field path `f`.
pub(crate) fn check_retry(c: &mut Checker<'_>, f: &str, r: &RetrySpec) {
    for (i, code) in r.codes.iter().flatten().enumerate() {
        if !(100..=599).contains(code) {
            c.fail(
                format!("{f}.codes[{i}]"),
                format!("{code} is not an HTTP status"),
            );
        }
    }
    if let Some(h) = &r.hedge {
        if h.delay.is_some() == h.percentile.is_some() {
            c.fail(
                format!("{f}.hedge"),
                "give exactly one of delay or percentile",
            );
        }
        if h.percentile.is_some_and(|p| !(50.0..100.0).contains(&p)) {
            c.fail(
                format!("{f}.hedge.percentile"),
                "must be at least 50 and below 100",
            );
        }
    }
    if r.attempts.is_some_and(|a| a > 10) {
        c.fail(format!("{f}.attempts"), "at most 10 retries");
    }
    if let Some(ratio) = r.budget.as_ref().and_then(|b| b.ratio)
        && !(0.0..=1.0).contains(&ratio)
    {
        c.fail(format!("{f}.budget.ratio"), "must be between 0 and 1");
    }
}

/// Checks a `timeouts` block (of a route rule or a `RoutePolicy`) at field path `f`.
pub(crate) fn check_timeouts(c: &mut Checker<'_>, f: &str, t: &HttpRouteTimeouts) {
    if let (Some(r), Some(b)) = (&t.request, &t.backend_request)
        && !r.is_zero()
        && (b.is_zero() || b.get() > r.get())
    {
        c.fail(
            format!("{f}.backendRequest"),
            "must not exceed timeouts.request",
        );
    }
}

pub(crate) fn core_group(g: Option<&str>) -> bool {
    matches!(g, None | Some("") | Some("core"))
}

pub(crate) fn check_filter(
    c: &mut Checker<'_>,
    f: &str,
    filter: &HttpRouteFilter,
    all_prefix: bool,
) {
    let present = [
        (
            FilterType::RequestHeaderModifier,
            filter.request_header_modifier.is_some(),
            "requestHeaderModifier",
        ),
        (
            FilterType::ResponseHeaderModifier,
            filter.response_header_modifier.is_some(),
            "responseHeaderModifier",
        ),
        (
            FilterType::UrlRewrite,
            filter.url_rewrite.is_some(),
            "urlRewrite",
        ),
        (
            FilterType::RequestMirror,
            filter.request_mirror.is_some(),
            "requestMirror",
        ),
        (FilterType::Fault, filter.fault.is_some(), "fault"),
    ];
    if let Some(m) = &filter.request_mirror
        && m.percent.is_some_and(|p| p > 100)
    {
        c.fail(format!("{f}.requestMirror.percent"), "must be 0-100");
    }
    if let Some(fault) = &filter.fault {
        if fault.abort.is_none() && fault.delay.is_none() {
            c.fail(format!("{f}.fault"), "give abort, delay or both");
        }
        if let Some(a) = &fault.abort {
            if !(0.0..=100.0).contains(&a.percent) {
                c.fail(format!("{f}.fault.abort.percent"), "must be 0-100");
            }
            match (a.http_status, &a.grpc_status) {
                (None, None) => c.fail(
                    format!("{f}.fault.abort"),
                    "give httpStatus, grpcStatus or both",
                ),
                (Some(s), _) if !(200..=599).contains(&s) => c.fail(
                    format!("{f}.fault.abort.httpStatus"),
                    format!("{s} is not an HTTP status (200-599)"),
                ),
                _ => {}
            }
        }
        if let Some(d) = &fault.delay
            && !(0.0..=100.0).contains(&d.percent)
        {
            c.fail(format!("{f}.fault.delay.percent"), "must be 0-100");
        }
    }
    for (kind, is_set, field) in present {
        if kind == filter.kind && !is_set {
            c.fail(
                format!("{f}.{field}"),
                format!("type {:?} needs {field}", filter.kind),
            );
        }
        if kind != filter.kind && is_set {
            c.fail(
                format!("{f}.{field}"),
                format!("{field} is not allowed with type {:?}", filter.kind),
            );
        }
    }
    // The hostname and the paths were parsed when the document was read; what is
    // left is which of the path fields the type needs.
    if let Some(p) = filter.url_rewrite.as_ref().and_then(|rw| rw.path.as_ref()) {
        let (value, other, field) = match p.kind {
            PathModifierType::ReplaceFullPath => (
                &p.replace_full_path,
                &p.replace_prefix_match,
                "replaceFullPath",
            ),
            PathModifierType::ReplacePrefixMatch => (
                &p.replace_prefix_match,
                &p.replace_full_path,
                "replacePrefixMatch",
            ),
        };
        if value.is_none() {
            c.fail(
                format!("{f}.urlRewrite.path.{field}"),
                format!("type {:?} needs {field}", p.kind),
            );
        }
        if other.is_some() {
            c.fail(
                format!("{f}.urlRewrite.path"),
                format!("only {field} is allowed with type {:?}", p.kind),
            );
        }
        if p.kind == PathModifierType::ReplacePrefixMatch && !all_prefix {
            c.fail(
                format!("{f}.urlRewrite.path"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
            );
        }
    }
}

/// Finds a service port by name or number; with none given, the service's only port.
pub fn resolve_port<'a>(
    svc: &'a Object<ServiceSpec>,
    port: Option<&PortRef>,
) -> Result<&'a ServicePort, String> {
    let m = &svc.metadata;
    match port {
        Some(PortRef::Number(n)) => svc
            .spec
            .ports
            .iter()
            .find(|p| p.port == *n)
            .ok_or_else(|| format!("service {}/{} has no port {n}", m.ns(), m.name)),
        Some(PortRef::Name(n)) => svc
            .spec
            .ports
            .iter()
            .find(|p| &p.name == n)
            .ok_or_else(|| format!("service {}/{} has no port named {n:?}", m.ns(), m.name)),
        None => match svc.spec.ports.as_slice() {
            [only] => Ok(only),
            _ => Err(format!(
                "service {}/{} has several ports; name one",
                m.ns(),
                m.name
            )),
        },
    }
}
