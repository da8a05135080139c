//! What an outbound request is to do, decided from its head and the configuration
//! snapshot alone: no I/O, no clock, no randomness (the caller passes its draw).
//!
//! [`route`] picks the rule and the backend; the caller then picks the endpoint
//! (from the head as it arrived: a hash key must not see the filters' edits), and
//! [`plan`] applies the filters to the head and picks the app protocol, the
//! timeout, the faults, the retry policy and the mirror. The send loop
//! ([`super::send`]) carries the plan out. Everything is borrowed from the snapshot
//! the request holds: a plan allocates only what the filters rewrite.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request};
use sinew_model::ProxyConfig;
use sinew_model::compile::{
    BackendConfig, FaultConfig, Filters, MirrorConfig, PortConfig, RetryConfig, RuleConfig,
};
use sinew_model::resource::Protocol;
use sinew_model::route::RequestView;

use crate::error::ProxyError;
use crate::http_util::{self, DST_PORT, ORIG_PROTO};
use crate::resilience;

/// Headers a client must not send: they steer the peer sidecar.
pub(super) static MESH_HEADERS: [HeaderName; 2] = [DST_PORT, ORIG_PROTO];

/// The rule a request matched and the backend it goes to.
#[derive(Debug)]
pub(super) struct Route<'s> {
    /// The matched rule.
    pub rule: &'s Arc<RuleConfig>,
    /// The backend picked by weight.
    pub backend: &'s BackendConfig,
    /// How much of the path the rule's prefix matched (for prefix rewrites).
    pub prefix_len: Option<usize>,
}

/// Matches `req` against `port`'s routes and picks a backend by weight: `draw`
/// gets the rule's total weight and returns a number below it.
#[inline]
pub(super) fn route<'s, B>(
    port: &'s PortConfig,
    req: &Request<B>,
    draw: impl FnOnce(u64) -> u64,
) -> Result<Route<'s>, ProxyError> {
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let entry = port.routes.select(&view).ok_or(ProxyError::NoRoute)?;
    let rule = &entry.rule;
    let backend = rule.pick_backend(draw(rule.total_weight.max(1)));
    Ok(Route {
        rule,
        backend,
        prefix_len: entry.matcher.path.prefix_len(),
    })
}

/// What to do with a routed request, once its head has been filtered.
#[derive(Debug)]
pub(super) struct Plan<'s> {
    /// Whether the request is a gRPC call.
    pub grpc: bool,
    /// Whether the application is spoken to in HTTP/2.
    pub app_h2: bool,
    /// The authority to send, after host rewrites.
    pub authority: Authority,
    /// The path and query to send, when a filter rewrote them.
    pub new_path: Option<PathAndQuery>,
    /// An HTTP/1.1 upgrade or an extended CONNECT: a dedicated connection.
    pub upgrade: bool,
    /// The whole request's time: the route's timeout, or less if the caller arrived
    /// with one.
    pub timeout: Option<Duration>,
    /// Faults to inject, the rule's then the backend's (each drawn for on its own).
    pub faults: [Option<&'s FaultConfig>; 2],
    /// A safe method (RFC 9110 §9.2.1): tried once more when its endpoint crashed.
    pub safe: bool,
    /// The rule's retry policy, when it applies to this request.
    pub retry: Option<&'s RetryConfig>,
    /// Where to mirror the request, before its percentage is drawn.
    pub mirror: Option<&'s MirrorConfig>,
}

/// Filters `req`'s head (the rule's filters, then the backend's) and plans the rest.
/// `authority` is the one parsed from the head (routing used it); `port` is the
/// port the request arrived for, whose protocol applies when the backend's port is
/// not in the configuration.
#[inline]
pub(super) fn plan<'s, B>(
    config: &ProxyConfig,
    port: &PortConfig,
    route: &Route<'s>,
    req: &mut Request<B>,
    authority: Option<Authority>,
) -> Result<Plan<'s>, ProxyError> {
    let (rule, backend) = (route.rule, route.backend);
    let protocol = config
        .service(&backend.service)
        .and_then(|s| s.port(backend.port))
        .map_or(port.protocol, |p| p.protocol);
    // A client must not be able to steer the peer sidecar.
    http_util::remove_headers(req.headers_mut(), &MESH_HEADERS);
    let mut authority = authority.ok_or(ProxyError::Malformed("no Host header or absolute URI"))?;
    let mut new_path: Option<PathAndQuery> = None;
    for filters in [&rule.filters, &backend.filters] {
        apply_request_filters(
            filters,
            req,
            &mut authority,
            &mut new_path,
            route.prefix_len,
        )?;
    }
    let upgrade = http_util::is_upgrade(req) || http_util::is_extended_connect(req);
    let grpc = http_util::is_grpc(req.headers());
    let timeout = [
        rule.request_timeout,
        resilience::incoming_timeout(req.headers()),
    ]
    .into_iter()
    .flatten()
    .min();
    let retry = rule.retry.as_ref().filter(|r| {
        r.non_idempotent
                || resilience::idempotent(req.method())
                // gRPC calls are all POSTs: naming gRPC statuses opts them in.
                || (!r.grpc_codes.is_empty() && grpc)
    });
    Ok(Plan {
        grpc,
        // The app's protocol comes from the app, not the caller: a port declared
        // `HTTP` is spoken to in HTTP/1.1 (what every HTTP server understands), even
        // to an HTTP/2 caller; `HTTP2`/`GRPC` ports, and gRPC calls (HTTP/2 only),
        // in HTTP/2.
        app_h2: app_speaks_h2(protocol, grpc),
        authority,
        new_path,
        upgrade,
        timeout,
        faults: [rule.filters.fault.as_ref(), backend.filters.fault.as_ref()],
        safe: matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ),
        retry,
        mirror: [&rule.filters, &backend.filters]
            .into_iter()
            .find_map(|f| f.mirror.as_ref()),
    })
}

