//! The compiler's tests: security (identity, mTLS, authorization, JWT) and tracing.

mod security_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::*;
    use crate::authz::{HttpAttributes, RequestAttributes, evaluate};
    use http::Method;

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
        compile_text("mesh.yaml", yaml, Some("shop/catalog-1"))
            .unwrap_or_else(|e| panic!("the test's documents: {e}"))
    }

    fn errors(yaml: &str) -> String {
        let docs = crate::load::parse_documents("mesh.yaml", yaml)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
        match Resources::from_documents(docs) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_longest_clock_skew_allowed_compiles() {
        let cfg = compile(&MESH.replace("clockSkew: 5s", "clockSkew: 5m"));
        let skew = cfg.inbound.unwrap().jwt[0].clock_skew;
        assert_eq!(skew, crate::validate::MAX_CLOCK_SKEW);
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
        let cfg = compile_text("m.yaml", yaml, None)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
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
        let cfg = compile_text("m.yaml", &yaml, None)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
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
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {file: /j, caFile: /ca.pem}}]}",
                "caFile needs an https:// uri",
            ),
            (
                // An http:// uri is refused when the document is read, before caFile
                // is looked at.
                "kind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec: {jwtRules: [{issuer: i, jwks: {uri: \"http://x/\", caFile: /ca.pem}}]}",
                "spec.jwtRules[0].jwks.uri: \"http://x/\": http:// is refused",
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

mod tracing_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::*;

    fn mesh(tracing: &str) -> String {
        format!(
            "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing: {tracing}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p}}\nspec: {{}}\n"
        )
    }

    #[test]
    fn compiles_tracing_with_defaults_and_normalised_endpoints() {
        let cfg = compile_text("m.yaml", &mesh("{endpoint: \"http://otel:4317\"}"), None)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"));
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
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
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
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
        assert!(cfg.tracing.is_none());
        let json = serde_json::to_value(
            compile_text(
                "m.yaml",
                &mesh("{endpoint: \"http://[::1]:9\", protocol: http/protobuf}"),
                None,
            )
            .unwrap_or_else(|e| panic!("the test's documents: {e}")),
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
