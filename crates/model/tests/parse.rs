//! Parse, don't validate: typed document fields refuse bad text when the document is
//! read (with the field's path, line and reason), and whatever a set accepted
//! compiles for every proxy without error and without dropping anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use sinew_model::resource::Resource;
use sinew_model::{Resources, compile_proxy, parse_documents};

const SERVICE: &str = "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n";

fn route(rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n{rule}"
    )
}

fn traffic(spec: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: catalog}}\n{spec}"
    )
}

fn jwt(rule: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: j, namespace: shop}}\nspec:\n  jwtRules:\n    - issuer: https://issuer\n      jwks: {{uri: https://issuer/keys}}\n{rule}"
    )
}

fn mesh(spec: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n{spec}"
    )
}

fn jwks(source: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: j, namespace: shop}}\nspec:\n  jwtRules:\n    - issuer: https://issuer\n      jwks:\n{source}"
    )
}

fn authz(from: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: shop}}\nspec:\n  rules:\n    - from:\n{from}"
    )
}

/// Each bad value is refused when the document is read: the error names the file,
/// the line of the bad value, the field's path and why.
#[test]
fn typed_fields_refuse_bad_text_with_path_line_and_reason() {
    let proxy = |spec: &str| {
        format!(
            "apiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
        )
    };
    let cases: Vec<(String, &str, &str, &str)> = vec![
        // (document, field, reason, text on the line the error points at)
        (
            proxy("  inbound:\n    bind: 127.0.0.1\n    ports: [8080]\n"),
            "spec.inbound.bind",
            "\"127.0.0.1\" is not an address:port",
            "bind: 127.0.0.1",
        ),
        (
            proxy("  inbound:\n    bind: 127.0.0.1:4143\n    appAddress: localhost\n    ports: [8080]\n"),
            "spec.inbound.appAddress",
            "\"localhost\" is not an IP address",
            "appAddress",
        ),
        (
            proxy("  outbound:\n    upstreams:\n      - {service: catalog, bind: \"127.0.0.1:99999\"}\n"),
            "spec.outbound.upstreams[0].bind",
            "is not an address:port",
            "99999",
        ),
        (
            proxy("  capture:\n    detectTimeout: 1.5s\n"),
            "spec.capture.detectTimeout",
            "invalid duration \"1.5s\"",
            "detectTimeout",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec:\n  service: catalog\n  address: 10.0.0.300\n".into(),
            "spec.address",
            "\"10.0.0.300\" is not an IP address",
            "address: 10.0.0.300",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: s, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n  virtualIPs:\n    - 10.96.0.1\n    - fd00::zz\n".into(),
            "spec.virtualIPs[1]",
            "\"fd00::zz\" is not an IP address",
            "fd00::zz",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  virtualIPRange: 10.96.0.0/33\n".into(),
            "spec.virtualIPRange",
            "prefix",
            "virtualIPRange",
        ),
        (
            route("    - timeouts:\n        request: 10 seconds\n"),
            "spec.rules[0].timeouts.request",
            "invalid duration \"10 seconds\"",
            "request: 10 seconds",
        ),
        (
            route("    - retry:\n        backoff: fast\n"),
            "spec.rules[0].retry.backoff",
            "invalid duration \"fast\"",
            "backoff: fast",
        ),
        (
            route("    - retry:\n        hedge:\n          delay: 5\n"),
            "spec.rules[0].retry.hedge.delay",
            "invalid duration \"5\"",
            "delay: 5",
        ),
        (
            route("    - filters:\n        - type: Fault\n          fault:\n            delay: {fixedDelay: 2x, percent: 5}\n"),
            "spec.rules[0].filters[0].fault.delay.fixedDelay",
            "invalid duration \"2x\"",
            "fixedDelay: 2x",
        ),
        (
            route("    - matches:\n        - path: {type: RegularExpression, value: \"/(a\"}\n"),
            "spec.rules[0].matches[0].path.value",
            "invalid regular expression: unclosed group",
            "/(a",
        ),
        (
            // Anchoring would make this one compile; as written it is unbalanced.
            route("    - matches:\n        - headers:\n            - {type: RegularExpression, name: x-v, value: \"a)|(b\"}\n"),
            "spec.rules[0].matches[0].headers[0].value",
            "invalid regular expression: unopened group",
            "x-v",
        ),
        (
            route("    - matches:\n        - queryParams:\n            - type: RegularExpression\n              name: q\n              value: \"[z-a]\"\n"),
            "spec.rules[0].matches[0].queryParams[0].value",
            "invalid regular expression",
            "[z-a]",
        ),
        (
            traffic("  rateLimits:\n    - name: a\n      requestsPerSecond: 1\n      matches: [{path: {type: RegularExpression, value: \"(\"}}]\n"),
            "spec.rateLimits[0].matches[0].path.value",
            "invalid regular expression",
            "matches:",
        ),
        (
            route("    - matches:\n        - headers:\n            - {name: \"x version\", value: v2}\n"),
            "spec.rules[0].matches[0].headers[0].name",
            "\"x version\" is not a valid header name",
            "x version",
        ),
        (
            traffic("  rateLimits:\n    - name: a\n      requestsPerSecond: 1\n      matches:\n        - headers: [{name: \"a:b\", value: c}]\n"),
            "spec.rateLimits[0].matches[0].headers[0].name",
            "\"a:b\" is not a valid header name",
            "a:b",
        ),
        (
            route("    - matches:\n        - method: get\n"),
            "spec.rules[0].matches[0].method",
            "\"get\" is not an HTTP method (use upper case, e.g. GET)",
            "method: get",
        ),
        (
            route("    - filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            set:\n              - {name: \"x user\", value: a}\n"),
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            "\"x user\" is not a valid header name",
            "x user",
        ),
        (
            route("    - filters:\n        - type: ResponseHeaderModifier\n          responseHeaderModifier:\n            add:\n              - {name: x-a, value: \"a\\nb\"}\n"),
            "spec.rules[0].filters[0].responseHeaderModifier.add[0].value",
            "not a valid header value",
            "x-a",
        ),
        (
            route("    - filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            remove: [\"bad:name\"]\n"),
            "spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
            "\"bad:name\" is not a valid header name",
            "bad:name",
        ),
        (
            traffic("  ringHash:\n    header: \"x y\"\n"),
            "spec.ringHash.header",
            "\"x y\" is not a valid header name",
            "header",
        ),
        (
            traffic("  healthCheck:\n    interval: often\n"),
            "spec.healthCheck.interval",
            "invalid duration \"often\"",
            "interval: often",
        ),
        (
            traffic("  outlierDetection:\n    baseEjectionTime: 1d\n"),
            "spec.outlierDetection.baseEjectionTime",
            "invalid duration \"1d\"",
            "baseEjectionTime",
        ),
        (
            traffic("  rateLimits:\n    - name: a\n      requestsPerSecond: 1\n      key: {header: \"(x)\"}\n"),
            "spec.rateLimits[0].key.header",
            "\"(x)\" is not a valid header name",
            "key:",
        ),
        (
            route("    - retry:\n        grpcCodes: [UNAVAILABLE, unavailable]\n"),
            "spec.rules[0].retry.grpcCodes[1]",
            "\"unavailable\" is not a gRPC status name",
            "grpcCodes",
        ),
        (
            route("    - filters:\n        - type: Fault\n          fault:\n            abort: {grpcStatus: NOPE, percent: 1}\n"),
            "spec.rules[0].filters[0].fault.abort.grpcStatus",
            "\"NOPE\" is not a gRPC status name (e.g. UNAVAILABLE)",
            "NOPE",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {name: j, namespace: shop}\nspec:\n  jwtRules:\n    - issuer: https://issuer\n      jwks:\n        inline: '{\"keys\": 5}'\n".into(),
            "spec.jwtRules[0].jwks.inline",
            "not a JWKS",
            "inline",
        ),
        (
            jwt("      clockSkew: 1 minute\n"),
            "spec.jwtRules[0].clockSkew",
            "invalid duration \"1 minute\"",
            "clockSkew",
        ),
        (
            jwt("      fromHeaders: [{name: \"bad header\"}]\n"),
            "spec.jwtRules[0].fromHeaders[0].name",
            "\"bad header\" is not a valid header name",
            "fromHeaders",
        ),
        (
            jwt("      forwardClaims: [{claim: sub, header: \"x:sub\"}]\n"),
            "spec.jwtRules[0].forwardClaims[0].header",
            "\"x:sub\" is not a valid header name",
            "forwardClaims",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n    - from:\n        principals:\n          - spiffe://example.org/ns/shop/sa/web\n          - spiffe://Example.org/ns/shop/sa/web\n".into(),
            "spec.rules[0].from.principals[1]",
            "is not a SPIFFE id: invalid trust domain",
            "Example.org",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n    - to:\n        methods: [GET, delete]\n".into(),
            "spec.rules[0].to.methods[1]",
            "\"delete\" is not an HTTP method",
            "methods",
        ),
        (
            mesh("  tracing:\n    endpoint: https://otel:4317\n"),
            "spec.tracing.endpoint",
            "\"https://otel:4317\": https is not supported",
            "endpoint: https://otel:4317",
        ),
        (
            mesh("  tracing:\n    protocol: http/protobuf\n    endpoint: otel:4318\n"),
            "spec.tracing.endpoint",
            "\"otel:4318\" is not an http:// URL",
            "endpoint: otel:4318",
        ),
        (
            mesh("  tracing:\n    endpoint: \"http://otel:4318/v1/traces?x=1\"\n"),
            "spec.tracing.endpoint",
            "a query is not allowed",
            "endpoint:",
        ),
        (
            jwks("        uri: http://issuer/keys\n"),
            "spec.jwtRules[0].jwks.uri",
            "\"http://issuer/keys\": http:// is refused",
            "uri: http://issuer/keys",
        ),
        (
            jwks("        uri: ftp://issuer/keys\n"),
            "spec.jwtRules[0].jwks.uri",
            "\"ftp://issuer/keys\" is not an https:// URL",
            "uri: ftp://issuer/keys",
        ),
        (
            jwks("        file: \"\"\n"),
            "spec.jwtRules[0].jwks.file",
            "the path must not be empty",
            "file:",
        ),
        (
            jwks("        uri: https://issuer/keys\n        caFile: \"\"\n"),
            "spec.jwtRules[0].jwks.caFile",
            "the path must not be empty",
            "caFile:",
        ),
        (
            route("    - filters:\n        - type: URLRewrite\n          urlRewrite:\n            hostname: \"bad host\"\n"),
            "spec.rules[0].filters[0].urlRewrite.hostname",
            "\"bad host\" is not a valid hostname",
            "hostname:",
        ),
        (
            route("    - filters:\n        - type: URLRewrite\n          urlRewrite:\n            hostname: \"\"\n"),
            "spec.rules[0].filters[0].urlRewrite.hostname",
            "\"\" is not a valid hostname",
            "hostname:",
        ),
        (
            route("    - filters:\n        - type: URLRewrite\n          urlRewrite:\n            path:\n              type: ReplaceFullPath\n              replaceFullPath: v2\n"),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "\"v2\" must start with '/'",
            "replaceFullPath: v2",
        ),
        (
            route("    - matches: [{path: {type: PathPrefix, value: /api}}]\n      filters:\n        - type: URLRewrite\n          urlRewrite:\n            path:\n              type: ReplacePrefixMatch\n              replacePrefixMatch: \"/a b\"\n"),
            "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
            "\"/a b\" is not a valid URL path",
            "replacePrefixMatch:",
        ),
        (
            route("    - filters:\n        - type: URLRewrite\n          urlRewrite:\n            path:\n              type: ReplaceFullPath\n              replaceFullPath: \"/v2?x=1\"\n"),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "a path has no query or fragment",
            "replaceFullPath:",
        ),
        (
            route("    - matches:\n        - path:\n            type: Exact\n            value: api\n"),
            "spec.rules[0].matches[0].path.value",
            "\"api\" must start with '/'",
            "value: api",
        ),
        (
            traffic("  rateLimits:\n    - name: a\n      requestsPerSecond: 1\n      matches:\n        - path: {type: PathPrefix, value: v1}\n"),
            "spec.rateLimits[0].matches[0].path.value",
            "\"v1\" must start with '/'",
            "path:",
        ),
        (
            authz("        principalPrefixes:\n          - spiffe://cluster.local/ns/\n          - cluster.local/ns/shop\n"),
            "spec.rules[0].from.principalPrefixes[1]",
            "\"cluster.local/ns/shop\" is not a SPIFFE id prefix (spiffe://<trust-domain>/...)",
            "- cluster.local/ns/shop",
        ),
        (
            authz("        principalPrefixes: [\"spiffe://Cluster.local/\"]\n"),
            "spec.rules[0].from.principalPrefixes[0]",
            "is not a SPIFFE id prefix",
            "principalPrefixes",
        ),
        (
            authz("        namespaces:\n          - ops\n          - Shop\n"),
            "spec.rules[0].from.namespaces[1]",
            "\"Shop\" is not a valid namespace (a DNS-1123 label",
            "- Shop",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n    - to:\n        paths: [/health, admin]\n".into(),
            "spec.rules[0].to.paths[1]",
            "\"admin\" must start with '/'",
            "paths:",
        ),
        (
            "apiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n    - to:\n        pathPrefixes:\n          - \"/api?x=1\"\n".into(),
            "spec.rules[0].to.pathPrefixes[0]",
            "\"/api?x=1\": a path has no query or fragment",
            "/api?x=1",
        ),
        (
            traffic("  healthCheck:\n    path: healthz\n"),
            "spec.healthCheck.path",
            "\"healthz\" must start with '/'",
            "path: healthz",
        ),
        (
            traffic("  healthCheck:\n    path: \"/health z\"\n"),
            "spec.healthCheck.path",
            "\"/health z\" is not a valid URL path",
            "path:",
        ),
        (
            authz("        requestPrincipals: [\"https://issuer/*\", \"*/admin\"]\n"),
            "spec.rules[0].from.requestPrincipals[1]",
            "\"*/admin\": use \"issuer/subject\", \"*\", or a prefix ending in '*'",
            "requestPrincipals",
        ),
        (
            authz("        namespaces: [shop.prod]\n"),
            "spec.rules[0].from.namespaces[0]",
            "\"shop.prod\" is not a valid namespace",
            "namespaces",
        ),
    ];
    for (doc, field, reason, on_line) in &cases {
        let text = format!("{SERVICE}---\n{doc}");
        let err = parse_documents("typed.yaml", &text).expect_err(doc);
        assert_eq!(err.0.len(), 1, "{err}");
        let e = &err.0[0];
        assert_eq!(e.field.as_deref(), Some(*field), "{err}");
        assert!(e.reason.contains(reason), "{field}: {}", e.reason);
        assert_eq!(e.file.as_deref(), Some("typed.yaml"));
        let line = e
            .line
            .unwrap_or_else(|| panic!("{field}: no line in {err}"));
        let shown = text.lines().nth(line - 1).unwrap_or("");
        assert!(
            shown.contains(on_line),
            "{field}: line {line} is {shown:?}, expected the one with {on_line:?}"
        );
        // What a user reads: file:line: field: reason.
        assert!(
            err.to_string()
                .starts_with(&format!("typed.yaml:{line}: {field}: ")),
            "{err}"
        );
    }
}

