//! Model tests: parsing with locations, validation, precedence, rewrites, names.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use http::{HeaderMap, HeaderValue, Method};
use sinew_model::compile::{PathRewrite, compile_text};
use sinew_model::route::RequestView;

const BASE: &str = r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: web-1, namespace: shop}
spec:
  outbound:
    upstreams:
      - {bind: "127.0.0.1:9001", service: catalog, port: http}
    httpProxy: {bind: "127.0.0.1:4140"}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: catalog-1, namespace: shop, labels: {version: v1}}
spec: {service: catalog, address: 127.0.0.1, ports: {http: 8080}}
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: catalog-2, namespace: shop, labels: {version: v2}}
spec: {service: catalog-v2, address: 127.0.0.1, ports: {http: 8081}, sidecar: {port: 4143}}
"#;

fn view<'a>(
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
) -> RequestView<'a> {
    RequestView {
        method,
        path,
        query,
        headers,
    }
}

#[test]
fn compiles_services_endpoints_and_names() {
    let cfg = compile_text("mesh.yaml", BASE, None).unwrap();
    assert_eq!(cfg.namespace, "shop");
    assert_eq!(cfg.upstreams.len(), 1);
    assert_eq!(cfg.upstreams[0].service, "catalog.shop");
    for name in [
        "catalog",
        "catalog.shop",
        "catalog.shop.svc",
        "Catalog.Shop.svc.cluster.local",
        "catalog.shop.",
    ] {
        assert_eq!(
            cfg.resolve_service(name).map(|s| s.key.to_string()),
            Some("catalog.shop".to_owned()),
            "{name}"
        );
    }
    assert!(cfg.resolve_service("nope").is_none());
    let v2 = cfg.service("catalog-v2.shop").unwrap();
    let ep = &v2.ports[0].endpoints[0];
    assert_eq!(ep.address.port(), 8081);
    assert_eq!(ep.sidecar.map(|s| s.port()), Some(4143));
    // No route attached: the implicit default rule sends everything to the service.
    let headers = HeaderMap::new();
    let m = Method::GET;
    let e = cfg.service("catalog.shop").unwrap().ports[0]
        .routes
        .select(&view(&m, "/x", None, &headers))
        .unwrap();
    assert_eq!(&*e.rule.route, "default");
    // The snapshot serialises for /config.
    let json = serde_json_like(&cfg);
    assert!(json.contains("catalog.shop"));
}

fn serde_json_like(cfg: &sinew_model::ProxyConfig) -> String {
    // serde_norway is a serializer too; enough to prove Serialize works.
    serde_norway::to_string(cfg).unwrap()
}