/// Whether the application behind a port of `protocol` is spoken to in HTTP/2.
pub(super) fn app_speaks_h2(protocol: Protocol, grpc: bool) -> bool {
    grpc || matches!(protocol, Protocol::Http2 | Protocol::Grpc)
}

fn apply_request_filters<B>(
    filters: &Filters,
    req: &mut Request<B>,
    authority: &mut Authority,
    new_path: &mut Option<PathAndQuery>,
    prefix_len: Option<usize>,
) -> Result<(), ProxyError> {
    if filters.is_empty() {
        return Ok(());
    }
    if let Some(edits) = &filters.request_headers {
        edits.apply(req.headers_mut());
    }
    if let Some(rw) = &filters.rewrite {
        if let Some(h) = &rw.hostname {
            // Parsed when the route was read.
            authority.clone_from(h);
        }
        if let Some(p) = &rw.path {
            let current = new_path
                .as_ref()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.path().to_owned());
            let mut rewritten = p.apply(&current, prefix_len);
            if let Some(q) = req.uri().query() {
                rewritten.push('?');
                rewritten.push_str(q);
            }
            *new_path = Some(
                PathAndQuery::try_from(rewritten)
                    .map_err(|_| ProxyError::Malformed("rewritten path is invalid"))?,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http::HeaderValue;

    /// A client proxy whose binding goes to `catalog`, with a route of two rules:
    /// `/api` (edits, a rewrite, a timeout, a weighted split to an HTTP and a gRPC
    /// service) and `/chaos` (a fault, a mirror and a retry policy).
    const MESH: &str = r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: client, namespace: shop}
spec:
  outbound:
    upstreams: [{bind: "127.0.0.1:9000", service: catalog}]
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  ports: [{name: main, port: 80, protocol: HTTP}]
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2, namespace: shop}
spec:
  ports: [{name: main, port: 80, protocol: GRPC}]
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: shadow, namespace: shop}
spec:
  ports: [{name: main, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edits, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      timeouts: {request: 5s}
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-env, value: prod}]
            remove: [x-secret]
        - type: URLRewrite
          urlRewrite:
            hostname: internal.catalog
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
      backendRefs: [{name: catalog, weight: 80}, {name: catalog-v2, weight: 20}]
    - matches: [{path: {value: /chaos}}]
      filters:
        - {type: Fault, fault: {abort: {httpStatus: 503, percent: 30}}}
        - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}
      retry: {attempts: 2, backoff: 1ms, budget: {ratio: 1.0}}