/// A pattern written before its `type` is refused as well; the error then names
/// the condition (its value was read before it was known to be a pattern).
#[test]
fn a_pattern_before_its_type_is_refused_too() {
    let text = format!(
        "{SERVICE}---\n{}",
        route("    - matches:\n        - path: {value: \"/(a\", type: RegularExpression}\n")
    );
    let err = parse_documents("typed.yaml", &text).unwrap_err();
    assert_eq!(
        err.0[0].field.as_deref(),
        Some("spec.rules[0].matches[0].path"),
        "{err}"
    );
    assert!(
        err.0[0]
            .reason
            .contains("invalid regular expression: unclosed group"),
        "{err}"
    );
    // Written the other way round, and read back from the store: the same match.
    let ok = format!(
        "{SERVICE}---\n{}",
        route("    - matches:\n        - path: {value: \"/v[0-9]+\", type: RegularExpression}\n")
    );
    let docs =
        parse_documents("typed.yaml", &ok).unwrap_or_else(|e| panic!("the test's documents: {e}"));
    let json = docs[1].resource.to_json();
    assert!(
        json.contains(r#""path":{"type":"RegularExpression","value":"/v[0-9]+"}"#),
        "{json}"
    );
    let back = Resource::from_json("HTTPRoute", &json)
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
    assert_eq!(back, docs[1].resource);
}

/// The documents in the repository: the demo's mesh and the loader's fuzz corpus.
fn fixtures() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![root.join("demo/mesh.yaml")];
    let corpus = root.join("fuzz/corpus/load_config");
    let mut more: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    more.sort();
    files.extend(more);
    files
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), text)
        })
        .collect()
}