#[test]
fn gateway_api_precedence() {
    let routes = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-route, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: catalog, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: catalog, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /api/v2/}}]
      backendRefs: [{name: catalog-v2, port: 80}]
    - matches: [{path: {type: Exact, value: /api/v2/special}}]
    - matches: [{path: {type: RegularExpression, value: "/api/v[0-9]+/items/[0-9]+"}}]
    - matches: [{path: {type: PathPrefix, value: /h}, headers: [{name: x-canary, value: "true"}]}]
      backendRefs: [{name: catalog-v2}]
    - matches: [{path: {type: PathPrefix, value: /h}, method: POST}]
    - matches: [{path: {type: PathPrefix, value: /h}, queryParams: [{name: v, type: RegularExpression, value: "2|3"}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-route, namespace: shop}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
"#;
    let cfg = compile_text("mesh.yaml", &format!("{BASE}{routes}"), None).unwrap();
    let table = &cfg.service("catalog.shop").unwrap().ports[0].routes;
    let pick = |method: Method, path: &str, query: Option<&str>, hdrs: &[(&'static str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        table
            .select(&view(&method, path, query, &h))
            .map(|e| (e.rule.route.clone(), e.rule.rule))
    };
    // Exact beats every prefix.
    assert_eq!(
        pick(Method::GET, "/api/v2/special", None, &[]),
        Some(("shop/b-route".into(), 2))
    );
    // Longest prefix wins.
    assert_eq!(
        pick(Method::GET, "/api/v2/x", None, &[]),
        Some(("shop/b-route".into(), 1))
    );
    // Equal prefixes: alphabetical namespace/name decides (no timestamps).
    assert_eq!(
        pick(Method::GET, "/api/x", None, &[]),
        Some(("shop/a-route".into(), 0))
    );
    // Prefix is element-wise.
    assert_eq!(pick(Method::GET, "/apix", None, &[]), None);
    // Regex comes after prefixes: /api/v1/items/7 matches prefix /api first.
    assert_eq!(
        pick(Method::GET, "/api/v1/items/7", None, &[]),
        Some(("shop/a-route".into(), 0))
    );
    // Method beats header and query matches at equal path.
    assert_eq!(
        pick(Method::POST, "/h", Some("v=2"), &[("x-canary", "true")]),
        Some(("shop/b-route".into(), 5))
    );
    // Header count beats query count.
    assert_eq!(
        pick(Method::GET, "/h", Some("v=2"), &[("x-canary", "true")]),
        Some(("shop/b-route".into(), 4))
    );
    assert_eq!(
        pick(Method::GET, "/h", Some("v=3"), &[]),
        Some(("shop/b-route".into(), 6))
    );
    assert_eq!(pick(Method::GET, "/h", Some("v=4"), &[]), None);
    // Backend port defaults to the parent port.
    let rule4 = pick(Method::GET, "/h", None, &[("x-canary", "true")]);
    assert!(rule4.is_some());
}

#[test]
fn rewrite_prefix_semantics() {
    let p = PathRewrite::ReplacePrefixMatch("/v2".into());
    assert_eq!(p.apply("/api/items", Some(4)), "/v2/items");
    assert_eq!(p.apply("/api", Some(4)), "/v2");
    let root = PathRewrite::ReplacePrefixMatch("/".into());
    assert_eq!(root.apply("/api/items", Some(4)), "/items");
    assert_eq!(root.apply("/api", Some(4)), "/");
    let slash = PathRewrite::ReplacePrefixMatch("/new/".into());
    assert_eq!(slash.apply("/api/x", Some(4)), "/new/x");
    assert_eq!(
        PathRewrite::ReplaceFullPath("/f".into()).apply("/a/b", None),
        "/f"
    );
}

#[test]
fn errors_name_file_line_field_and_reason() {
    let bad = r#"
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: broken, namespace: shop}
spec:
  ports:
    - name: http
      port: 80
      protcol: HTTP
"#;
    let err = compile_text("mesh.yaml", &format!("{BASE}{bad}"), None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("mesh.yaml:"), "{msg}");
    assert!(msg.contains("spec.ports[0]"), "{msg}");
    assert!(msg.contains("protcol"), "{msg}");
    let e = &err.0[0];
    let text = format!("{BASE}{bad}");
    let want = text.lines().position(|l| l.contains("protcol")).unwrap() + 1;
    assert_eq!(e.line, Some(want), "{msg}");
    assert_eq!(e.field.as_deref(), Some("spec.ports[0].protcol"));
    assert!(e.reason.starts_with("unknown field `protcol`"), "{msg}");
}

#[test]
fn refuses_bad_references_regexes_weights_and_duplicates() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: search, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n  serviceAccounts: [catalog, Not_An_Account]\n",
            "spec.serviceAccounts[1]",
            "is not a service account name",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: ghost}]\n",
            "spec.parentRefs[0].name",
            "does not exist",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - matches: [{path: {type: RegularExpression, value: \"/(unclosed\"}}]\n",
            "spec.rules[0].matches[0].path.value",
            "invalid regular expression",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: catalog, weight: 0}, {name: catalog-v2, weight: 0}]\n",
            "spec.rules[0].backendRefs",
            "all backend weights are zero",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n",
            "metadata.name",
            "duplicate Service shop/catalog",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Gizmo\nmetadata: {name: g}\nspec: {}\n",
            "kind",
            "unknown kind",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - timeouts: {request: 10 seconds}\n",
            "spec.rules[0].timeouts.request",
            "invalid duration",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec: {service: catalog, address: not-an-ip}\n",
            "spec.address",
            "not an IP address",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: catalog}\n  circuitBreaker: {maxPendingRequestsPerEndpoint: 5}\n",
            "spec.circuitBreaker.maxPendingRequestsPerEndpoint",
            "set maxConnectionsPerEndpoint too",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: catalog}\n  rateLimits: [{name: all, requestsPerSecond: 0, global: true}]\n",
            "spec.rateLimits[0].requestsPerSecond",
            "must be more than zero",
        ),
    ];
    for (doc, field, reason) in cases {
        let text = format!("{BASE}---\n{doc}");
        let err = compile_text("mesh.yaml", &text, None).expect_err(doc);
        let hit = err.0.iter().find(|e| e.field.as_deref() == Some(*field));
        let e = hit.unwrap_or_else(|| panic!("expected an error at {field}, got: {err}"));
        assert!(e.reason.contains(reason), "{field}: {}", e.reason);
        assert_eq!(e.file.as_deref(), Some("mesh.yaml"));
        assert!(
            e.line.is_some_and(|l| l > BASE.lines().count()),
            "line of {field}: {:?}",
            e.line
        );
    }
}