"#;

    fn config() -> ProxyConfig {
        sinew_model::compile::compile_text("m.yaml", MESH, Some("shop/client")).unwrap()
    }

    /// The port the binding forwards to, as `forward` finds it.
    fn port(config: &ProxyConfig) -> &PortConfig {
        let up = &config.upstreams[0];
        let svc = config.service(&up.service).expect("the binding's service");
        svc.port(up.port).expect("the binding's port")
    }

    fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "catalog");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("a valid request")
    }

    fn authority(req: &Request<()>) -> Option<Authority> {
        http_util::authority(req)
    }

    #[test]
    fn the_route_is_matched_and_the_backend_picked_by_the_draw() {
        let config = config();
        let port = port(&config);
        let req = request(Method::GET, "/api/items", &[]);
        let mut total = 0;
        let r = route(port, &req, |t| {
            total = t;
            0
        })
        .expect("routed");
        assert_eq!(total, 100, "the draw is over the rule's total weight");
        assert_eq!(&*r.rule.route, "shop/edits");
        assert_eq!(r.backend.service, "catalog.shop");
        assert_eq!(r.prefix_len, Some(4));
        // 80 and above falls on the second backend (weight 20).
        let r = route(port, &req, |_| 85).expect("routed");
        assert_eq!(r.backend.service, "catalog-v2.shop");
        let r = route(port, &req, |_| 79).expect("routed");
        assert_eq!(r.backend.service, "catalog.shop");
    }

    #[test]
    fn a_request_no_rule_matches_has_no_route() {
        let config = config();
        let req = request(Method::GET, "/elsewhere", &[]);
        let err = route(port(&config), &req, |_| 0).expect_err("no rule matches /elsewhere");
        assert!(matches!(err, ProxyError::NoRoute), "{err:?}");
    }

    #[test]
    fn filters_edit_the_head_and_mesh_headers_are_dropped() {
        let config = config();
        let port = port(&config);
        let mut req = request(
            Method::GET,
            "/api/items?page=2",
            &[
                ("x-env", "dev"),
                ("x-secret", "s3cr3t"),
                ("sinew-dst-port", "9999"),
                ("sinew-orig-proto", "HTTP/1.1"),
            ],
        );
        let r = route(port, &req, |_| 0).expect("routed");
        let parsed = authority(&req);
        let p = plan(&config, port, &r, &mut req, parsed).expect("planned");
        let h = req.headers();
        assert_eq!(h.get("x-env"), Some(&HeaderValue::from_static("prod")));
        assert!(h.get("x-secret").is_none());
        assert!(h.get(DST_PORT).is_none() && h.get(ORIG_PROTO).is_none());
        assert_eq!(p.authority.as_str(), "internal.catalog");
        assert_eq!(
            p.new_path.as_ref().map(|p| p.as_str()),
            Some("/v2/items?page=2")
        );
        assert!(
            !p.upgrade && !p.grpc && !p.app_h2,
            "an HTTP port is spoken HTTP/1.1"
        );
        assert_eq!(p.timeout, Some(Duration::from_secs(5)));
        assert!(p.retry.is_none() && p.mirror.is_none());
        assert_eq!(p.faults, [None, None]);
        assert!(p.safe);
    }

    #[test]
    fn the_backend_port_sets_the_protocol_and_the_caller_may_shorten_the_timeout() {
        let config = config();
        let port = port(&config);
        let mut req = request(Method::POST, "/api/items", &[("sinew-timeout-ms", "250")]);
        let r = route(port, &req, |_| 99).expect("routed");
        assert_eq!(r.backend.service, "catalog-v2.shop");
        let parsed = authority(&req);
        let p = plan(&config, port, &r, &mut req, parsed).expect("planned");
        assert!(p.app_h2, "a GRPC port is spoken HTTP/2");
        assert_eq!(p.timeout, Some(Duration::from_millis(250)));
        assert!(!p.safe);
    }

    #[test]
    fn faults_mirrors_and_the_retry_policy_are_picked() {
        let config = config();
        let port = port(&config);
        let mut req = request(Method::GET, "/chaos", &[]);
        let r = route(port, &req, |_| 0).expect("routed");
        let parsed = authority(&req);
        let p = plan(&config, port, &r, &mut req, parsed).expect("planned");
        let fault = p.faults[0].expect("the rule's fault");
        assert_eq!(fault.abort, Some((Some(503), None, 30.0)));
        assert!(fault.delay.is_none() && p.faults[1].is_none());
        let mirror = p.mirror.expect("the rule's mirror");
        assert_eq!(
            (mirror.service.as_str(), mirror.percent),
            ("shadow.shop", 100)
        );
        assert_eq!(p.retry.map(|r| r.retries), Some(2));
        assert_eq!(p.timeout, None);

        // A POST is not idempotent: the policy does not apply to it (the fault and
        // the mirror still do).
        let mut req = request(Method::POST, "/chaos", &[]);
        let parsed = authority(&req);
        let p = plan(&config, port, &r, &mut req, parsed).expect("planned");
        assert!(p.retry.is_none());
        assert!(p.faults[0].is_some() && p.mirror.is_some());
        // A gRPC POST is not either, unless the policy names gRPC statuses.
        let mut req = request(
            Method::POST,
            "/chaos",
            &[("content-type", "application/grpc")],
        );
        let parsed = authority(&req);
        let p = plan(&config, port, &r, &mut req, parsed).expect("planned");
        assert!(p.grpc && p.app_h2 && p.retry.is_none());
    }

    #[test]
    fn a_request_without_an_authority_is_malformed() {
        let config = config();
        let port = port(&config);
        let mut req = Request::get("/api/items")
            .body(())
            .expect("a valid request");
        let r = route(port, &req, |_| 0).expect("routed");
        let err = plan(&config, port, &r, &mut req, None).expect_err("no authority");
        assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn an_upgrade_is_planned_as_one() {
        let config = config();
        let port = port(&config);
        let mut req = request(
            Method::GET,
            "/api/ws",
            &[("connection", "upgrade"), ("upgrade", "websocket")],
        );
        let r = route(port, &req, |_| 0).expect("routed");
        let parsed = authority(&req);
        let p = plan(&config, port, &r, &mut req, parsed).expect("planned");
        assert!(p.upgrade);
    }
}