/// Whatever validation accepts compiles for every proxy in the set, without an error
/// and without losing what the documents ask for: every listener, upstream, endpoint,
/// virtual IP, header edit and duration is in the compiled configuration.
#[test]
fn compile_never_fails_or_drops_on_what_validation_accepted() {
    let mut accepted = 0;
    for (file, text) in fixtures() {
        let Ok(docs) = parse_documents(&file, &text) else {
            continue; // the corpus holds refused documents too
        };
        // The store's round trip keeps every typed field's text.
        for d in &docs {
            let json = d.resource.to_json();
            let back = Resource::from_json(d.resource.kind(), &json)
                .unwrap_or_else(|e| panic!("{file}: {json}: {e}"));
            assert_eq!(
                back.to_json(),
                json,
                "{file}: the JSON round trip changed it"
            );
        }
        let Ok(res) = Resources::from_documents(docs) else {
            continue;
        };
        for ((ns, name), p) in &res.proxies {
            let cfg = compile_proxy(&res, Some(&format!("{ns}/{name}")))
                .unwrap_or_else(|e| panic!("{file}: {ns}/{name} was accepted but: {e}"));
            accepted += 1;
            let spec = &p.spec;
            assert_eq!(cfg.inbound.is_some(), spec.inbound.is_some(), "{file}");
            if let (Some(i), Some(si)) = (&cfg.inbound, &spec.inbound) {
                assert_eq!(i.bind, si.bind.value(), "{file}");
            }
            assert_eq!(
                cfg.upstreams.iter().map(|u| u.bind).collect::<Vec<_>>(),
                spec.outbound
                    .upstreams
                    .iter()
                    .map(|u| u.bind.value())
                    .collect::<Vec<_>>(),
                "{file}: every upstream is compiled"
            );
            assert_eq!(
                cfg.http_proxy,
                spec.outbound.http_proxy.as_ref().map(|h| h.bind.value()),
                "{file}"
            );
            let tracing = res.mesh.as_ref().and_then(|m| m.spec.tracing.as_ref());
            assert_eq!(cfg.tracing.is_some(), tracing.is_some(), "{file}");
            for ((sns, sname), svc) in &res.services {
                let key = format!("{sname}.{sns}");
                let compiled = cfg.service(&key).unwrap_or_else(|| panic!("{file}: {key}"));
                let mut vips: Vec<std::net::IpAddr> = Vec::new();
                for ip in svc.spec.virtual_ip_list().map(|v| v.value()) {
                    if !vips.contains(&ip) {
                        vips.push(ip);
                    }
                }
                assert_eq!(compiled.virtual_ips, vips, "{file}: {key}");
                let members = res
                    .workloads
                    .iter()
                    .filter(|((wns, _), w)| {
                        wns == sns
                            && (w.spec.service.as_deref() == Some(sname.as_str())
                                || svc.spec.selector.as_ref().is_some_and(|sel| {
                                    sel.iter().all(|(k, v)| w.metadata.labels.get(k) == Some(v))
                                }))
                    })
                    .count();
                for port in &compiled.ports {
                    assert_eq!(
                        port.endpoints.len(),
                        members,
                        "{file}: {key}:{} has every workload",
                        port.port
                    );
                }
            }
        }
    }
    assert!(
        accepted >= 3,
        "the fixtures should hold valid meshes with proxies; compiled {accepted}"
    );
}