#[test]
fn yaml_syntax_errors_carry_the_line() {
    let err = compile_text("x.yaml", "kind: Service\nmetadata: {name: [\n", None).unwrap_err();
    assert!(err.to_string().starts_with("x.yaml:"), "{err}");
    assert!(err.to_string().contains("invalid YAML"), "{err}");
}

#[test]
fn capture_and_virtual_ips_are_validated() {
    let base = "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec:\n  virtualIP: 10.96.0.1\n  ports: [{name: http, port: 80}]\n";
    let ok = format!(
        "{base}---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  capture: {{opaquePorts: [3306], detectTimeout: 250ms, dnsPort: 15053}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n  virtualIPRange: 10.96.0.0/12\n"
    );
    let cfg = compile_text("mesh.yaml", &ok, None)
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
    let cap = cfg.capture.as_ref().unwrap();
    assert_eq!((cap.outbound_port, cap.inbound_port), (15001, 15006));
    assert_eq!(cap.detect_timeout, std::time::Duration::from_millis(250));
    assert_eq!(cap.opaque_ports, vec![3306]);
    assert_eq!(cfg.egress, sinew_model::resource::EgressMode::RegistryOnly);
    assert_eq!(
        cfg.service("a.shop").and_then(|s| s.virtual_ip),
        "10.96.0.1".parse().ok()
    );
    // Dual-stack: both addresses, the first one as `virtual_ip`; the same address
    // written twice in one service is one address.
    let dual = "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: d, namespace: shop}\nspec:\n  virtualIP: 10.96.0.9\n  virtualIPs: [10.96.0.9, 'fd00::9']\n  ports: [{name: http, port: 80}]\n";
    let dual = format!(
        "{dual}---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p, namespace: shop}}\nspec: {{capture: {{}}}}\n"
    );
    let cfg = compile_text("dual.yaml", &dual, None)
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
    let d = cfg.service("d.shop").unwrap();
    assert_eq!(d.virtual_ip, "10.96.0.9".parse().ok());
    let both: Vec<std::net::IpAddr> =
        vec!["10.96.0.9".parse().unwrap(), "fd00::9".parse().unwrap()];
    assert_eq!(d.virtual_ips, both);

    let proxy = |capture: &str| {
        format!(
            "apiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  capture: {capture}\n"
        )
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec:\n  virtualIP: 10.96.0.1\n  ports: [{name: http, port: 80}]\n".into(),
            "spec.virtualIP",
            "already the virtual IP of service shop/a",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec:\n  virtualIP: ten.0.0.1\n  ports: [{name: http, port: 80}]\n".into(),
            "spec.virtualIP",
            "not an IP address",
        ),
        // A dual-stack service's second address, claimed by another service.
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec:\n  virtualIPs: ['fd00::1', 10.96.0.1]\n  ports: [{name: http, port: 80}]\n".into(),
            "spec.virtualIPs[1]",
            "10.96.0.1 is already the virtual IP of service shop/a",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec:\n  virtualIP: 10.96.0.2\n  virtualIPs: [nope]\n  ports: [{name: http, port: 80}]\n".into(),
            "spec.virtualIPs[0]",
            "not an IP address",
        ),
        (proxy("{detectTimeout: soon}"), "spec.capture.detectTimeout", "invalid duration"),
        (proxy("{detectTimeout: 0s}"), "spec.capture.detectTimeout", "more than zero"),
        (proxy("{inboundPort: 15001}"), "spec.capture.inboundPort", "also the outboundPort"),
        (proxy("{outboundPort: 0}"), "spec.capture.outboundPort", "1-65535"),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {name: p, namespace: shop}\nspec:\n  capture: {}\n  outbound: {httpProxy: {bind: \"127.0.0.1:15001\"}}\n".into(),
            "spec.capture.outboundPort",
            "already used",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  virtualIPRange: 10.96.0.0/40\n".into(),
            "spec.virtualIPRange",
            "prefix",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  outboundTrafficPolicy: {mode: CLOSED}\n".into(),
            "spec.outboundTrafficPolicy.mode",
            "unknown variant",
        ),
    ];
    for (doc, field, reason) in &cases {
        let text = format!("{base}---\n{doc}");
        let err = compile_text("mesh.yaml", &text, Some("shop/p")).expect_err(doc);
        let hit = err.0.iter().find(|e| e.field.as_deref() == Some(*field));
        let e = hit.unwrap_or_else(|| panic!("expected an error at {field}, got: {err}"));
        assert!(e.reason.contains(reason), "{field}: {}", e.reason);
    }
}