/// The fields typed last (URLs, paths, SPIFFE prefixes, namespaces, file paths): what the user
/// wrote is what a document serializes to, the store's round trip keeps it, and the
/// compiler reads the parsed values (the collector's URL completed for its protocol,
/// the rewrite's authority).
#[test]
fn urls_paths_prefixes_and_namespaces_round_trip_as_written() {
    let text = format!(
        "{SERVICE}---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {{name: p, namespace: shop}}
spec: {{service: catalog, address: 10.0.0.7, ports: {{http: 8080}}}}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: p, namespace: shop}}
spec:
  inbound: {{bind: \"0.0.0.0:4143\", ports: [8080]}}
  outbound:
    upstreams: [{{service: catalog, bind: \"127.0.0.1:9001\"}}]
---
{}---
{}---
{}---
{}---
{}---
{}",
        mesh("  tracing:\n    endpoint: http://Otel.example:4318/\n    protocol: http/protobuf\n"),
        route(
            "    - matches:\n        - path: {type: Exact, value: /api/v1/items}\n      filters:\n        - type: URLRewrite\n          urlRewrite:\n            path: {type: ReplaceFullPath, replaceFullPath: /v1/items%2F}\n    - matches:\n        - path: {type: PathPrefix, value: /api}\n      filters:\n        - type: URLRewrite\n          urlRewrite:\n            hostname: Internal.Catalog:8080\n            path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2/}\n"
        ),
        authz(
            "        principalPrefixes: [\"spiffe://cluster.local/ns/ops/\"]\n        namespaces: [ops, shop-2]\n        requestPrincipals: [\"https://issuer/*\"]\n      to:\n        paths: [/health]\n        pathPrefixes: [/api/]\n"
        ),
        jwks("        uri: https://issuer.example:8443/keys\n        caFile: ./ca.pem\n"),
        "apiVersion: sinew.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {name: f, namespace: shop}\nspec:\n  jwtRules:\n    - issuer: https://other\n      jwks: {file: /etc/sinew/jwks.json}\n",
        traffic("  healthCheck:\n    path: /healthz?full=1\n"),
    );
    let docs = parse_documents("typed.yaml", &text)
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
    let written = [
        r#""endpoint":"http://Otel.example:4318/""#,
        r#""hostname":"Internal.Catalog:8080""#,
        r#""replacePrefixMatch":"/v2/""#,
        r#""replaceFullPath":"/v1/items%2F""#,
        r#""path":{"type":"Exact","value":"/api/v1/items"}"#,
        r#""principalPrefixes":["spiffe://cluster.local/ns/ops/"]"#,
        r#""namespaces":["ops","shop-2"]"#,
        r#""requestPrincipals":["https://issuer/*"]"#,
        r#""uri":"https://issuer.example:8443/keys""#,
        r#""caFile":"./ca.pem""#,
        r#""file":"/etc/sinew/jwks.json""#,
        r#""paths":["/health"],"pathPrefixes":["/api/"]"#,
        r#""path":"/healthz?full=1""#,
    ];
    let json: String = docs.iter().map(|d| d.resource.to_json()).collect();
    for w in written {
        assert!(json.contains(w), "{w} not in {json}");
    }
    for d in &docs {
        let json = d.resource.to_json();
        let back = Resource::from_json(d.resource.kind(), &json)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
        assert_eq!(
            back.to_json(),
            json,
            "the store's round trip keeps the text"
        );
    }
    let res =
        Resources::from_documents(docs).unwrap_or_else(|e| panic!("the test's documents: {e}"));
    let cfg =
        compile_proxy(&res, Some("shop/p")).unwrap_or_else(|e| panic!("the test's documents: {e}"));
    let tracing = cfg.tracing.as_ref().expect("tracing");
    assert_eq!(tracing.endpoint, "http://Otel.example:4318/v1/traces");
    let shown = serde_json::to_string(&cfg).unwrap();
    for w in [
        r#""hostname":"Internal.Catalog:8080""#,
        r#""ReplaceFullPath","value":"/v1/items%2F""#,
        "spiffe://cluster.local/ns/ops/",
        "https://issuer.example:8443/keys",
        "./ca.pem",
        "/etc/sinew/jwks.json",
        r#""path":"/healthz?full=1""#,
    ] {
        assert!(shown.contains(w), "{w} not in the compiled {shown}");
    }
}

/// Names are Kubernetes names: an object's a DNS-1123 subdomain, a namespace a
/// DNS-1123 label. A bad one is refused naming the file, the document's line, the
/// field and the rule.
#[test]
fn names_and_namespaces_follow_kubernetes_rules() {
    let service = |meta: &str| {
        format!(
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {meta}\nspec:\n  ports: [{{name: http, port: 80}}]\n"
        )
    };
    let cases = [
        (
            "{name: a..b, namespace: shop}",
            "metadata.name",
            "\"a..b\" is not a valid name (a DNS-1123 subdomain",
        ),
        (
            "{name: web-, namespace: shop}",
            "metadata.name",
            "\"web-\" is not a valid name",
        ),
        (
            "{name: Web, namespace: shop}",
            "metadata.name",
            "\"Web\" is not a valid name",
        ),
        (
            "{name: web, namespace: shop.prod}",
            "metadata.namespace",
            "\"shop.prod\" is not a valid namespace (a DNS-1123 label",
        ),
        (
            "{name: web, namespace: -shop}",
            "metadata.namespace",
            "\"-shop\" is not a valid namespace",
        ),
    ];
    for (meta, field, reason) in cases {
        let text = format!("{SERVICE}---\n{}", service(meta));
        let docs = parse_documents("names.yaml", &text)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
        let err = Resources::from_documents(docs).expect_err(meta);
        assert_eq!(err.0.len(), 1, "{err}");
        let e = &err.0[0];
        assert_eq!(e.field.as_deref(), Some(field), "{err}");
        assert!(e.reason.contains(reason), "{meta}: {}", e.reason);
        assert_eq!(e.file.as_deref(), Some("names.yaml"));
        assert_eq!(e.line, Some(7), "the document's first line: {err}");
    }
    // Dots in a name, a long name and a digit first are all Kubernetes names.
    let long = "a".repeat(100);
    for meta in [
        "{name: catalog.v2, namespace: shop-2}",
        &format!("{{name: {long}, namespace: 0shop}}"),
    ] {
        let text = format!("{SERVICE}---\n{}", service(meta));
        let docs = parse_documents("names.yaml", &text)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
        Resources::from_documents(docs).unwrap_or_else(|e| panic!("{meta}: {e}"));
    }
}