/// What a proxy refuses when it compiles (a backend without a port takes its parent's
/// port, which the backend may not have) is refused by validation alone, which is
/// what a control plane runs on every apply: it never accepts what proxies NACK.
#[test]
fn validation_refuses_what_compilation_would() {
    let cases: &[(&str, &str, &str)] = &[
        (
            // catalog serves 80; the backend has only 9090.
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: other, namespace: shop}\nspec:\n  ports: [{name: http, port: 9090}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: other}]\n",
            "spec.rules[0].backendRefs[0].port",
            "service shop/other has no port 80 (the port defaults to the parent's port 80",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: catalog-v2, port: 9999}]\n",
            "spec.rules[0].backendRefs[0].port",
            "service shop/catalog-v2 has no port 9999",
        ),
    ];
    for (doc, field, reason) in cases {
        let text = format!("{BASE}---\n{doc}");
        let docs = sinew_model::parse_documents("mesh.yaml", &text).unwrap();
        // Not compiled: the set's own check must find it.
        let err = sinew_model::Resources::from_documents(docs).expect_err(doc);
        let e = err
            .0
            .iter()
            .find(|e| e.field.as_deref() == Some(*field))
            .unwrap_or_else(|| panic!("expected an error at {field}, got: {err}"));
        assert!(e.reason.contains(reason), "{field}: {}", e.reason);
        assert_eq!(e.resource.as_deref(), Some("HTTPRoute shop/r"), "{err}");
    }
}

/// An invalid TrafficPolicy claims no Service: the valid one for the same Service
/// stands, whatever the names' order; of two valid ones the first by name wins.
#[test]
fn an_invalid_traffic_policy_claims_nothing() {
    let policy = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: catalog}}\n{extra}"
        )
    };
    let bad = "  circuitBreaker: {maxRequests: 0}\n";
    let good = "  circuitBreaker: {maxRequests: 100}\n";
    for (first, second) in [
        (("a-bad", bad), ("b-good", good)),
        (("a-good", good), ("b-bad", bad)),
    ] {
        let text = format!(
            "{BASE}{}{}",
            policy(first.0, first.1),
            policy(second.0, second.1)
        );
        let docs = sinew_model::parse_documents("mesh.yaml", &text).unwrap();
        let err = sinew_model::Resources::from_documents(docs).unwrap_err();
        let blamed: Vec<_> = err.0.iter().filter_map(|e| e.resource.clone()).collect();
        let bad_name = if first.1 == bad { first.0 } else { second.0 };
        assert_eq!(
            blamed,
            vec![format!("TrafficPolicy shop/{bad_name}")],
            "only the invalid one is blamed: {err}"
        );
    }
    let text = format!("{BASE}{}{}", policy("a", good), policy("b", good));
    let docs = sinew_model::parse_documents("mesh.yaml", &text).unwrap();
    let err = sinew_model::Resources::from_documents(docs).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].resource.as_deref(), Some("TrafficPolicy shop/b"));
    assert!(
        err.0[0].reason.contains("already has TrafficPolicy a"),
        "{err}"
    );
}

/// An invalid Service claims no virtual IP: a valid one with the same address stands.
#[test]
fn an_invalid_service_claims_no_virtual_ip() {
    let svc = |name: &str, ports: &str| {
        format!(
            "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  virtualIP: 10.96.0.10\n  ports: {ports}\n"
        )
    };
    let text = format!(
        "{BASE}{}{}",
        svc("a-bad", "[]"),
        svc("b-good", "[{name: http, port: 80}]")
    );
    let docs = sinew_model::parse_documents("mesh.yaml", &text).unwrap();
    let err = sinew_model::Resources::from_documents(docs).unwrap_err();
    let blamed: Vec<_> = err.0.iter().filter_map(|e| e.resource.clone()).collect();
    assert_eq!(blamed, vec!["Service shop/a-bad".to_owned()], "{err}");
    let text = format!(
        "{BASE}{}{}",
        svc("a", "[{name: http, port: 80}]"),
        svc("b", "[{name: http, port: 80}]")
    );
    let docs = sinew_model::parse_documents("mesh.yaml", &text).unwrap();
    let err = sinew_model::Resources::from_documents(docs).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert!(
        err.0[0]
            .reason
            .contains("10.96.0.10 is already the virtual IP of service shop/a"),
        "{err}"
    );
}
